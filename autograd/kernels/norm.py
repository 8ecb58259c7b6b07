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
from ..backend import cuda_kernel, device_of, get_array_module, narrow_buffer, restore_buffer
from ..parallel import Scratch, parallel_for


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
# Fused version (what F.group_norm and F.group_norm_silu run)
# =============================================================================

# Bytes of one (images, C, pixels) slice per chunk. The fused kernels go
# through the batch a few images at a time, since every statistic is per
# example and a chunk is complete on its own: the per-chunk temporaries are
# small, reused buffers that stay in a CPU core's L2 cache, where one
# full-size temporary per step would be a fresh allocation (page faults) and
# a trip to main memory. Measured 1.3x faster than the whole batch at once
# at 32 channels, 28x28 (128 KB to 1 MB chunks are alike on one thread). The
# chunks also go to the thread pool (autograd/parallel.py), where each one's
# NumPy calls must be long enough for the threads not to queue for the GIL
# between them: 1 MB chunks made a 2-thread training step 8% faster than
# 256 KB ones. (A GPU has kernels of its own, at the end of this file.)
_CHUNK_BYTES = {"cpu": 1 << 20}


def _chunk(x3):
    B, C, S = x3.shape
    return max(1, min(B, _CHUNK_BYTES["cpu"] // max(1, C * S * x3.itemsize)))


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

    On a CPU it makes two loops over the batch, chunk by chunk: the sums
    first, then, with the statistics and coefficients of the whole batch
    worked out in between, the normalization. The small per-(example, group)
    arithmetic in between is a dozen NumPy calls on tiny arrays, each
    holding the GIL; done once per batch instead of once per chunk, it holds
    up the other thread's chunks less (every group norm + SiLU shape of a
    mnist-tiny step, weighted by count, on 2 threads against one loop doing
    it all per chunk: forward 0.97-0.98 of the time, backward 0.96).
    """
    xp = get_array_module(x)
    B, C = x.shape[:2]
    G = num_groups
    f = x.dtype.type
    x3 = x.reshape(B, C, -1)                                            # (B, C, H*W)
    n_group = f(x3.shape[2] * (C // G))                                 # values per group
    if device_of(x) == "cuda":
        y, mean, rstd, u = _forward_cuda(x3, G, weight, bias, eps, silu, keep_u)
        return y.reshape(x.shape), mean, rstd, (u.reshape(x.shape) if u is not None else None)
    nb = _chunk(x3)
    n_chunks = -(-B // nb)
    sum_x, sum_xx = xp.empty((B, G), dtype=x.dtype), xp.empty((B, G), dtype=x.dtype)

    def sums(i, worker):
        b = slice(i * nb, (i + 1) * nb)
        sum_x[b], sum_xx[b] = _group_sums(x3[b].reshape(-1, G, x3.shape[2] * (C // G)))

    parallel_for(n_chunks, sums, device_of(x))
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

        parallel_for(n_chunks, normalize, device_of(x))
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

    parallel_for(n_chunks, normalize_silu, device_of(x))
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
    if device_of(x) == "cuda":
        dx, dweight, dbias = _backward_cuda(g3, x3, mean, rstd, weight,
                                            y.reshape(B, C, -1) if silu else None,
                                            u.reshape(B, C, -1) if silu else None)
        return dx.reshape(x.shape), dweight, dbias
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

    parallel_for(n_chunks, sums, device_of(x))
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

    parallel_for(n_chunks, input_grad, device_of(x))
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


# =============================================================================
# On a GPU: one kernel of our own per direction
# =============================================================================
# Until the twelfth round the GPU ran the arithmetic above on the whole batch
# at once, its element-wise chains fused with cupy.fuse: about twenty CuPy
# calls a group norm and twice that backward. On an H100, 35 group norms +
# SiLU of a mnist training step at batch 128 took 50 ms, nearly all of it the
# host issuing kernels (8.7 ms with the kernels below). Here one
# thread block per (example, group) does everything for its group: the sums,
# the statistics and the normalization (+ SiLU) forward; the per-channel sums
# and dL/dx backward. Sums are kept in double; the arithmetic is that of the
# module docstring and of group_norm_fused_backward.

_GPU_SOURCE = r"""
// Sums a and b over the thread block (blockDim.x a multiple of 32); every thread gets the totals.
__device__ void block_sum2(double& a, double& b) {
    __shared__ double sa[32], sb[32];
    for (int o = 16; o > 0; o >>= 1) {
        a += __shfl_down_sync(0xffffffffu, a, o);
        b += __shfl_down_sync(0xffffffffu, b, o);
    }
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    __syncthreads();                       // the previous call's readers are done with sa, sb
    if (lane == 0) { sa[warp] = a; sb[warp] = b; }
    __syncthreads();
    if (warp == 0) {
        a = lane < warps ? sa[lane] : 0.0;
        b = lane < warps ? sb[lane] : 0.0;
        for (int o = 16; o > 0; o >>= 1) {
            a += __shfl_down_sync(0xffffffffu, a, o);
            b += __shfl_down_sync(0xffffffffu, b, o);
        }
        if (lane == 0) { sa[0] = a; sb[0] = b; }
    }
    __syncthreads();
    a = sa[0];
    b = sb[0];
}

// One block per (example b, group g) of x (B, C, S): mean and rstd of the group's
// C/G * S values, then y = z = (x - mean) rstd w + bias, or with silu y = silu(z)
// (and u = 1 + tanh(z / 2), kept for the backward where keep_u).
template <typename T>
__global__ void group_norm_forward(const T* x, const T* weight, const T* bias, T* y, T* u,
                                   T* mean, T* rstd, int C, int S, int G, double eps,
                                   int silu, int keep_u) {
    int group = blockIdx.x, b = group / G, g = group % G, Cg = C / G;
    long long n = (long long)Cg * S;
    long long base = ((long long)b * C + (long long)g * Cg) * S;
    double s = 0.0, ss = 0.0;
    for (long long i = threadIdx.x; i < n; i += blockDim.x) {
        double v = (double)x[base + i];
        s += v;
        ss += v * v;
    }
    block_sum2(s, ss);
    double m = s / n, var = ss / n - m * m;              // E[x^2] - mean^2, as the CPU kernel
    double r = 1.0 / sqrt((var > 0.0 ? var : 0.0) + eps);
    if (threadIdx.x == 0) { mean[group] = (T)m; rstd[group] = (T)r; }
    for (int k = 0; k < Cg; ++k) {                      // channel by channel: no division per value
        int c = g * Cg + k;
        T a = (T)(r * (double)weight[c]), shift = bias[c], mean_t = (T)m;
        long long row = base + (long long)k * S;
        for (int s = threadIdx.x; s < S; s += blockDim.x) {
            long long i = row + s;
            T z = (x[i] - mean_t) * a + shift;
            if (silu) {
                T h = z * (T)0.5;                           // silu(z) = h (1 + tanh(h))
                T uu = (T)1 + tanh(h);
                y[i] = h * uu;
                if (keep_u) u[i] = uu;
            } else {
                y[i] = z;
            }
        }
    }
}

// One block per (example, group). dz = dL/dz (through SiLU first when silu:
// dL/dz = dL/dy (u + y (2 - u)) / 2); per channel c of the group the sums
// sum(dz) and sum(dz xhat) are this example's terms of dL/dbias and dL/dweight
// (written to dbias_b, dweight_b (B, C)); their w-weighted totals give
// mean(dxhat) and mean(dxhat xhat), and
// dL/dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)),  dxhat = dz w.
template <typename T>
__global__ void group_norm_backward(const T* grad, const T* x, const T* y, const T* u,
                                    const T* mean, const T* rstd, const T* weight, T* dx,
                                    T* dweight_b, T* dbias_b, int C, int S, int G, int silu) {
    int group = blockIdx.x, b = group / G, g = group % G, Cg = C / G;
    long long n = (long long)Cg * S;
    long long base = ((long long)b * C + (long long)g * Cg) * S;
    double m = (double)mean[group], r = (double)rstd[group];
    double mean_dxhat = 0.0, mean_dxhat_xhat = 0.0;
    for (int k = 0; k < Cg; ++k) {
        int c = g * Cg + k;
        long long row = base + (long long)k * S;
        double sum_dz = 0.0, sum_dz_xhat = 0.0;
        for (int s = threadIdx.x; s < S; s += blockDim.x) {
            long long i = row + s;
            T dz = grad[i];
            if (silu) dz = dz * (u[i] + y[i] * ((T)2 - u[i])) * (T)0.5;
            sum_dz += (double)dz;
            sum_dz_xhat += (double)dz * (((double)x[i] - m) * r);
        }
        block_sum2(sum_dz, sum_dz_xhat);
        if (threadIdx.x == 0) {
            dbias_b[(long long)b * C + c] = (T)sum_dz;
            dweight_b[(long long)b * C + c] = (T)sum_dz_xhat;
        }
        mean_dxhat += (double)weight[c] * sum_dz;
        mean_dxhat_xhat += (double)weight[c] * sum_dz_xhat;
    }
    mean_dxhat /= n;
    mean_dxhat_xhat /= n;
    for (int k = 0; k < Cg; ++k) {
        double wc = (double)weight[g * Cg + k];
        long long row = base + (long long)k * S;
        for (int s = threadIdx.x; s < S; s += blockDim.x) {
            long long i = row + s;
            T dz = grad[i];
            if (silu) dz = dz * (u[i] + y[i] * ((T)2 - u[i])) * (T)0.5;
            double xhat = ((double)x[i] - m) * r;
            dx[i] = (T)(r * ((double)dz * wc - mean_dxhat - xhat * mean_dxhat_xhat));
        }
    }
}

// dweight, dbias (C,) = the sums over the batch of dweight_b, dbias_b (B, C), in
// order of b: one launch where two CuPy reductions cost the host twice as much.
template <typename T>
__global__ void sum_over_batch(const T* dweight_b, const T* dbias_b, T* dweight, T* dbias,
                               int B, int C) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    double w = 0.0, b = 0.0;
    for (int i = 0; i < B; ++i) {
        w += (double)dweight_b[(long long)i * C + c];
        b += (double)dbias_b[(long long)i * C + c];
    }
    dweight[c] = (T)w;
    dbias[c] = (T)b;
}
"""

_BLOCK = 256


def _forward_cuda(x3, G, weight, bias, eps, silu, keep_u):
    """(y, mean, rstd, u) of group_norm_fused_forward for CuPy x3 (B, C, S), one launch."""
    import numpy as np
    xp = get_array_module(x3)
    B, C, S = x3.shape
    x3 = xp.ascontiguousarray(x3)
    y = xp.empty_like(x3)
    u = xp.empty_like(x3) if silu and keep_u else None
    mean, rstd = xp.empty((B, G), dtype=x3.dtype), xp.empty((B, G), dtype=x3.dtype)
    if B == 0:
        return y, mean, rstd, u
    weight, bias = (xp.ascontiguousarray(a, dtype=x3.dtype) for a in (weight, bias))
    kernel = cuda_kernel(_GPU_SOURCE, "group_norm_forward", x3.dtype)
    kernel((B * G,), (_BLOCK,), (x3, weight, bias, y,
                                 y if u is None else u, mean, rstd, np.int32(C), np.int32(S),
                                 np.int32(G), np.float64(eps), np.int32(silu), np.int32(u is not None)))
    return y, mean, rstd, u


def _backward_cuda(g3, x3, mean, rstd, weight, y3=None, u3=None):
    """(dx, dweight, dbias) of group_norm_fused_backward for CuPy arrays, in two launches."""
    import numpy as np
    xp = get_array_module(g3, x3)
    B, C, S = x3.shape
    G = mean.shape[1]
    silu = u3 is not None
    g3, x3 = xp.ascontiguousarray(g3), xp.ascontiguousarray(x3)
    y3 = xp.ascontiguousarray(y3) if silu else x3                       # unread without silu
    u3 = xp.ascontiguousarray(u3) if silu else x3
    dx = xp.empty_like(x3)
    dweight_b, dbias_b = xp.empty((B, C), dtype=x3.dtype), xp.empty((B, C), dtype=x3.dtype)
    if B == 0:
        return dx, xp.zeros(C, dtype=x3.dtype), xp.zeros(C, dtype=x3.dtype)
    mean, rstd, weight = (xp.ascontiguousarray(a, dtype=x3.dtype) for a in (mean, rstd, weight))
    kernel = cuda_kernel(_GPU_SOURCE, "group_norm_backward", x3.dtype)
    kernel((B * G,), (_BLOCK,), (g3, x3, y3, u3, mean, rstd, weight, dx, dweight_b, dbias_b,
                                 np.int32(C), np.int32(S), np.int32(G), np.int32(silu)))
    dweight, dbias = xp.empty(C, dtype=x3.dtype), xp.empty(C, dtype=x3.dtype)
    sums = cuda_kernel(_GPU_SOURCE, "sum_over_batch", x3.dtype)
    sums((-(-C // 128),), (128,), (dweight_b, dbias_b, dweight, dbias, np.int32(B), np.int32(C)))
    return dx, dweight, dbias
