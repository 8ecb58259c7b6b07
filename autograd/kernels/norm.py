"""Group normalization on raw arrays (Wu & He 2018), alone and followed by SiLU.

The C channels are split into G groups; each (example, group) is normalized
by the mean and variance of its C/G channels over all pixels, then each
channel gets its own scale and shift:

    xhat = (x - mean) / sqrt(var + eps),   y = weight * xhat + bias

Backward, per (example, group) of N values, with dxhat = dL/dy * weight:

    dL/dx = (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) / sqrt(var + eps)

(the two means subtract what flows back through the mean and through the
variance). dL/dweight and dL/dbias sum dL/dy * xhat and dL/dy over the batch
and the pixels of each channel.

Every GroupNorm of the UNet is followed by SiLU, so the pair is also a kernel
of its own (`group_norm_silu_*`): here simply the two composed, which autograd/fast
replaces by one pass over memory. The forward kernels return (y, saved): what
their backward needs, which a faster twin may choose differently.
"""
from ..backend import get_array_module
from ..seam import swappable
from .activations import silu_backward, silu_forward


@swappable
def group_norm_forward(x, num_groups, weight, bias, eps):
    """x (B, C, ...), weight and bias (C,) -> (y, saved)."""
    xp = get_array_module(x)
    B, C = x.shape[:2]
    xg = x.reshape(B, num_groups, -1)                                   # (B, G, C/G * pixels)
    mean = xg.mean(axis=2, keepdims=True)
    centered = xg - mean
    var = (centered * centered).mean(axis=2, keepdims=True)
    rstd = 1 / xp.sqrt(var + x.dtype.type(eps))                         # (B, G, 1)
    xhat = (centered * rstd).reshape(x.shape)
    channel = (1, C) + (1,) * (x.ndim - 2)                               # broadcast over pixels
    y = xhat * weight.reshape(channel) + bias.reshape(channel)
    return y, (xhat, rstd, weight, num_groups)


@swappable
def group_norm_backward(grad, saved):
    """(dL/dx, dL/dweight, dL/dbias) for dL/dy = grad."""
    xhat, rstd, weight, num_groups = saved
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


@swappable
def group_norm_silu_forward(x, num_groups, weight, bias, eps):
    """silu(group_norm(x)) -> (y, saved)."""
    z, norm_saved = group_norm_forward.plain(x, num_groups, weight, bias, eps)
    y, s = silu_forward(z)
    return y, (norm_saved, z, s)


@swappable
def group_norm_silu_backward(grad, saved):
    """The chain rule through SiLU, then through the group norm."""
    norm_saved, z, s = saved
    return group_norm_backward.plain(silu_backward(grad, z, s), norm_saved)
