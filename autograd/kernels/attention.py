"""Scaled dot-product attention on raw arrays (Vaswani et al. 2017), one head.

    S = q k^T / sqrt(d),   P = softmax(S) over the keys,   O = P v
for q (B, Nq, d), k (B, Nk, d), v (B, Nk, dv).

Backward, with G = dL/dO:
    dv = P^T G,   dP = G v^T,   dS = P * (dP - rowsum(dP * P)),
    dq = dS k / sqrt(d),   dk = dS^T q / sqrt(d)
(the middle line is the softmax's backward). Forward keeps P, so backward does
no exponentials; for MNIST's 7x7 and 14x14 maps P is small (N <= 196).
"""
from ..backend import get_array_module


def softmax_forward(x, axis=-1):
    """exp(x - max) / sum: subtracting the max keeps exp from overflowing.

    One new array, updated in place (exp, then the division), since the
    attention weights are the largest arrays of an attention block.
    """
    xp = get_array_module(x)
    e = x - x.max(axis=axis, keepdims=True)
    xp.exp(e, out=e)
    e /= e.sum(axis=axis, keepdims=True)
    return e


def softmax_backward(grad, y, axis=-1):
    """dL/dx = y * (g - sum(g * y)): the Jacobian diag(y) - y y^T applied to g."""
    d = grad * y
    dot = d.sum(axis=axis, keepdims=True)
    d -= y * dot
    return d


def attention_forward(q, k, v):
    """-> (O, P): the output and the attention weights saved for backward."""
    xp = get_array_module(q, k, v)
    scale = q.dtype.type(q.shape[-1] ** -0.5)
    s = xp.matmul(q, k.transpose(0, 2, 1))                              # (B, Nq, Nk)
    s *= scale
    p = softmax_forward(s)
    return xp.matmul(p, v), p                                          # (B, Nq, dv)


def attention_backward(grad, q, k, v, p):
    xp = get_array_module(grad, q, k, v)
    scale = q.dtype.type(q.shape[-1] ** -0.5)
    dv = xp.matmul(p.transpose(0, 2, 1), grad)                         # (B, Nk, dv)
    ds = softmax_backward(xp.matmul(grad, v.transpose(0, 2, 1)), p)    # (B, Nq, Nk)
    ds *= scale
    dq = xp.matmul(ds, k)
    dk = xp.matmul(ds.transpose(0, 2, 1), q)
    return dq, dk, dv
