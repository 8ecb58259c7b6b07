"""Group normalization (+ SiLU) on a CPU: the plain kernels' faster twins.

Twins of autograd/kernels/norm.py (whose docstring has the formulas), in fewer
passes over memory and fewer full-size temporaries, which is what element-wise
work costs on a CPU:
- forward: two reductions give the mean and E[x^2] (var = E[x^2] - mean^2,
  clamped at 0; fine while |mean| is not hundreds of standard deviations),
  then y = x * a + c with a, c per (example, channel): one multiply, one add.
- backward: saves x (kept alive anyway by the op before) and the (B, G)
  statistics instead of a full-size xhat. Two reductions per (example,
  channel), sum(g) and sum(g * x), give every term, and dL/dx collapses to
  g * alpha + x * beta + gamma with per-(example, channel/group) coefficients:
  expanding xhat = (x - mean) rstd in the plain formula,
      alpha = rstd w,   beta = -rstd^2 mean(dxhat xhat),
      gamma = rstd (mean rstd mean(dxhat xhat) - mean(dxhat)).
- with SiLU, z = group_norm(x) is never stored: see group_norm_fused_forward.
"""
from ..backend import get_array_module
from .memory import narrow_buffer, restore_buffer
from .threads import Scratch, parallel_for

# Bytes of one (images, C, pixels) slice per chunk. The kernels go through the
# batch a few images at a time, since every statistic is per example and a
# chunk is complete on its own: the per-chunk temporaries are small, reused
# buffers that stay in a core's L2 cache, where one full-size temporary per
# step would be a fresh allocation (page faults) and a trip to main memory.
# The chunks also go to the fast layer's threads (threads.py), where each
# one's NumPy calls must be long enough for the threads not to queue for the
# interpreter lock between them.
_CHUNK_BYTES = 1 << 20


def _chunk(x3):
    B, C, S = x3.shape
    return max(1, min(B, _CHUNK_BYTES // max(1, C * S * x3.itemsize)))


def _scale_shift(mean, rstd, weight, bias):
    """a, c with group_norm(x) = x a + c, per (example, channel): each (n, C, 1)."""
    n, G = mean.shape
    a = rstd[:, :, None] * weight.reshape(G, -1)                        # (n, G, C/G)
    c = bias.reshape(G, -1) - mean[:, :, None] * a
    return a.reshape(n, -1, 1), c.reshape(n, -1, 1)


def _group_sums(xg):
    """sum(x) and sum(x^2) over each row of xg (n, G, values): (n, G) each, no x*x temporary."""
    xp = get_array_module(xg)
    return xg.sum(axis=2), xp.einsum("bgn,bgn->bg", xg, xg)


def _statistics(sum_x, sum_xx, n_group, eps):
    """mean and rstd = 1 / sqrt(var + eps) from the sums of x and x^2 per (example, group)."""
    xp = get_array_module(sum_x)
    f = sum_x.dtype.type
    m = sum_x / n_group
    var = sum_xx / n_group - m * m                                      # E[x^2] - mean^2
    return m, 1 / xp.sqrt(xp.maximum(var, f(0)) + f(eps))


def group_norm_fused_forward(x, num_groups, weight, bias, eps, silu=False, keep_u=True):
    """x (B, C, ...), weight and bias (C,) -> y, mean and rstd (B, G), u.

    y = group_norm(x), or with silu=True y = silu(group_norm(x)). SiLU of
    z = group_norm(x) is computed from h = z / 2 (the factor folded into a
    and c) and u = 1 + tanh(h) = 2 sigmoid(z) (tanh does not overflow where
    exp would):
        y = z sigmoid(z) = h u,
    three passes after the normalization, h computed in y's own memory. u
    (None without silu) is what the backward needs besides y: it saves no
    normalized map. With keep_u=False (no backward to come: sampling) u
    lives in a chunk-sized scratch buffer instead, and None is returned for it.

    It makes two loops over the batch, chunk by chunk: the sums first, then,
    with the statistics and coefficients of the whole batch worked out in
    between, the normalization. The small per-(example, group) arithmetic in
    between is a dozen NumPy calls on tiny arrays, each holding the
    interpreter lock; done once per batch instead of once per chunk, it
    holds up the other thread's chunks less.
    """
    xp = get_array_module(x)
    B, C = x.shape[:2]
    G = num_groups
    f = x.dtype.type
    x3 = x.reshape(B, C, -1)                                            # (B, C, H*W)
    n_group = f(x3.shape[2] * (C // G))                                 # values per group
    nb = _chunk(x3)
    n_chunks = -(-B // nb)
    sum_x, sum_xx = xp.empty((B, G), dtype=x.dtype), xp.empty((B, G), dtype=x.dtype)

    def sums(i, worker):
        b = slice(i * nb, (i + 1) * nb)
        sum_x[b], sum_xx[b] = _group_sums(x3[b].reshape(-1, G, x3.shape[2] * (C // G)))

    parallel_for(n_chunks, sums)
    mean, rstd = _statistics(sum_x, sum_xx, n_group, eps)
    # (x - mean) rstd w + b = x a + c, with a and c per (example, channel)
    a, c = _scale_shift(mean, rstd, weight, bias)
    y = xp.empty_like(x3)
    if not silu:
        def normalize(i, worker):
            b = slice(i * nb, (i + 1) * nb)
            old = narrow_buffer(x3.shape[2])
            try:
                yc = xp.multiply(x3[b], a[b], out=y[b])
                yc += c[b]
            finally:
                restore_buffer(old)

        parallel_for(n_chunks, normalize)
        return y.reshape(x.shape), mean, rstd, None
    a *= f(0.5)                                                         # h = z / 2 = x a/2 + c/2
    c *= f(0.5)
    u = xp.empty_like(x3) if keep_u else None
    u_bufs = None if keep_u else Scratch(lambda: xp.empty((nb,) + x3.shape[1:], dtype=x.dtype))

    def normalize_silu(i, worker):
        b = slice(i * nb, (i + 1) * nb)
        n = x3[b].shape[0]
        old = narrow_buffer(x3.shape[2])
        try:
            h = xp.multiply(x3[b], a[b], out=y[b])                      # h = z / 2, in y
            h += c[b]
        finally:
            restore_buffer(old)
        uc = xp.tanh(h, out=u[b] if keep_u else u_bufs[worker][:n])
        uc += f(1)
        h *= uc                                                         # y = h u

    parallel_for(n_chunks, normalize_silu)
    return y.reshape(x.shape), mean, rstd, (u.reshape(x.shape) if u is not None else None)


def group_norm_fused_backward(grad, x, mean, rstd, num_groups, weight, y=None, u=None):
    """(dx, dweight, dbias) for dL/dy = grad, from the input x and the saved statistics.

    With the forward's output y and u (its silu=True), SiLU's derivative is
    applied first: with s = sigmoid(z) = u / 2,
        dy/dz = s + z s (1 - s) = s + y (1 - s) = (u + y (2 - u)) / 2,
    three passes from y and u, and one more for dL/dy; the 1/2 is folded into
    the group norm's coefficients below (its backward is linear in dL/dz).

    As the forward, two loops on a CPU: dL/dz and its two sums per (example,
    channel), then dL/dx, with the coefficients worked out once in between.
    """
    xp = get_array_module(grad, x)
    B, C = x.shape[:2]
    G = num_groups
    f = grad.dtype.type
    g3, x3 = grad.reshape(B, C, -1), x.reshape(B, C, -1)
    n_group = f(x3.shape[2] * (C // G))                                 # values per group
    silu = u is not None
    scale = f(0.5) if silu else f(1)
    w = weight.reshape(G, -1)
    # dx holds 2 dL/dz (SiLU) between the two loops, then dL/dx.
    dx = xp.empty_like(x3)
    gz = dx if silu else g3
    sum_g, sum_gx = xp.empty((B, C), dtype=grad.dtype), xp.empty((B, C), dtype=grad.dtype)
    nb = _chunk(x3)
    n_chunks = -(-B // nb)
    if silu:
        y3, u3 = y.reshape(B, C, -1), u.reshape(B, C, -1)

    def sums(i, worker):
        b = slice(i * nb, (i + 1) * nb)
        if silu:
            uc, gzc = u3[b], gz[b]
            xp.subtract(f(2), uc, out=gzc)
            gzc *= y3[b]
            gzc += uc                                                   # u + y (2 - u)
            gzc *= g3[b]
        sum_g[b], sum_gx[b] = _channel_sums(gz[b], x3[b])

    parallel_for(n_chunks, sums)
    dweight_b, dbias_b, alpha, beta, gamma = _backward_terms(
        sum_g, sum_gx, mean[:, :, None], rstd[:, :, None], w, scale, n_group)
    bufs = Scratch(lambda: xp.empty((nb,) + x3.shape[1:], dtype=x.dtype))

    def input_grad(i, worker):
        # dL/dx = gz alpha + x beta + gamma (module docstring)
        b = slice(i * nb, (i + 1) * nb)
        xc = x3[b]
        n = xc.shape[0]
        old = narrow_buffer(x3.shape[2])
        try:
            rest = xp.multiply(xc.reshape(n, G, -1), beta[b], out=bufs[worker][:n].reshape(n, G, -1))
            rest += gamma[b]
            dxc = xp.multiply(gz[b], alpha[b], out=dx[b])              # gz may be this very slice
        finally:
            restore_buffer(old)
        dxc += rest.reshape(n, C, -1)

    parallel_for(n_chunks, input_grad)
    # Per-example terms of dL/dweight and dL/dbias summed over the batch in
    # order, whichever thread ran which chunk.
    return dx.reshape(x.shape), dweight_b.sum(axis=0), dbias_b.sum(axis=0)


def _channel_sums(gz, x3):
    """sum(dL/dz) and sum(dL/dz x) per (example, channel) of gz, x3 (n, C, S): (n, C) each."""
    xp = get_array_module(gz, x3)
    return gz.sum(axis=2), xp.einsum("bcs,bcs->bc", gz, x3)


def _backward_terms(sum_g, sum_gx, m, r, w, scale, n_group):
    """The per-(example, channel) terms of the backward from dL/dz = scale gz.

    sum_g, sum_gx (n, C): the sums of gz and gz x per (example, channel);
    m, r (n, G, 1); w (G, C/G). Returns dL/dweight and dL/dbias per example
    (n, C) and the coefficients of dL/dx = gz alpha + x beta + gamma: alpha
    (n, C, 1), beta and gamma (n, G, 1).
    """
    n, C = sum_g.shape
    G = w.shape[0]
    s1 = scale * sum_g.reshape(n, G, -1)                                # sum dL/dz      (n, G, C/G)
    s2 = scale * sum_gx.reshape(n, G, -1)                               # sum dL/dz x
    g_xhat = r * (s2 - m * s1)                                          # sum dL/dz xhat per channel
    mean_dxhat = (w * s1).sum(axis=2, keepdims=True) / n_group          # mean(dxhat)        (n, G, 1)
    mean_dxhat_xhat = (w * g_xhat).sum(axis=2, keepdims=True) / n_group   # mean(dxhat xhat)
    alpha = (scale * r * w).reshape(n, C, 1)
    beta = -r * r * mean_dxhat_xhat
    gamma = r * (m * r * mean_dxhat_xhat - mean_dxhat)
    return g_xhat.reshape(n, C), s1.reshape(n, C), alpha, beta, gamma


