"""Group normalization on raw arrays (Wu & He 2018).

The channels are split into G groups; each (example, group) is normalized by
its own mean and variance over the group's channels and all pixels, then each
channel gets its own scale and shift:

    xhat = (x - mean) / sqrt(var + eps),   y = weight * xhat + bias

Backward, per (example, group) of N values, with dxhat = dL/dy * weight:

    dL/dx = (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) / sqrt(var + eps)

(the two means subtract what flows through the mean and through the variance).
`group_norm_forward`/`group_norm_backward` below are these formulas written
out (saving xhat), the readable version; the fused pair after them is what
`F.group_norm` runs, checked by the tests against a group norm composed from
primitive Tensor ops.

The fused version makes fewer passes over memory and fewer full-size
temporaries, which is what these element-wise ops cost on a CPU:
- forward: two reductions give the mean and E[x^2] (var = E[x^2] - mean^2,
  clamped at 0; fine while |mean| is not hundreds of standard deviations),
  then y = x * a + c with a, c per (example, channel): one multiply, one add.
- backward: saves x (kept alive anyway by the op before) and the (B, G)
  statistics instead of a full-size xhat. Two reductions per (example,
  channel), sum(g) and sum(g * x), give every term, and dL/dx collapses to
  g * alpha + x * beta + gamma with per-(example, channel/group) coefficients:
  expanding xhat = (x - mean) rstd in the formula above,
      alpha = rstd w,   beta = -rstd^2 mean(dxhat xhat),
      gamma = rstd (mean rstd mean(dxhat xhat) - mean(dxhat)).
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


# =============================================================================
# Fused version (what F.group_norm runs)
# =============================================================================

def group_norm_fused_forward(x, num_groups, weight, bias, eps):
    """x (B, C, ...), weight and bias (C,) -> y, saved (mean, rstd), each (B, G)."""
    xp = get_array_module(x)
    B, C = x.shape[:2]
    G = num_groups
    f = x.dtype.type
    xg = x.reshape(B, G, -1)                                            # (B, G, C/G * H * W)
    n = f(xg.shape[2])
    mean = xg.sum(axis=2) / n
    var = xp.einsum("bgn,bgn->bg", xg, xg) / n - mean * mean           # E[x^2] - mean^2, no temporary
    rstd = 1 / xp.sqrt(xp.maximum(var, f(0)) + f(eps))                 # (B, G)
    # y = (x - mean) rstd w + b = x a + c, with a and c per (example, channel)
    a = rstd[:, :, None] * weight.reshape(G, -1)                        # (B, G, C/G)
    c = bias.reshape(G, -1) - mean[:, :, None] * a
    x3 = x.reshape(B, C, -1)
    y = x3 * a.reshape(B, C, 1)
    y += c.reshape(B, C, 1)
    return y.reshape(x.shape), mean, rstd


def group_norm_fused_backward(grad, x, mean, rstd, num_groups, weight):
    """(dx, dweight, dbias) for dL/dy = grad, from the input x and the saved statistics."""
    xp = get_array_module(grad, x)
    B, C = x.shape[:2]
    G = num_groups
    f = grad.dtype.type
    g3, x3 = grad.reshape(B, C, -1), x.reshape(B, C, -1)
    n = f(x3.shape[2] * (C // G))                                       # values per group
    s1 = g3.sum(axis=2).reshape(B, G, -1)                               # sum g      (B, G, C/G)
    s2 = xp.einsum("bcs,bcs->bc", g3, x3).reshape(B, G, -1)            # sum g x
    m, r = mean[:, :, None], rstd[:, :, None]
    g_xhat = r * (s2 - m * s1)                                          # sum g xhat per channel
    dweight = g_xhat.reshape(B, C).sum(axis=0)
    dbias = s1.reshape(B, C).sum(axis=0)
    w = weight.reshape(G, -1)
    mean_dxhat = (w * s1).sum(axis=2, keepdims=True) / n                # mean(dxhat)        (B, G, 1)
    mean_dxhat_xhat = (w * g_xhat).sum(axis=2, keepdims=True) / n      # mean(dxhat xhat)   (B, G, 1)
    alpha = (r * w).reshape(B, C, 1)
    beta = -r * r * mean_dxhat_xhat
    gamma = r * (m * r * mean_dxhat_xhat - mean_dxhat)
    dx = g3 * alpha
    rest = x.reshape(B, G, -1) * beta
    rest += gamma
    dx += rest.reshape(B, C, -1)
    return dx.reshape(x.shape), dweight, dbias
