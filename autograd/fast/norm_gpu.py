"""Group normalization (+ SiLU) on a GPU: CUDA kernels of our own, one forward and two backward.

Written as CuPy calls, a group norm and its SiLU are about twenty kernel
launches forward and twice that backward, and a training step is bound by
the host issuing them. Here one thread block per (example, group) does
everything for its group: the sums, the statistics and the normalization
(+ SiLU) forward; the per-channel sums and dL/dx backward, after which a
second, small kernel adds the per-example dL/dweight and dL/dbias over the
batch, in order. Sums are kept in
double; the arithmetic is that of norm_cpu.py (and of the plain kernels'
formulas in autograd/kernels/norm.py). tests/gpu compares them with the CPU's.
"""
import numpy as np

from ..backend import get_array_module
from .cuda import cuda_kernel

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


def forward_cuda(x3, G, weight, bias, eps, silu, keep_u):
    """(y, mean, rstd, u) of norm_cpu.group_norm_fused_forward for CuPy x3 (B, C, S), one launch."""
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


def backward_cuda(g3, x3, mean, rstd, weight, y3=None, u3=None):
    """(dx, dweight, dbias) of norm_cpu.group_norm_fused_backward for CuPy arrays, in two launches."""
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
