"""Convolution on a GPU: one patch-gather kernel and cuBLAS products per chunk.

The CPU twin (conv_cpu.py) is shaped by a core's cache: chunks of a few
images, rows copied as long runs, zero fills afterwards. On a GPU each of
those NumPy-style calls is a kernel launch, and a training step is bound by
how fast the host issues them, not by the GPU. So on CuPy a convolution is a
few launches whatever its shape:
- forward: one kernel gathers the patches of a chunk of images (im2col,
  written below in CUDA C++), one batched product per chunk writes straight
  into the NCHW output (the weights the same for every image: batch stride
  0, no copy), then the bias in one pass;
- backward: dL/dy once transposed to (O, images, pixels), so that a chunk
  of images is one matrix: dL/dw is ONE product of it with the chunk's
  patches (gathered into (K, images, pixels); a row of ones under them
  makes the product's last column dL/db), accumulated over chunks by
  cuBLAS's beta = 1; dL/dx is the patch gradients (one product) put back
  by the gather's adjoint (col2im: each input pixel sums the patch
  gradients that read it, a gather again, so no atomic additions and a
  fixed order), and no sum over images to launch.
A 1x1 convolution needs no gather in the forward (the image is its own
patch matrix) and none for dL/dx; for dL/dw its "gather" is the transpose.
Every function here also runs on NumPy (the gather as a strided view), which
is how the CPU-only tests check the layout arithmetic; tests/gpu compares the
CUDA kernels with it.
"""
import numpy as np

from .. import backend
from ..backend import get_array_module
from ..kernels.conv import output_size
from .cuda import cuda_kernel, gemm

_GPU_SOURCE = r"""
// Grid (pixel blocks, C, n): thread (p, c, b) reads the kh x kw window of output
// pixel p = (i, j) in channel c of image b once and writes it down rows (c, u, v):
//     cols[b * image_stride + ((c * kh + u) * kw + v) * row_stride + p]
//         = x[b, c, i * stride + u - pad, j * stride + v - pad]   (0 outside the image).
// 32-bit index arithmetic and one division per window: far fewer instructions than one
// thread per value, each dividing its flat index.
template <typename T>
__global__ void im2col(const T* x, T* cols, int C, int H, int W, int kh, int kw, int stride,
                       int pad, int Ho, int Wo, long long image_stride, long long row_stride) {
    int p = blockIdx.x * blockDim.x + threadIdx.x;
    if (p >= Ho * Wo) return;
    int c = blockIdx.y, b = blockIdx.z;
    int i = p / Wo, j = p - i * Wo;
    int h0 = i * stride - pad, w0 = j * stride - pad;
    const T* image = x + ((long long)b * C + c) * H * W;
    T* out = cols + b * image_stride + (long long)c * kh * kw * row_stride + p;
    for (int u = 0; u < kh; ++u) {
        int h = h0 + u;
        bool inside = h >= 0 && h < H;
        for (int v = 0; v < kw; ++v) {
            int w = w0 + v;
            out[(u * kw + v) * row_stride] = (inside && w >= 0 && w < W) ? image[h * W + w] : T(0);
        }
    }
}

// The adjoint. Grid (pixel blocks, C, n): x[b, c, h, w] = the sum, in the order of
// (u, v), of the cols entries that im2col filled from it; a gather, so no atomics.
template <typename T>
__global__ void col2im(const T* cols, T* x, int C, int H, int W, int kh, int kw, int stride,
                       int pad, int Ho, int Wo, long long image_stride, long long row_stride) {
    int q = blockIdx.x * blockDim.x + threadIdx.x;
    if (q >= H * W) return;
    int c = blockIdx.y, b = blockIdx.z;
    int h = q / W, w = q - h * W;
    const T* rows = cols + b * image_stride + (long long)c * kh * kw * row_stride;
    T sum = T(0);
    for (int u = 0; u < kh; ++u) {
        int hi = h + pad - u, i = hi / stride;             // output row i read it if hi = i * stride
        if (hi < 0 || i * stride != hi || i >= Ho) continue;
        for (int v = 0; v < kw; ++v) {
            int wj = w + pad - v, j = wj / stride;
            if (wj < 0 || j * stride != wj || j >= Wo) continue;
            sum += rows[(u * kw + v) * row_stride + i * Wo + j];
        }
    }
    x[((long long)b * C + c) * H * W + q] = sum;
}
"""

# Bytes of one chunk's patch matrix on a GPU: few, large products, and the
# memory for the patches of the whole batch bounded (at batch 128, the mnist
# UNet's largest is 690 MB).
_GPU_CHUNK_BYTES = 256 << 20


def _gpu_chunk(B, per_image_values, itemsize):
    """Images per chunk: within _GPU_CHUNK_BYTES, and at most 65535 (the kernels' grid)."""
    return max(1, min(B, 65535, _GPU_CHUNK_BYTES // max(1, per_image_values * itemsize)))


def _cols_strides(cols, dtype):
    """(image stride, row stride) in values of a patch matrix (n, K, P) whose
    rows are runs of memory, of the kernel's dtype. (An axis of length 1 may
    have any stride: CuPy's reshape gives it the next axis's.)"""
    if cols.dtype != dtype:
        raise TypeError(f"patch matrix of dtype {cols.dtype} for arrays of {dtype}")
    if cols.shape[2] > 1 and cols.strides[2] != cols.itemsize:
        raise ValueError(f"patch matrix rows must be runs of memory, got strides {cols.strides}")
    return cols.strides[0] // cols.itemsize, cols.strides[1] // cols.itemsize


def gather_patches(x, kh, kw, stride, padding, cols):
    """Fill cols (n, C*kh*kw, Ho*Wo) with the patches of x (n, C, H, W): row
    (c, u, v) of image b holds x_pad[b, c, s*i+u, s*j+v] at column (i, j)."""
    n, C, H, W = x.shape
    Ho, Wo = output_size(H, kh, stride, padding), output_size(W, kw, stride, padding)
    if backend.is_cuda_array(x):
        x = backend.cupy.ascontiguousarray(x)
        kernel = cuda_kernel(_GPU_SOURCE, "im2col", x.dtype)
        image_stride, row_stride = _cols_strides(cols, x.dtype)
        kernel(*_grid(Ho * Wo, C, n), (x, cols, *_i32(C, H, W, kh, kw, stride, padding, Ho, Wo),
                                                 *_i64(image_stride, row_stride)))
        return cols
    xp = get_array_module(x)
    x_pad = xp.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    sb, sc, sh, sw = x_pad.strides
    view = xp.lib.stride_tricks.as_strided(x_pad, (n, C, kh, kw, Ho, Wo),
                                           (sb, sc, sh, sw, stride * sh, stride * sw))
    cols.reshape(n, C, kh, kw, Ho, Wo)[...] = view
    return cols


def scatter_patches(dcols, kh, kw, stride, padding, dx):
    """dx (n, C, H, W) = the adjoint of gather_patches applied to dcols (n, K,
    P): each input pixel gets the sum of the patch entries read from it."""
    n, C, H, W = dx.shape
    Ho, Wo = output_size(H, kh, stride, padding), output_size(W, kw, stride, padding)
    if backend.is_cuda_array(dx):
        if not dx.flags.c_contiguous:
            raise ValueError("scatter_patches: dx must be C-contiguous")
        kernel = cuda_kernel(_GPU_SOURCE, "col2im", dx.dtype)
        image_stride, row_stride = _cols_strides(dcols, dx.dtype)
        kernel(*_grid(H * W, C, n), (dcols, dx, *_i32(C, H, W, kh, kw, stride, padding, Ho, Wo),
                                     *_i64(image_stride, row_stride)))
        return dx
    xp = get_array_module(dx)
    d6 = dcols.reshape(n, C, kh, kw, Ho, Wo)
    dx_pad = xp.zeros((n, C, H + 2 * padding, W + 2 * padding), dtype=dx.dtype)
    for u in range(kh):
        for v in range(kw):
            dx_pad[:, :, u:u + stride * Ho:stride, v:v + stride * Wo:stride] += d6[:, :, u, v]
    dx[...] = dx_pad[:, :, padding:padding + H, padding:padding + W]
    return dx


def _grid(pixels, rows, images):
    """(grid, block) of the two kernels: pixels across threads, one block row per (row, image)."""
    if rows > 65535 or images > 65535 or pixels >= 1 << 31:
        raise ValueError(f"convolution too large for the GPU kernels' grid: {rows} rows of "
                         f"{pixels} pixels, {images} images a chunk")
    block = min(256, -(-pixels // 32) * 32)
    return (-(-pixels // block), rows, images), (block,)


def _i32(*values):
    return tuple(np.int32(v) for v in values)


def _i64(*values):
    return tuple(np.int64(v) for v in values)


def conv2d_forward_gpu(x, w, bias=None, stride=1, padding=0):
    """The plain conv2d_forward as the GPU runs it (any backend; see the module doc)."""
    xp = get_array_module(x, w)
    B, C, H, W = x.shape
    O, _, kh, kw = w.shape
    Ho, Wo = output_size(H, kh, stride, padding), output_size(W, kw, stride, padding)
    P, K = Ho * Wo, C * kh * kw
    x = xp.ascontiguousarray(x)
    w2 = xp.ascontiguousarray(w).reshape(O, K)
    y = xp.empty((B, O, Ho, Wo), dtype=x.dtype)
    y3 = y.reshape(B, O, P)
    if kh == kw == 1 and stride == 1 and padding == 0:
        gemm(w2, x.reshape(B, C, P), y3)                        # y[b] = w x[b]
    else:
        nb = _gpu_chunk(B, K * P, x.itemsize)
        cols = xp.empty((nb, K, P), dtype=x.dtype)
        for b0 in range(0, B, nb):
            n = min(nb, B - b0)
            gather_patches(x[b0:b0 + n], kh, kw, stride, padding, cols[:n])
            gemm(w2, cols[:n], y3[b0:b0 + n])                   # y[b] = w cols[b]
    if bias is not None:
        y += bias.reshape(1, O, 1, 1)
    return y


def conv2d_backward_gpu(grad, x, w, stride=1, padding=0, need_x=True, need_w=True, need_b=True):
    """The plain conv2d_backward as the GPU runs it (any backend; see the module doc)."""
    xp = get_array_module(grad, x, w)
    B, C, H, W = x.shape
    O, _, kh, kw = w.shape
    Ho, Wo = grad.shape[2:]
    P, K = Ho * Wo, C * kh * kw
    w2 = xp.ascontiguousarray(w).reshape(O, K)
    x = xp.ascontiguousarray(x)
    dx = xp.empty(x.shape, dtype=grad.dtype) if need_x else None
    one_by_one = kh == kw == 1 and stride == 1 and padding == 0
    if need_x and one_by_one:                                           # dx[b] = w^T dL/dy[b]
        gemm(w2.T, xp.ascontiguousarray(grad).reshape(B, O, P), dx.reshape(B, C, P))
    patches_x = need_x and not one_by_one
    if not (need_w or patches_x) or B == 0:                             # no product over patches
        db = grad.sum(axis=(0, 2, 3)) if need_b else None
        return dx, (xp.zeros(w.shape, dtype=grad.dtype) if need_w else None), db
    # dL/dy as (O, images, pixels): a chunk of n images is then one matrix (O, n*P)
    g_t = xp.empty((O, B, P), dtype=grad.dtype)
    g_t[...] = grad.reshape(B, O, P).transpose(1, 0, 2)
    weights = need_w
    ones = int(need_b)                  # a row of ones under the patches: its column of dL/dw is dL/db
    nb = _gpu_chunk(B, (K + ones) * P * weights + K * P * patches_x, x.itemsize)
    if weights:
        cols = xp.empty((K + ones, nb * P), dtype=x.dtype)
        if need_b:
            cols[K] = 1
        dwb = xp.empty((O, K + ones), dtype=grad.dtype)
    if patches_x:
        dcols = xp.empty((K, nb * P), dtype=grad.dtype)
    for b0 in range(0, B, nb):
        n = min(nb, B - b0)
        g = g_t[:, b0:b0 + n].reshape(O, n * P)                         # a view, rows B*P apart
        if weights:                                                     # [dL/dw dL/db] = g [cols; 1]^T
            c = cols[:, :n * P]
            gather_patches(x[b0:b0 + n], kh, kw, stride, padding, c[:K].reshape(K, n, P).transpose(1, 0, 2))
            gemm(g, c.T, dwb, accumulate=b0 > 0)
        if patches_x:                                                   # patch gradients, put back
            d = dcols[:, :n * P]
            gemm(w2.T, g, d)
            scatter_patches(d.reshape(K, n, P).transpose(1, 0, 2), kh, kw, stride, padding, dx[b0:b0 + n])
    dw = xp.ascontiguousarray(dwb[:, :K]).reshape(w.shape) if need_w else None
    if need_b:
        db = xp.ascontiguousarray(dwb[:, K]) if weights else g_t.reshape(O, B * P).sum(axis=1)
    else:
        db = None
    return dx, dw, db
