"""Group normalization on raw arrays (Wu & He 2018).

The channels are split into G groups; each (example, group) is normalized by
its own mean and variance over the group's channels and all pixels, then each
channel gets its own scale and shift:

    xhat = (x - mean) / sqrt(var + eps),   y = weight * xhat + bias

Backward, per (example, group) of N values, with dxhat = dL/dy * weight:

    dL/dx = (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) / sqrt(var + eps)

(the two means subtract what flows through the mean and through the variance).
The forward saves xhat and 1/sqrt(var + eps) so backward recomputes nothing.
`group_norm_reference` in the tests composes the same thing from primitive
Tensor ops and is the oracle for this fused version.
"""
from ..backend import get_array_module


def group_norm_forward(x, num_groups, weight, bias, eps):
    """x (B, C, ...), weight and bias (C,) -> y, saved (xhat, rstd)."""
    xp = get_array_module(x)
    B, C = x.shape[:2]
    xg = x.reshape(B, num_groups, -1)                                   # (B, G, C/G * H * W)
    mean = xg.mean(axis=2, keepdims=True)
    centered = xg - mean
    var = (centered * centered).mean(axis=2, keepdims=True)
    rstd = 1 / xp.sqrt(var + x.dtype.type(eps))                         # (B, G, 1)
    xhat = (centered * rstd).reshape(x.shape)
    channel = (1, C) + (1,) * (x.ndim - 2)                               # broadcast over pixels
    y = xhat * weight.reshape(channel) + bias.reshape(channel)
    return y, xhat, rstd


def group_norm_backward(grad, xhat, rstd, num_groups, weight):
    """(dx, dweight, dbias) for dL/dy = grad."""
    B, C = grad.shape[:2]
    pixel_axes = (0,) + tuple(range(2, grad.ndim))
    dweight = (grad * xhat).sum(axis=pixel_axes)
    dbias = grad.sum(axis=pixel_axes)
    channel = (1, C) + (1,) * (grad.ndim - 2)
    dxhat = (grad * weight.reshape(channel)).reshape(B, num_groups, -1)
    xhat_g = xhat.reshape(B, num_groups, -1)
    dx = (dxhat - dxhat.mean(axis=2, keepdims=True)
          - xhat_g * (dxhat * xhat_g).mean(axis=2, keepdims=True)) * rstd
    return dx.reshape(grad.shape), dweight, dbias
