"""Optimizers, gradient clipping and an exponential moving average of weights.

Every update is done in place on the parameter arrays, with scalars cast to
the parameters' dtype so float32 stays float32. Each optimizer exposes its
state as a flat {name: array} dict (plus plain numbers) so a checkpoint can
store it in an .npz and a resumed run continues exactly.

On a GPU a training step is launch-bound: the host queues kernels more slowly
than the device runs them (a CuPy call costs 6-13 us of host time), and a loop
over the parameters (the mnist UNet has about 160 arrays) launches a few
kernels for each one. There Adam, the EMA and clip_grad_norm work on flat
buffers instead (see "Flat buffers" below): all parameters are views of one
contiguous 1-D array, and so are Adam's moments, the EMA's shadow and, once
gathered, the gradients, so each update is a handful of kernels over one long
array. The loops over the parameters stay as the readable reference and are
what the CPU runs by default: there the arithmetic, not the calls, is most
of the time (flat=True forces the flat path, as the tests do).
"""
import functools
import math
import operator

import numpy as np

from . import backend


class Optimizer:
    def __init__(self, params, lr):
        self.params = list(params)
        if not self.params:
            raise ValueError(f"{type(self).__name__}: got an empty parameter list")
        if lr < 0:
            raise ValueError(f"{type(self).__name__}: learning rate must be >= 0, got {lr}")
        self.lr = lr

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    def _state_arrays(self):
        """{slot name: list of per-parameter arrays}; subclasses fill it."""
        return {}

    def state_dict(self):
        state = {"step": self.step_count}
        for slot, arrays in self._state_arrays().items():
            for i, a in enumerate(arrays):
                state[f"{slot}.{i}"] = a
        return state

    def load_state_dict(self, state):
        name = type(self).__name__
        expected = {"step"} | {f"{slot}.{i}" for slot, arrays in self._state_arrays().items()
                               for i in range(len(arrays))}
        unexpected = sorted(set(state) - expected)
        if "step" not in state or unexpected:
            raise ValueError(f"{name}.load_state_dict: "
                             + ("missing 'step'" if "step" not in state else "")
                             + (f" unexpected keys {unexpected}" if unexpected else ""))
        self.step_count = int(state["step"])
        for slot, arrays in self._state_arrays().items():
            for i, (p, a) in enumerate(zip(self.params, arrays)):
                key = f"{slot}.{i}"
                if key not in state:
                    raise ValueError(f"{type(self).__name__}.load_state_dict: missing {key!r}")
                value = state[key]
                if tuple(value.shape) != tuple(p.shape):
                    raise ValueError(f"{type(self).__name__}.load_state_dict: {key!r} has shape "
                                     f"{tuple(value.shape)}, parameter {i} has {tuple(p.shape)}")
                a[...] = p.xp.asarray(backend.to_device(value, p.device), dtype=p.dtype)


class SGD(Optimizer):
    """p <- p - lr * v,  v <- momentum * v + g  (PyTorch's form of momentum)."""

    def __init__(self, params, lr, momentum=0.0, weight_decay=0.0):
        super().__init__(params, lr)
        self.momentum, self.weight_decay = momentum, weight_decay
        self.velocity = [p.xp.zeros_like(p.data) for p in self.params]
        self.step_count = 0

    def _state_arrays(self):
        return {"velocity": self.velocity}

    def step(self):
        self.step_count += 1
        for p, v in zip(self.params, self.velocity):
            if p.grad is None:
                continue
            g = p.grad + p.dtype.type(self.weight_decay) * p.data if self.weight_decay else p.grad
            if self.momentum:
                v *= p.dtype.type(self.momentum)
                v += g
                g = v
            p.data -= p.dtype.type(self.lr) * g


class Adam(Optimizer):
    """Adam (Kingma & Ba 2015, Algorithm 1), with L2 weight decay added to g.

    m <- b1 m + (1 - b1) g,  v <- b2 v + (1 - b2) g^2,
    p <- p - lr * m_hat / (sqrt(v_hat) + eps), with m_hat = m / (1 - b1^t),
    v_hat = v / (1 - b2^t) correcting the bias of starting m and v at zero.
    One step counter serves all parameters (PyTorch counts per parameter); the
    two differ only for a parameter that sometimes has no gradient.

    flat: work on flat buffers (True), one array at a time (False), or the
    first on a GPU and the second on the CPU (None). Flat, the parameters'
    `.data` become views of one buffer when the optimizer is made.
    """

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, flat=None):
        super().__init__(params, lr)
        self.betas, self.eps, self.weight_decay = betas, eps, weight_decay
        self.flat = _use_flat(flat, [p.data for p in self.params], "Adam")
        if self.flat:
            self._flat_p = _flatten_params(self.params, None, like=self.params[0].data)
            xp, shapes = self.params[0].xp, [p.shape for p in self.params]
            self._flat_m = _Flat.of(xp.zeros_like(self._flat_p.buffer), shapes)
            self._flat_v = _Flat.of(xp.zeros_like(self._flat_p.buffer), shapes)
            self.m, self.v = self._flat_m.views, self._flat_v.views
        else:
            self.m = [p.xp.zeros_like(p.data) for p in self.params]
            self.v = [p.xp.zeros_like(p.data) for p in self.params]
        self.step_count = 0

    def _state_arrays(self):
        return {"m": self.m, "v": self.v}

    def step(self):
        self.step_count += 1
        b1, b2 = self.betas
        # Fold both bias corrections into one step size: lr sqrt(1-b2^t) / (1-b1^t),
        # and eps scaled to match, so the update needs no extra temporaries.
        c1, c2 = 1 - b1 ** self.step_count, 1 - b2 ** self.step_count
        step_size = self.lr * math.sqrt(c2) / c1
        eps_hat = self.eps * math.sqrt(c2)
        if self.flat:
            p, g = self._flat_arrays()
            if p is not None:
                self._update(p, g, self._flat_m.buffer, self._flat_v.buffer, b1, b2, step_size, eps_hat)
                return
        # One parameter at a time: the reference, and what the CPU runs.
        for p, m, v in zip(self.params, self.m, self.v):
            if p.grad is not None:
                self._update(p.data, p.grad, m, v, b1, b2, step_size, eps_hat)

    def _update(self, p, g, m, v, b1, b2, step_size, eps_hat):
        cast = p.dtype.type
        if self.weight_decay:
            g = g + cast(self.weight_decay) * p
        _adam_update(p, g, m, v, cast(b1), cast(1 - b1), cast(b2), cast(1 - b2),
                     cast(step_size), cast(eps_hat))

    def _flat_arrays(self):
        """(flat parameters, flat gradients) laid out like m and v, or (None, None) where
        this step must go one parameter at a time.

        A parameter without a gradient is skipped by the reference loop; a zero
        gradient in its place would not do the same (its m and v would decay,
        and m / sqrt(v) would still move it), so such a step takes the loop.
        """
        dtype, device = self._flat_m.buffer.dtype, backend.device_of(self._flat_m.buffer)
        for p in self.params:
            g = p.grad
            if g is None or g.shape != p.shape or g.dtype != dtype or backend.device_of(g) != device:
                return None, None
        flat_p = _flatten_params(self.params, self._flat_p, like=self._flat_m.buffer)
        if flat_p is None:
            return None, None
        self._flat_p = flat_p
        return flat_p.buffer, _gather_grads(self.params)


@backend.elementwise
def _adam_update(xp):
    """Adam's update of one parameter (or of the flat buffer of all), in place: one kernel on a GPU."""
    def update(p, g, m, v, b1, one_minus_b1, b2, one_minus_b2, step_size, eps_hat):
        m *= b1
        m += one_minus_b1 * g
        v *= b2
        v += one_minus_b2 * (g * g)
        p -= step_size * m / (xp.sqrt(v) + eps_hat)
    return update


def clip_grad_norm(params, max_norm, flat=None):
    """Scale all gradients together so their global L2 norm is at most max_norm.

    Returns the norm before clipping, in the gradients' dtype and on their
    device: a 0-d array (NumPy gives a scalar), as PyTorch returns a tensor.
    Nothing here reads a value back to the host, so on a GPU a step that does
    not read the norm goes on without waiting for the device: the factor
    (max_norm / norm where the norm is over the limit, else 1; a NaN norm
    leaves the gradients as they are) stays on the device and every gradient
    is multiplied by it, even when nothing is clipped: the price of not
    asking the host. Reading the result (float(norm), a comparison) is what
    waits, where the caller chooses to.

    flat (None: on a GPU): first gather the gradients into one flat buffer
    and make each `.grad` a view of it, then one product gives the norm and
    one multiplication scales them all; Adam then finds them gathered.
    """
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        return np.float64(0.0)
    grads = [p.grad for p in with_grad]
    xp = backend.get_array_module(grads[0])
    if _use_flat(flat, grads, "clip_grad_norm"):
        g = _gather_grads(with_grad)
        # The same sum of squares as below in another order: equal up to rounding.
        total = xp.sqrt(xp.vdot(g, g))
        g *= _clip_factor(xp, total, max_norm).astype(g.dtype, copy=False)
        return total
    # Summed term by term, as 0-d arrays: on CuPy one tiny kernel each and no
    # transfer (stacking many arrays copies a table of their addresses from the
    # host), and no Python int to start from (NumPy 1.x would widen float32).
    squares = [xp.vdot(g.ravel(), g.ravel()) for g in grads]
    total = xp.sqrt(functools.reduce(operator.add, squares))
    factor = _clip_factor(xp, total, max_norm)
    in_dtype = {}
    for g in grads:
        if g.dtype not in in_dtype:
            in_dtype[g.dtype] = factor.astype(g.dtype, copy=False)
        g *= in_dtype[g.dtype]
    return total


def _clip_factor(xp, total, max_norm):
    # The 1e-6 (PyTorch's too) leaves the clipped norm a hair under max_norm.
    return xp.where(total > max_norm, max_norm / (total + 1e-6), xp.ones_like(total))


class EMA:
    """Exponential moving average of parameters: shadow <- d shadow + (1 - d) p.

    DDPM samples from these averaged weights (decay 0.9999 in the paper; short
    runs want less, since the average remembers ~1/(1-d) steps).

    flat: as for Adam (None: on a GPU); flat, the shadow is one buffer and the
    parameters' `.data` views of one buffer (the one Adam made, if it came first).
    """

    def __init__(self, params, decay=0.9999, flat=None):
        if not 0 <= decay < 1:
            raise ValueError(f"EMA: decay must be in [0, 1), got {decay}")
        self.params = list(params)
        self.decay = decay
        self.flat = bool(self.params) and _use_flat(flat, [p.data for p in self.params], "EMA")
        if self.flat:
            self._flat_p = _flatten_params(self.params, None, like=self.params[0].data)
            self._flat_shadow = _Flat.of(self._flat_p.buffer.copy(), [p.shape for p in self.params])
            self.shadow = self._flat_shadow.views
        else:
            self.shadow = [p.data.copy() for p in self.params]

    def update(self):
        if self.flat:
            flat_p = _flatten_params(self.params, self._flat_p, like=self._flat_shadow.buffer)
            if flat_p is not None:
                self._flat_p = flat_p
                s = self._flat_shadow.buffer
                d = s.dtype.type(self.decay)
                _ema_update(s, flat_p.buffer, d, 1 - d)
                return
        # One parameter at a time: the reference, and what the CPU runs.
        for p, s in zip(self.params, self.shadow):
            d = p.dtype.type(self.decay)
            _ema_update(s, p.data, d, 1 - d)

    def copy_to(self, model_or_params):
        """Write the averaged weights into a model (or list of parameters) of the same shapes."""
        targets = model_or_params.parameters() if hasattr(model_or_params, "parameters") \
            else list(model_or_params)
        if len(targets) != len(self.shadow):
            raise ValueError(f"EMA.copy_to: {len(targets)} parameters, EMA holds {len(self.shadow)}")
        for p, s in zip(targets, self.shadow):
            if tuple(p.shape) != tuple(s.shape):
                raise ValueError(f"EMA.copy_to: shape {tuple(p.shape)} vs {tuple(s.shape)}")
            p.data[...] = backend.to_device(s, p.device)

    def state_dict(self):
        return {f"shadow.{i}": s for i, s in enumerate(self.shadow)}

    def load_state_dict(self, state):
        for i, s in enumerate(self.shadow):
            key = f"shadow.{i}"
            if key not in state or tuple(state[key].shape) != tuple(s.shape):
                raise ValueError(f"EMA.load_state_dict: {key!r} missing or of the wrong shape")
            s[...] = backend.to_device(state[key], self.params[i].device)


@backend.elementwise
def _ema_update(xp):
    """shadow <- d shadow + (1 - d) p, in place: one kernel on a GPU."""
    def update(shadow, p, d, one_minus_d):
        shadow *= d
        shadow += one_minus_d * p
    return update


# =============================================================================
# Flat buffers
# =============================================================================
#
# A buffer is flat when it is one contiguous 1-D array and a list of views of
# it, consecutive and in parameter order, fills it: view i shaped like
# parameter i. Adam's m and v and the EMA's shadow are such buffers from the
# start. For the parameters themselves the optimizer copies each one's values
# into a flat buffer once and rebinds `p.data` to its view, so that in-place
# updates of the buffer are updates of the parameters. Gradients are gathered
# into one each step (one concatenate, a single kernel on CuPy) and `p.grad`
# rebound likewise, so the clipping that scales the buffer scales the `.grad`
# that Adam or a caller reads.
#
# Anything may rebind `p.data` afterwards (Module.to, a user's assignment,
# autograd.processes.GradientSplit, which moves the parameters into memory
# shared with its worker processes while its block is open). Updating the old
# buffer would then change nothing the model computes with, so before each
# step the parameters are checked: the same array objects as the views handed
# out (an array's memory never moves, so the same object is the same view).
# Where they are not, and the new arrays are themselves a flat buffer (another
# optimizer flattened them again, GradientSplit's shared copy), that one is
# used; where they are not, one is made again from their current values. Only
# parameters of another dtype or device than the optimizer's state (Module.to
# the other device) send the step back to the loop over parameters, which then
# fails or not as it would have before.
#
# Two flat owners should hold the same parameters in the same order (Adam and
# the EMA of `tinyddpm train` do): an optimizer over a subset beside an EMA
# over all would flatten the parameters again at each of their steps, a
# concatenate and a rebind each time. And an optimizer keeps the buffer it
# found until its next step, GradientSplit's shared memory too after the
# block closed.

def _use_flat(flat, arrays, who):
    """Whether to work on flat buffers: `flat` when given, else on a GPU; one dtype and device needed."""
    if flat is False or (flat is None and not backend.is_cuda_array(arrays[0])):
        return False
    uniform = (len({a.dtype for a in arrays}) == 1 and len({backend.device_of(a) for a in arrays}) == 1
               and len({id(a) for a in arrays}) == len(arrays))     # and no array listed twice
    if flat and not uniform:
        raise ValueError(f"{who}: flat=True needs distinct arrays of one dtype on one device")
    return uniform


class _Flat:
    """A contiguous 1-D buffer and, in order, one view of it per parameter."""

    def __init__(self, buffer, views):
        self.buffer, self.views = buffer, views

    @classmethod
    def of(cls, buffer, shapes):
        views, offset = [], 0
        for shape in shapes:
            n = math.prod(shape)
            views.append(buffer[offset:offset + n].reshape(shape))
            offset += n
        if offset != buffer.size:
            raise ValueError(f"a flat buffer of {buffer.size} values for shapes holding {offset}")
        return cls(buffer, views)

    @classmethod
    def made_of(cls, arrays):
        """A new flat buffer holding copies of the arrays' values."""
        xp = backend.get_array_module(arrays[0])
        return cls.of(xp.concatenate([a.ravel() for a in arrays]), [a.shape for a in arrays])

    @classmethod
    def found(cls, arrays):
        """The flat buffer the arrays are, if they are consecutive views of one 1-D array, in
        order: the slice of it they fill (the whole array, or a part when the parameters are
        some of another optimizer's). Else None."""
        base = arrays[0].base       # NumPy and CuPy point a view of a view at the array first cut
        if type(base) is not type(arrays[0]) or base.ndim != 1 or not base.flags.c_contiguous:
            return None
        start = end = backend.data_address(arrays[0])
        for a in arrays:
            if a.base is not base or a.dtype != base.dtype or not a.flags.c_contiguous \
                    or backend.data_address(a) != end:
                return None
            end += a.nbytes
        first = (start - backend.data_address(base)) // base.itemsize
        return cls(base[first:first + (end - start) // base.itemsize], list(arrays))


def _flatten_params(params, flat, like):
    """The parameters' `.data` as a flat buffer (see above), or None where some are not of
    `like`'s dtype and device. flat: what the last call returned, checked first."""
    if flat is not None and all(p.data is view for p, view in zip(params, flat.views)):
        return flat
    datas = [p.data for p in params]
    device = backend.device_of(like)
    if any(d.dtype != like.dtype or backend.device_of(d) != device for d in datas):
        return None
    found = _Flat.found(datas)
    if found is not None:
        return found
    made = _Flat.made_of(datas)
    for p, view in zip(params, made.views):
        p.data = view
    return made


def _gather_grads(params):
    """The parameters' gradients (none missing) as one flat buffer, each `.grad` a view of it."""
    grads = [p.grad for p in params]
    flat = _Flat.found(grads)
    if flat is None:
        flat = _Flat.made_of(grads)
        for p, view in zip(params, flat.views):
            p.grad = view
    return flat.buffer
