"""Softmax and scaled dot-product attention on raw arrays (Vaswani et al. 2017), one head.

    S = q k^T / sqrt(d),   P = softmax(S) over the keys,   O = P v

for q (B, Nq, d), k (B, Nk, d), v (B, Nk, dv). Backward, with G = dL/dO:

    dv = P^T G,   dP = G v^T,   dS = P * (dP - rowsum(dP * P)),
    dq = dS k / sqrt(d),   dk = dS^T q / sqrt(d)

(the middle line is the softmax's backward). The forward keeps P, so the
backward needs no exponentials; for MNIST's 7x7 and 14x14 maps P is small
(at most 196 x 196 per image).
"""
from ..backend import get_array_module
from ..seam import swappable


def softmax_forward(x, axis=-1):
    """exp(x - max) / sum: subtracting the max keeps exp from overflowing."""
    xp = get_array_module(x)
    e = xp.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def softmax_backward(grad, y, axis=-1):
    """dL/dx = y * (g - sum(g * y)): the Jacobian diag(y) - y y^T applied to g."""
    return y * (grad - (grad * y).sum(axis=axis, keepdims=True))


def _swap(a):
    return a.transpose(0, 2, 1)                                         # (B, N, d) -> (B, d, N)


@swappable
def attention_forward(q, k, v):
    """-> (O, P): the output and the attention weights, which the backward needs."""
    scale = q.dtype.type(q.shape[-1] ** -0.5)
    p = softmax_forward((q @ _swap(k)) * scale)                         # (B, Nq, Nk)
    return p @ v, p                                                     # (B, Nq, dv)


@swappable
def attention_backward(grad, q, k, v, p):
    """(dq, dk, dv) for dL/dO = grad."""
    scale = q.dtype.type(q.shape[-1] ** -0.5)
    dv = _swap(p) @ grad                                                # (B, Nk, dv)
    ds = softmax_backward(grad @ _swap(v), p) * scale                   # (B, Nq, Nk)
    return ds @ k, _swap(ds) @ q, dv
