"""The ops a network is built from, as functions on Tensors (import as F).

Each op is a small Function class, forward and backward side by side, followed
by the lowercase function users call, which checks its arguments and names the
shapes when they do not fit. The heavier array work (convolution, group norm,
attention) is done by the kernels of `kernels/`, plain functions on arrays
whose formulas their docstrings give; here they are only wired into the graph.
"""
import numpy as np

from . import backend, seam
from .kernels import activations, attention as attn_k, conv as conv_k, norm as norm_k
from .tensor import Function, Tensor


def _as_tensor(x):
    return x if isinstance(x, Tensor) else Tensor(x)


def _check_float_dtypes(op, *tensors):
    dtypes = {t.dtype for t in tensors if t is not None}
    if len(dtypes) > 1:
        raise TypeError(f"{op}: inputs have different dtypes {sorted(map(str, dtypes))}")


def _shape(t):
    return tuple(t.shape)


# =============================================================================
# Activations
# =============================================================================

class ReLU(Function):
    def forward(self, x):
        self.positive = x > 0
        return x * self.positive

    def backward(self, grad):
        return grad * self.positive


class Sigmoid(Function):
    def forward(self, x):
        self.y = activations.sigmoid(x)
        return self.y

    def backward(self, grad):
        return grad * self.y * (1 - self.y)


class Tanh(Function):
    def forward(self, x):
        self.y = backend.get_array_module(x).tanh(x)
        return self.y

    def backward(self, grad):
        return grad * (1 - self.y * self.y)


class SiLU(Function):
    """x * sigmoid(x) (Elfwing et al. 2018);  d/dx = s (1 + x (1 - s)) with s = sigmoid(x)."""

    def forward(self, x):
        y, self.s = activations.silu_forward(x)
        self.x = x
        return y

    def backward(self, grad):
        return activations.silu_backward(grad, self.x, self.s)


def relu(x):
    return ReLU()(_as_tensor(x))


def sigmoid(x):
    return Sigmoid()(_as_tensor(x))


def tanh(x):
    return Tanh()(_as_tensor(x))


def silu(x):
    return SiLU()(_as_tensor(x))


# =============================================================================
# Softmax family
# =============================================================================

class Softmax(Function):
    def __init__(self, axis):
        self.axis = axis

    def forward(self, x):
        self.y = attn_k.softmax_forward(x, self.axis)
        return self.y

    def backward(self, grad):
        return attn_k.softmax_backward(grad, self.y, self.axis)


class LogSoftmax(Function):
    """x - logsumexp(x);  d/dx: g - softmax(x) * sum(g)."""

    def __init__(self, axis):
        self.axis = axis

    def forward(self, x):
        xp = backend.get_array_module(x)
        shifted = x - x.max(axis=self.axis, keepdims=True)
        y = shifted - xp.log(xp.exp(shifted).sum(axis=self.axis, keepdims=True))
        self.softmax = xp.exp(y)
        return y

    def backward(self, grad):
        return grad - self.softmax * grad.sum(axis=self.axis, keepdims=True)


def softmax(x, axis=-1):
    return Softmax(axis)(_as_tensor(x))


def log_softmax(x, axis=-1):
    return LogSoftmax(axis)(_as_tensor(x))


# =============================================================================
# Linear layer
# =============================================================================

class Linear(Function):
    """y = x W^T + b for x (..., in), W (out, in), b (out,)."""

    def forward(self, x, w, b=None):
        self.x, self.w = x, w
        y = x @ w.T
        return y if b is None else y + b

    def backward(self, grad):
        out_f, in_f = self.w.shape
        g2 = grad.reshape(-1, out_f)
        dx = grad @ self.w if self.needs_input_grad[0] else None
        dw = g2.T @ self.x.reshape(-1, in_f) if self.needs_input_grad[1] else None
        if len(self.needs_input_grad) == 2:
            return dx, dw
        db = g2.sum(axis=0) if self.needs_input_grad[2] else None
        return dx, dw, db


def linear(x, w, b=None):
    """x (..., in) @ w.T + b, with w (out, in) as PyTorch."""
    x, w = _as_tensor(x), _as_tensor(w)
    if w.ndim != 2 or x.ndim < 1 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"linear: input {_shape(x)} does not fit weight {_shape(w)} "
                         "(expected input (..., in_features) and weight (out_features, in_features))")
    if b is not None and _shape(b) != (w.shape[0],):
        raise ValueError(f"linear: bias {_shape(b)} does not fit weight {_shape(w)}")
    _check_float_dtypes("linear", x, w, b)
    return Linear()(x, w) if b is None else Linear()(x, w, _as_tensor(b))


# =============================================================================
# Convolution and upsampling
# =============================================================================

class Conv2d(Function):
    """y = conv(x, w) + b; inputs (x, w) or (x, w, b). The arithmetic is in kernels/conv.py."""

    def __init__(self, stride, padding):
        self.stride, self.padding = stride, padding

    def forward(self, x, w, b=None):
        self.x, self.w = x, w
        return conv_k.conv2d_forward(x, w, b, self.stride, self.padding)

    def backward(self, grad):
        need = self.needs_input_grad
        dx, dw, db = conv_k.conv2d_backward(grad, self.x, self.w, self.stride, self.padding,
                                            need_x=need[0], need_w=need[1],
                                            need_b=len(need) == 3 and need[2])
        return (dx, dw, db) if len(need) == 3 else (dx, dw)


def conv2d(x, w, b=None, stride=1, padding=0):
    """2-D cross-correlation, NCHW, weight (C_out, C_in, kH, kW), as PyTorch's conv2d."""
    x, w = _as_tensor(x), _as_tensor(w)
    if x.ndim != 4 or w.ndim != 4:
        raise ValueError(f"conv2d: expected input (B, C, H, W) and weight (C_out, C_in, kH, kW), "
                         f"got input {_shape(x)} and weight {_shape(w)}")
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"conv2d: input {_shape(x)} has {x.shape[1]} channels but weight "
                         f"{_shape(w)} expects {w.shape[1]}")
    if int(stride) != stride or stride < 1 or int(padding) != padding or padding < 0:
        raise ValueError(f"conv2d: stride must be >= 1 and padding >= 0, got {stride} and {padding}")
    H, W = x.shape[2] + 2 * padding, x.shape[3] + 2 * padding
    if H < w.shape[2] or W < w.shape[3]:
        raise ValueError(f"conv2d: kernel {_shape(w)[2:]} is larger than the padded input "
                         f"({H}, {W}) of {_shape(x)}")
    if b is not None and _shape(b) != (w.shape[0],):
        raise ValueError(f"conv2d: bias {_shape(b)} does not fit weight {_shape(w)}")
    _check_float_dtypes("conv2d", x, w, b)
    fn = Conv2d(int(stride), int(padding))
    return fn(x, w) if b is None else fn(x, w, _as_tensor(b))


class UpsampleNearest2d(Function):
    def __init__(self, scale):
        self.scale = scale

    def forward(self, x):
        return conv_k.upsample_nearest2d_forward(x, self.scale)

    def backward(self, grad):
        return conv_k.upsample_nearest2d_backward(grad, self.scale)


def upsample_nearest2d(x, scale_factor=2):
    x = _as_tensor(x)
    if x.ndim != 4:
        raise ValueError(f"upsample_nearest2d: expected (B, C, H, W), got {_shape(x)}")
    if int(scale_factor) != scale_factor or scale_factor < 1:
        raise ValueError(f"upsample_nearest2d: scale_factor must be a positive integer, got {scale_factor}")
    return UpsampleNearest2d(int(scale_factor))(x)


# =============================================================================
# Group normalization
# =============================================================================

class GroupNorm(Function):
    """The arithmetic is in kernels/norm.py; `saved` is whatever its backward needs.

    A faster twin (autograd/fast) saves other things than the plain kernel, so
    the backward kernel is the one that goes with the forward that ran, chosen
    at the forward: switching autograd.fast between the two passes is harmless.
    """

    def __init__(self, num_groups, eps):
        self.num_groups, self.eps = num_groups, eps

    def forward(self, x, weight, bias):
        self.backward_kernel = seam.current(norm_k.group_norm_backward)
        y, self.saved = norm_k.group_norm_forward(x, self.num_groups, weight, bias, self.eps)
        return y

    def backward(self, grad):
        return self.backward_kernel(grad, self.saved)


class GroupNormSiLU(Function):
    """silu(group_norm(x)) as one op: every GroupNorm of the UNet is followed by SiLU.

    Same value and gradients as the two ops in a row (the tests' oracle). As
    one op its kernels may work in fewer passes over memory and save less
    for the backward, which the fast layer's twins do.
    """

    def __init__(self, num_groups, eps):
        self.num_groups, self.eps = num_groups, eps

    def forward(self, x, weight, bias):
        self.backward_kernel = seam.current(norm_k.group_norm_silu_backward)    # as GroupNorm's
        y, self.saved = norm_k.group_norm_silu_forward(x, self.num_groups, weight, bias, self.eps)
        return y

    def backward(self, grad):
        return self.backward_kernel(grad, self.saved)


def _group_norm_args(op, x, num_groups, weight, bias):
    """Checked (x, weight, bias) Tensors; weight 1 and bias 0 when not given."""
    x = _as_tensor(x)
    if x.ndim < 2:
        raise ValueError(f"{op}: expected (B, C, ...), got {_shape(x)}")
    C = x.shape[1]
    if num_groups < 1 or C % num_groups != 0:
        raise ValueError(f"{op}: {C} channels of input {_shape(x)} cannot be split "
                         f"into {num_groups} groups")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and _shape(p) != (C,):
            raise ValueError(f"{op}: {name} {_shape(p)} does not fit {C} channels of {_shape(x)}")
    # Without an affine transform the op is the same with weight 1 and bias 0.
    weight = _as_tensor(weight) if weight is not None else Tensor(x.xp.ones(C, dtype=x.dtype))
    bias = _as_tensor(bias) if bias is not None else Tensor(x.xp.zeros(C, dtype=x.dtype))
    _check_float_dtypes(op, x, weight, bias)
    return x, weight, bias


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5):
    """Normalize each group of C/num_groups channels of each example; x (B, C, ...)."""
    return GroupNorm(num_groups, eps)(*_group_norm_args("group_norm", x, num_groups, weight, bias))


def group_norm_silu(x, num_groups, weight=None, bias=None, eps=1e-5):
    """silu(group_norm(x, num_groups, weight, bias, eps)) as one op."""
    return GroupNormSiLU(num_groups, eps)(*_group_norm_args("group_norm_silu", x, num_groups,
                                                            weight, bias))


# =============================================================================
# Attention
# =============================================================================

class Attention(Function):
    def forward(self, q, k, v):
        out, p = attn_k.attention_forward(q, k, v)
        self.q, self.k, self.v, self.p = q, k, v, p
        return out

    def backward(self, grad):
        return attn_k.attention_backward(grad, self.q, self.k, self.v, self.p)


def attention(q, k, v):
    """softmax(q k^T / sqrt(d)) v for q (B, Nq, d), k (B, Nk, d), v (B, Nk, dv)."""
    q, k, v = _as_tensor(q), _as_tensor(k), _as_tensor(v)
    if q.ndim != 3 or k.ndim != 3 or v.ndim != 3:
        raise ValueError(f"attention: expected 3-D q, k, v (B, N, d), got {_shape(q)}, {_shape(k)}, {_shape(v)}")
    if q.shape[0] != k.shape[0] or k.shape[0] != v.shape[0] or q.shape[2] != k.shape[2] \
            or k.shape[1] != v.shape[1]:
        raise ValueError(f"attention: q {_shape(q)}, k {_shape(k)}, v {_shape(v)} do not fit "
                         "(need q (B, Nq, d), k (B, Nk, d), v (B, Nk, dv))")
    _check_float_dtypes("attention", q, k, v)
    return Attention()(q, k, v)


# =============================================================================
# Joining, dropout, losses
# =============================================================================

class Concat(Function):
    def __init__(self, axis):
        self.axis = axis

    def forward(self, *xs):
        self.sizes = [x.shape[self.axis] for x in xs]
        return backend.get_array_module(*xs).concatenate(xs, axis=self.axis)

    def backward(self, grad):
        xp = backend.get_array_module(grad)
        bounds = np.cumsum(self.sizes)[:-1].tolist()
        return tuple(xp.split(grad, bounds, axis=self.axis))


def concat(xs, axis=0):
    xs = [_as_tensor(x) for x in xs]
    if not xs:
        raise ValueError("concat: needs at least one tensor")
    ndim = xs[0].ndim
    axis = axis % ndim if ndim else axis
    for x in xs:
        if x.ndim != ndim or any(x.shape[i] != xs[0].shape[i] for i in range(ndim) if i != axis):
            raise ValueError(f"concat along axis {axis}: shapes {[_shape(t) for t in xs]} "
                             "differ outside that axis")
    _check_float_dtypes("concat", *xs)
    return Concat(axis)(*xs)


class Dropout(Function):
    def __init__(self, keep_mask_scaled):
        self.mask = keep_mask_scaled

    def forward(self, x):
        return x * self.mask

    def backward(self, grad):
        return grad * self.mask


def dropout(x, p, training=True, rng=None):
    """Zero each element with probability p and scale the rest by 1/(1-p)
    (inverted dropout: evaluation then needs no rescaling). `rng` is a NumPy or
    CuPy Generator on x's device; by default the device's global generator."""
    x = _as_tensor(x)
    if not 0 <= p < 1:
        raise ValueError(f"dropout: p must be in [0, 1), got {p}")
    if not training or p == 0:
        return x
    rng = rng if rng is not None else backend.global_rng(x.device)
    keep = rng.random(x.shape, dtype=x.dtype) >= p
    return Dropout(keep * x.dtype.type(1 / (1 - p)))(x)


class MSELoss(Function):
    """mean((a - b)^2);  d/da = 2 (a - b) / n,  d/db = -d/da."""

    def forward(self, a, b):
        self.diff = a - b
        return (self.diff * self.diff).mean()

    def backward(self, grad):
        ga = grad * (2 / self.diff.size) * self.diff
        return ga, -ga


def mse_loss(a, b):
    a, b = _as_tensor(a), _as_tensor(b)
    if _shape(a) != _shape(b):
        raise ValueError(f"mse_loss: shapes {_shape(a)} and {_shape(b)} differ")
    _check_float_dtypes("mse_loss", a, b)
    return MSELoss()(a, b)


def cross_entropy(logits, labels):
    """Mean of -log softmax(logits)[label] over the batch; logits (B, K), labels int (B,)."""
    logits = _as_tensor(logits)
    labels = labels.data if isinstance(labels, Tensor) else labels
    if logits.ndim != 2 or labels.ndim != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(f"cross_entropy: expected logits (B, K) and labels (B,), got "
                         f"{_shape(logits)} and {tuple(labels.shape)}")
    xp = logits.xp
    labels = xp.asarray(labels)
    picked = log_softmax(logits, axis=1)[xp.arange(labels.shape[0]), labels]
    return -picked.mean()
