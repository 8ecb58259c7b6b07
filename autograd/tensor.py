"""The engine: a Tensor that remembers the op that made it, and reverse-mode autodiff.

Every differentiable op is a `Function` with a `forward` on raw arrays and a
`backward` that turns the gradient of its output into gradients of its inputs:
the chain rule, one op at a time. `Tensor.backward()` orders the graph once
(inputs before the ops that use them) and walks it in reverse.

The rules the walk keeps (tests/test_tensor.py pins each):
- Gradients accumulate: a tensor used twice receives the sum of both uses.
- A leaf's `.grad` persists across `backward()` calls until someone resets it
  (`optimizer.zero_grad()`); intermediate tensors do not keep a `.grad`.
- Each op's saved arrays are released as soon as its backward has run, so a
  training step never holds more than one copy of the graph. A second
  `backward()` through the same graph is therefore an error.
- Inside `no_grad()` no graph is recorded at all.
- Only first-order gradients: backward runs on arrays, not on Tensors, so
  it cannot itself be differentiated.

Arrays are NumPy or CuPy; every kernel takes its array module `xp` from its
inputs (see backend.py), so there is one code path for both.
"""
import contextlib

import numpy as np

from . import backend

# =============================================================================
# Graph recording switch
# =============================================================================

_grad_enabled = True


@contextlib.contextmanager
def no_grad():
    """Run a block without recording a graph (sampling, evaluation, EMA)."""
    global _grad_enabled
    previous, _grad_enabled = _grad_enabled, False
    try:
        yield
    finally:
        _grad_enabled = previous


def is_grad_enabled():
    return _grad_enabled


# =============================================================================
# Function: the base of every differentiable op
# =============================================================================

# Marks an op whose saved arrays were released by an earlier backward().
_FREED = object()


class Function:
    """One op. Subclasses define `forward(*arrays)` and `backward(grad)`.

    Options of the op (an axis, a stride) go to `__init__`; the tensors it
    acts on go to `__call__`. `forward` stores on `self` exactly what
    `backward` will need and nothing more; `backward` returns one gradient
    array per input (None for an input that needs none), shaped like that input.
    """

    def __call__(self, *inputs):
        _check_same_device(type(self).__name__, inputs)
        out = self.forward(*(t.data for t in inputs))
        needs_grad = _grad_enabled and any(t.requires_grad for t in inputs)
        result = Tensor(out, requires_grad=needs_grad)
        if needs_grad:
            self.inputs = inputs
            self.needs_input_grad = tuple(t.requires_grad for t in inputs)
            result._ctx = self
        return result

    def forward(self, *arrays):
        raise NotImplementedError

    def backward(self, grad):
        raise NotImplementedError


def _check_same_device(op_name, tensors):
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        described = ", ".join(f"{t.device} {tuple(t.shape)}" for t in tensors)
        raise ValueError(f"{op_name}: inputs live on different devices ({described}); "
                         "move them with .to() first")


def unbroadcast(grad, shape):
    """Undo NumPy broadcasting: sum `grad` down to `shape`.

    Forward broadcasting copied a value along new leading axes and along axes
    of size 1; in backward each copy's gradient flows back to the one value.
    """
    if grad.shape == tuple(shape):
        return grad
    extra = grad.ndim - len(shape)
    if extra > 0:
        grad = grad.sum(axis=tuple(range(extra)))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if axes:
        grad = grad.sum(axis=axes, keepdims=True)
    return grad


# =============================================================================
# Tensor
# =============================================================================

def _as_array(data, dtype=None):
    """The backend array behind a Tensor; Python numbers default to float32."""
    if isinstance(data, Tensor):
        raise TypeError("Tensor(...) got a Tensor; use .detach() for a graph-free copy")
    if isinstance(data, np.ndarray) or backend.is_cuda_array(data):
        arr = data
    elif isinstance(data, np.generic):
        arr = np.asarray(data)
    else:
        arr = np.asarray(data)
        if arr.dtype == np.float64:  # Python floats and lists of them
            arr = arr.astype(np.float32)
    if dtype is not None and arr.dtype != dtype:
        arr = arr.astype(dtype)
    return arr


class Tensor:
    """An n-dimensional array (NumPy or CuPy) plus what autodiff needs.

    `data`: the backend array. `grad`: an array of the same shape, filled by
    `backward()` for tensors with `requires_grad=True`. `_ctx`: the Function
    that produced this tensor (None for a leaf).
    """

    # Makes `ndarray * Tensor` call Tensor.__rmul__ instead of NumPy's loop.
    __array_priority__ = 1000

    def __init__(self, data, requires_grad=False, dtype=None):
        self.data = _as_array(data, dtype)
        if requires_grad and self.data.dtype.kind != "f":
            raise TypeError(f"only floating-point tensors can require grad, got {self.data.dtype}")
        self.requires_grad = bool(requires_grad)
        self.grad = None
        self._ctx = None

    # --- what the tensor is --------------------------------------------------

    @property
    def shape(self):
        return self.data.shape

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def ndim(self):
        return self.data.ndim

    @property
    def size(self):
        return self.data.size

    @property
    def device(self):
        return backend.device_of(self.data)

    @property
    def xp(self):
        return backend.get_array_module(self.data)

    def __len__(self):
        return len(self.data)

    def __repr__(self):
        grad = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor({self.numpy()!r}, device={self.device!r}{grad})"

    def numpy(self):
        """A host (NumPy) copy of the data, wherever the tensor lives."""
        return np.array(backend.to_numpy(self.data))

    def item(self):
        return self.numpy().item()

    def detach(self):
        """The same data (shared, not copied) as a new leaf outside any graph."""
        return Tensor(self.data)

    def to(self, device):
        """This tensor on 'cpu' or 'cuda', as a new leaf (self if already there)."""
        if device == self.device:
            return self
        return Tensor(backend.to_device(self.data, device), requires_grad=self.requires_grad)

    def astype(self, dtype):
        return Cast(dtype)(self)

    # --- backward ------------------------------------------------------------

    def backward(self, grad=None):
        """Fill `.grad` of every leaf this tensor depends on (reverse mode).

        `grad` is d(something)/d(self); it may be omitted only for a tensor
        with one element, where it defaults to 1.
        """
        if not self.requires_grad:
            raise RuntimeError("backward() on a tensor that does not require grad "
                               "(no input had requires_grad=True, or it was made under no_grad())")
        if grad is None:
            if self.data.size != 1:
                raise RuntimeError(f"backward() on a non-scalar tensor of shape {tuple(self.shape)} "
                                   "needs an explicit gradient of the same shape")
            grad = self.xp.ones_like(self.data)
        else:
            grad = grad.data if isinstance(grad, Tensor) else grad
            grad = self.xp.asarray(grad, dtype=self.dtype)
            if grad.shape != self.shape:
                raise ValueError(f"backward(): gradient of shape {tuple(grad.shape)} "
                                 f"for a tensor of shape {tuple(self.shape)}")

        order = _topological_order(self)
        pending = {id(self): grad}   # gradients still flowing towards their tensor
        # A tensor used twice gets the sum of both gradients. The walk adds into an
        # array in place only when it made that array itself (`owned`): an op's
        # backward may hand back an array that is also someone else's (Add passes
        # its grad to both inputs), and adding into that would change the other too.
        owned = set()                # ids of pending arrays the walk made itself

        # Popping from the end visits outputs before the ops that made their inputs,
        # and drops the walk's reference to each tensor once it is done.
        while order:
            node = order.pop()
            g = pending.pop(id(node), None)
            if g is None:
                continue
            ctx = node._ctx
            if ctx is None:  # a leaf: keep its gradient for the optimizer
                if node.grad is None:
                    # A gradient the walk did not make may be shared with another
                    # tensor's; copy it so in-place updates of one never touch the other.
                    node.grad = g if id(g) in owned else backend.get_array_module(g).array(g)
                else:
                    node.grad += g
                owned.discard(id(g))
                continue

            input_grads = ctx.backward(g)
            if not isinstance(input_grads, tuple):
                input_grads = (input_grads,)
            owned.discard(id(g))
            for inp, needs, ig in zip(ctx.inputs, ctx.needs_input_grad, input_grads):
                if not needs or ig is None:
                    continue
                if ig.shape != inp.shape:
                    raise RuntimeError(f"{type(ctx).__name__}.backward returned a gradient of shape "
                                       f"{tuple(ig.shape)} for an input of shape {tuple(inp.shape)}")
                key = id(inp)
                previous = pending.get(key)
                if previous is None:
                    pending[key] = ig
                elif id(previous) in owned:   # our own buffer: add in place
                    previous += ig
                else:                          # maybe shared with another op: add into a new one
                    # (asarray: NumPy turns 0-d results into scalars, which += cannot update)
                    total = backend.get_array_module(ig).asarray(previous + ig)
                    pending[key] = total
                    owned.add(id(total))
            node._ctx = _FREED

    def zero_grad(self):
        self.grad = None

    # --- operators -----------------------------------------------------------

    def _lift(self, other):
        """A constant as a tensor of this tensor's dtype and device (no upcast)."""
        if isinstance(other, Tensor):
            if other.dtype != self.dtype and self.dtype.kind == "f" and other.dtype.kind == "f":
                raise TypeError(f"dtype mismatch: {self.dtype} and {other.dtype}; "
                                "cast one explicitly with .astype()")
            return other
        if backend.is_cuda_array(other) != (self.device == "cuda"):
            if hasattr(other, "shape") and other.ndim > 0:
                raise ValueError(f"an array on {backend.device_of(other)} combined with a tensor "
                                 f"on {self.device}; move one of them first")
            other = backend.to_numpy(other)
        return Tensor(self.xp.asarray(other, dtype=self.dtype))

    def __add__(self, other):
        return Add()(self, self._lift(other))

    def __radd__(self, other):
        return Add()(self._lift(other), self)

    def __sub__(self, other):
        return Sub()(self, self._lift(other))

    def __rsub__(self, other):
        return Sub()(self._lift(other), self)

    def __mul__(self, other):
        return Mul()(self, self._lift(other))

    def __rmul__(self, other):
        return Mul()(self._lift(other), self)

    def __truediv__(self, other):
        return Div()(self, self._lift(other))

    def __rtruediv__(self, other):
        return Div()(self._lift(other), self)

    def __neg__(self):
        return Neg()(self)

    def __pow__(self, exponent):
        if isinstance(exponent, Tensor):
            return (exponent * self.log()).exp()   # a**b = exp(b log a), for a > 0
        return Pow(exponent)(self)

    def __matmul__(self, other):
        return matmul(self, self._lift(other))

    def __rmatmul__(self, other):
        return matmul(self._lift(other), self)

    def __getitem__(self, index):
        return GetItem(index)(self)

    def exp(self):
        return Exp()(self)

    def log(self):
        return Log()(self)

    def sqrt(self):
        return Sqrt()(self)

    def sum(self, axis=None, keepdims=False):
        return Sum(axis, keepdims)(self)

    def mean(self, axis=None, keepdims=False):
        return Mean(axis, keepdims)(self)

    def reshape(self, *shape):
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        return Reshape(shape)(self)

    def transpose(self, *axes):
        if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
            axes = tuple(axes[0])
        return Transpose(axes or None)(self)

    @property
    def T(self):
        return self.transpose()

    def maximum(self, other):
        return Maximum()(self, self._lift(other))


# =============================================================================
# Element-wise arithmetic (broadcasting undone by `unbroadcast`)
# =============================================================================

class Add(Function):
    def forward(self, a, b):
        self.a_shape, self.b_shape = a.shape, b.shape
        return a + b

    def backward(self, grad):
        return unbroadcast(grad, self.a_shape), unbroadcast(grad, self.b_shape)


class Sub(Function):
    def forward(self, a, b):
        self.a_shape, self.b_shape = a.shape, b.shape
        return a - b

    def backward(self, grad):
        return unbroadcast(grad, self.a_shape), unbroadcast(-grad, self.b_shape)


class Mul(Function):
    def forward(self, a, b):
        self.a, self.b = a, b
        return a * b

    def backward(self, grad):
        ga = unbroadcast(grad * self.b, self.a.shape) if self.needs_input_grad[0] else None
        gb = unbroadcast(grad * self.a, self.b.shape) if self.needs_input_grad[1] else None
        return ga, gb


class Div(Function):
    def forward(self, a, b):
        self.a, self.b = a, b
        return a / b

    def backward(self, grad):
        ga = unbroadcast(grad / self.b, self.a.shape) if self.needs_input_grad[0] else None
        gb = (unbroadcast(-grad * self.a / (self.b * self.b), self.b.shape)
              if self.needs_input_grad[1] else None)
        return ga, gb


class Neg(Function):
    def forward(self, a):
        return -a

    def backward(self, grad):
        return -grad


class Pow(Function):
    """a ** c for a constant exponent c:  d/da = c a^(c-1)."""

    def __init__(self, exponent):
        self.c = exponent

    def forward(self, a):
        if a.dtype.kind == "f":   # a NumPy float64 exponent must not upcast float32
            self.c = a.dtype.type(self.c)
        self.a = a
        return a ** self.c

    def backward(self, grad):
        if self.c == 0:           # a^0 = 1 everywhere; c a^(c-1) would be 0 * inf at a = 0
            return grad * 0
        return grad * (self.c * self.a ** (self.c - 1))


class Exp(Function):
    def forward(self, a):
        self.out = backend.get_array_module(a).exp(a)
        return self.out

    def backward(self, grad):
        return grad * self.out


class Log(Function):
    def forward(self, a):
        self.a = a
        return backend.get_array_module(a).log(a)

    def backward(self, grad):
        return grad / self.a


class Sqrt(Function):
    def forward(self, a):
        self.out = backend.get_array_module(a).sqrt(a)
        return self.out

    def backward(self, grad):
        return grad / (2 * self.out)


class Maximum(Function):
    """Element-wise max; at a tie the whole gradient goes to the first input."""

    def forward(self, a, b):
        self.a_wins = a >= b
        self.a_shape, self.b_shape = a.shape, b.shape
        return backend.get_array_module(a, b).maximum(a, b)

    def backward(self, grad):
        zero = grad.dtype.type(0)
        xp = backend.get_array_module(grad)
        ga = unbroadcast(xp.where(self.a_wins, grad, zero), self.a_shape)
        gb = unbroadcast(xp.where(self.a_wins, zero, grad), self.b_shape)
        return ga, gb


class Cast(Function):
    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)

    def forward(self, a):
        self.in_dtype = a.dtype
        return a.astype(self.dtype)

    def backward(self, grad):
        return grad.astype(self.in_dtype)


# =============================================================================
# Matrix product
# =============================================================================

class MatMul(Function):
    """a @ b with batch broadcasting; both operands have ndim >= 2.

    For y = a b:  dL/da = dL/dy b^T  and  dL/db = a^T dL/dy.
    """

    def forward(self, a, b):
        self.a, self.b = a, b
        return a @ b

    def backward(self, grad):
        xp = backend.get_array_module(grad)
        ga = gb = None
        if self.needs_input_grad[0]:
            ga = unbroadcast(grad @ xp.swapaxes(self.b, -1, -2), self.a.shape)
        if self.needs_input_grad[1]:
            gb = unbroadcast(xp.swapaxes(self.a, -1, -2) @ grad, self.b.shape)
        return ga, gb


def matmul(a, b):
    """Matrix product with NumPy's rules for 1-D operands (promoted, then squeezed)."""
    if a.ndim == 0 or b.ndim == 0:
        raise ValueError(f"matmul: operands must have at least one dimension, "
                         f"got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[-1] != b.shape[-2 if b.ndim > 1 else 0]:
        raise ValueError(f"matmul: shapes {tuple(a.shape)} and {tuple(b.shape)} do not align")
    if a.ndim == 1 and b.ndim == 1:
        return matmul(a.reshape(1, -1), b.reshape(-1, 1)).reshape(())
    if a.ndim == 1:
        return matmul(a.reshape(1, -1), b).reshape(b.shape[:-2] + b.shape[-1:])
    if b.ndim == 1:
        return matmul(a, b.reshape(-1, 1)).reshape(a.shape[:-1])
    return MatMul()(a, b)


# =============================================================================
# Reductions
# =============================================================================

def _normalize_axes(axis, ndim):
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    return tuple(sorted(a % ndim for a in axes))


class Sum(Function):
    """Sum over axes; backward copies the gradient back along the summed axes."""

    def __init__(self, axis=None, keepdims=False):
        self.axis, self.keepdims = axis, keepdims

    def forward(self, a):
        self.in_shape = a.shape
        self.axes = _normalize_axes(self.axis, a.ndim)
        return a.sum(axis=self.axes, keepdims=self.keepdims)

    def backward(self, grad):
        xp = backend.get_array_module(grad)
        if not self.keepdims:
            grad = xp.expand_dims(grad, self.axes) if self.axes else grad
        return xp.broadcast_to(grad, self.in_shape)


class Mean(Sum):
    """Mean = sum / count; the count is a Python int, so no dtype is upcast."""

    def forward(self, a):
        out = super().forward(a)
        self.count = max(1, int(np.prod([a.shape[i] for i in self.axes])))
        return out / out.dtype.type(self.count) if out.dtype.kind == "f" else out / self.count

    def backward(self, grad):
        return super().backward(grad / grad.dtype.type(self.count))


# =============================================================================
# Shape ops
# =============================================================================

class Reshape(Function):
    def __init__(self, shape):
        self.shape = shape

    def forward(self, a):
        self.in_shape = a.shape
        return a.reshape(self.shape)

    def backward(self, grad):
        return grad.reshape(self.in_shape)


class Transpose(Function):
    """Permute axes (reverse them when none are given); backward applies the inverse."""

    def __init__(self, axes=None):
        self.axes = axes

    def forward(self, a):
        axes = self.axes if self.axes is not None else tuple(reversed(range(a.ndim)))
        self.perm = tuple(ax % a.ndim for ax in axes)
        if sorted(self.perm) != list(range(a.ndim)):
            raise ValueError(f"transpose: axes {axes} are not a permutation of {a.ndim} axes")
        return a.transpose(self.perm)

    def backward(self, grad):
        return grad.transpose(tuple(np.argsort(self.perm)))


class GetItem(Function):
    """Indexing and slicing; backward scatters the gradient into zeros.

    Basic slices pick each element at most once, so assignment suffices;
    integer-array indices may repeat an element, so their gradients are added
    with `add.at` (a plain `+=` would keep only one of the repeats).
    """

    def __init__(self, index):
        self.index = _unwrap_index(index)

    def forward(self, a):
        self.in_shape, self.dtype = a.shape, a.dtype
        return a[self.index]

    def backward(self, grad):
        xp = backend.get_array_module(grad)
        out = xp.zeros(self.in_shape, dtype=grad.dtype)
        index = self.index if isinstance(self.index, tuple) else (self.index,)
        if any(hasattr(i, "shape") or isinstance(i, list) for i in index):
            xp.add.at(out, self.index, grad)
        else:
            out[self.index] = grad
        return out


def _unwrap_index(index):
    if isinstance(index, Tensor):
        return index.data
    if isinstance(index, tuple):
        return tuple(i.data if isinstance(i, Tensor) else i for i in index)
    return index


def _topological_order(root):
    """Tensors that `root` depends on through grad-requiring paths, inputs first.

    Iterative depth-first search, so a chain of 100,000 ops does not reach
    Python's recursion limit.
    """
    order, visited = [], set()
    stack = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if children_done:
            order.append(node)
            continue
        if id(node) in visited:
            continue
        visited.add(id(node))
        stack.append((node, True))
        ctx = node._ctx
        if ctx is _FREED:
            raise RuntimeError("backward() through a graph whose saved arrays were already "
                               "released by an earlier backward(); recompute the forward pass")
        if ctx is not None:
            for inp in ctx.inputs:
                if inp.requires_grad and id(inp) not in visited:
                    stack.append((inp, False))
    return order
