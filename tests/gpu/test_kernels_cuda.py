"""The fast layer's CUDA kernels (autograd/fast/conv_gpu.py, norm_gpu.py) and
its direct cuBLAS products (fast/cuda.py's gemm) give the CPU twins' numbers,
at the UNet's shapes and at awkward ones, in float64 (tight) and float32.
The convolution and the group norm are called through the twins that
autograd/fast installs (fast.conv2d_forward, fast.group_norm_silu_forward,
...), which choose the GPU or the CPU kernel from the arrays they are given."""
import numpy as np
import pytest

import autograd
from autograd import fast
from autograd.fast import conv_gpu, cuda
from autograd.kernels.conv import output_size

cupy = pytest.importorskip("cupy")

TOL = {np.float64: dict(rtol=1e-10, atol=1e-12), np.float32: dict(rtol=2e-4, atol=2e-5)}
DTYPES = [np.float64, np.float32]


def _gpu(a):
    return cupy.asarray(a)


def _close(got, want, dtype):
    """Equal to rounding: float32 sums of thousands of terms differ by ~1e-6 of the
    largest value, so the absolute tolerance scales with it."""
    tol = TOL[dtype]
    np.testing.assert_allclose(cupy.asnumpy(got), want, rtol=tol["rtol"],
                               atol=tol["atol"] * max(1.0, float(np.abs(want).max())))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_shape, k, stride, padding", [
    ((3, 4, 7, 7), 3, 1, 1), ((3, 4, 9, 9), 3, 2, 1), ((2, 3, 5, 5), 1, 1, 0),
    ((2, 2, 6, 5), 3, 1, 0), ((2, 2, 6, 6), 3, 1, 2), ((4, 3, 7, 6), 3, 3, 1), ((5, 64, 28, 28), 3, 2, 1),
])
@pytest.mark.parametrize("layout", ["(n, K, P)", "(K, n, P) in a wider buffer"])
def test_patch_gather_and_scatter_kernels_match_numpy(x_shape, k, stride, padding, dtype, layout):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(x_shape).astype(dtype)
    n, C, H, W = x_shape
    P = output_size(H, k, stride, padding) * output_size(W, k, stride, padding)
    K = C * k * k

    def patches(module, fill):
        if layout == "(n, K, P)":
            return module.full((n, K, P), fill, dtype)
        # as the backward uses them: rows of a (K, (n + 1) P) buffer, one image's worth to spare
        return module.full((K, (n + 1) * P), fill, dtype)[:, :n * P].reshape(K, n, P).transpose(1, 0, 2)

    want = conv_gpu.gather_patches(x, k, k, stride, padding, patches(np, 0.0))
    got = conv_gpu.gather_patches(_gpu(x), k, k, stride, padding, patches(cupy, np.nan))
    np.testing.assert_array_equal(cupy.asnumpy(got), want)
    d = patches(np, 0.0)
    d[...] = rng.standard_normal(d.shape)
    d_gpu = patches(cupy, np.nan)
    d_gpu[...] = _gpu(d)
    want = conv_gpu.scatter_patches(d, k, k, stride, padding, np.empty_like(x))
    got = conv_gpu.scatter_patches(d_gpu, k, k, stride, padding, cupy.full(x.shape, np.nan, dtype))
    np.testing.assert_allclose(cupy.asnumpy(got), want, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_shape, w_shape, stride, padding", [
    ((4, 64, 28, 28), (64, 64, 3, 3), 1, 1), ((4, 64, 28, 28), (64, 64, 3, 3), 2, 1),
    ((4, 192, 14, 14), (128, 192, 1, 1), 1, 0), ((4, 256, 7, 7), (128, 256, 3, 3), 1, 1),
    ((3, 1, 28, 28), (64, 1, 3, 3), 1, 1), ((3, 64, 28, 28), (1, 64, 3, 3), 1, 1),
    ((2, 3, 8, 8), (2, 3, 3, 3), 2, 0), ((2, 2, 6, 1), (3, 2, 1, 5), 1, 2), ((5, 2, 3, 3), (4, 2, 3, 3), 1, 0),
])
@pytest.mark.parametrize("chunk", ["one", "image by image", "two"],
                         ids=["one chunk", "image by image", "two a chunk (short last chunks)"])
def test_conv_on_the_gpu_matches_the_cpu_kernels(x_shape, w_shape, stride, padding, chunk, dtype,
                                                 monkeypatch):
    C, k1, k2 = w_shape[1:]
    P = output_size(x_shape[2], k1, stride, padding) * output_size(x_shape[3], k2, stride, padding)
    monkeypatch.setattr(conv_gpu, "_GPU_CHUNK_BYTES", {"one": 256 << 20, "image by image": 1,
                                                       "two": 2 * (2 * C * k1 * k2 + 1) * P * 8}[chunk])
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal(x_shape).astype(dtype), (0.1 * rng.standard_normal(w_shape)).astype(dtype)
    b = rng.standard_normal(w_shape[0]).astype(dtype)
    for bias in (None, b):
        want = fast.conv2d_forward(x, w, bias, stride, padding)                     # fast/conv_cpu.py
        got = fast.conv2d_forward(_gpu(x), _gpu(w), None if bias is None else _gpu(bias), stride, padding)
        assert isinstance(got, cupy.ndarray) and got.dtype == dtype
        _close(got, want, dtype)
    grad = rng.standard_normal(want.shape).astype(dtype)
    want = fast.conv2d_backward(grad, x, w, stride, padding, True, True, True)
    for need in [(True, True, True), (True, False, False), (False, True, False), (False, False, True)]:
        got = fast.conv2d_backward(_gpu(grad), _gpu(x), _gpu(w), stride, padding, *need)
        for g, ref, needed in zip(got, want, need):
            if not needed:
                assert g is None
                continue
            assert isinstance(g, cupy.ndarray) and g.dtype == dtype
            _close(g, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gemm_reads_transposed_padded_and_shared_operands(dtype):
    rng = np.random.default_rng(2)
    cuda.set_tf32(False)
    a_full = rng.standard_normal((7, 12)).astype(dtype)
    a = a_full[:, :5]                               # (7, 5), rows padded to 12
    b_t = rng.standard_normal((3, 6, 5)).astype(dtype)
    b = b_t.transpose(0, 2, 1)                      # (3, 5, 6), each read transposed
    want = a @ b
    out = cupy.empty((3, 7, 6), dtype)
    cuda.gemm(_gpu(a_full)[:, :5], _gpu(b_t).transpose(0, 2, 1), out)
    np.testing.assert_allclose(cupy.asnumpy(out), want, **TOL[dtype])
    cuda.gemm(_gpu(a_full)[:, :5], _gpu(b_t).transpose(0, 2, 1), out, accumulate=True)
    np.testing.assert_allclose(cupy.asnumpy(out), 2 * want, **TOL[dtype])
    out_t = cupy.empty((3, 6, 7), dtype).transpose(0, 2, 1)    # an out stored column by column
    cuda.gemm(_gpu(a_full)[:, :5], _gpu(b_t).transpose(0, 2, 1), out_t)
    np.testing.assert_allclose(cupy.asnumpy(out_t), want, **TOL[dtype])
    c = cupy.empty((5, 5), dtype)                   # a^T a: both from one array
    cuda.gemm(_gpu(a_full)[:, :5].T, _gpu(a_full)[:, :5], c)
    np.testing.assert_allclose(cupy.asnumpy(c), a.T @ a, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_shape, G", [
    ((4, 64, 28, 28), 32), ((3, 128, 14, 14), 32), ((3, 256, 7, 7), 32), ((2, 8, 30, 30), 1),
    ((2, 6, 1, 1), 3), ((3, 4, 5, 5), 2),
])
@pytest.mark.parametrize("silu", [False, True])
def test_group_norm_kernels_match_the_cpu_kernels(x_shape, G, silu, dtype):
    rng = np.random.default_rng(3)
    C = x_shape[1]
    x = (2 * rng.standard_normal(x_shape) + 0.5).astype(dtype)
    w, b = rng.standard_normal(C).astype(dtype), rng.standard_normal(C).astype(dtype)
    grad = rng.standard_normal(x_shape).astype(dtype)
    forward = fast.group_norm_silu_forward if silu else fast.group_norm_forward
    y, saved = forward(x, G, w, b, 1e-5)                                    # fast/norm_cpu.py
    y_gpu, saved_gpu = forward(_gpu(x), G, _gpu(w), _gpu(b), 1e-5)          # fast/norm_gpu.py
    assert isinstance(y_gpu, cupy.ndarray) and y_gpu.dtype == dtype
    np.testing.assert_allclose(cupy.asnumpy(y_gpu), y, **TOL[dtype])
    # saved: (x, mean, rstd, y or None, u or None, weight, G)
    for name, i in (("mean", 1), ("rstd", 2), ("u", 4)):
        assert (saved_gpu[i] is None) == (saved[i] is None), name
        if saved[i] is not None:
            np.testing.assert_allclose(cupy.asnumpy(saved_gpu[i]), saved[i], err_msg=name, **TOL[dtype])
    want = fast._group_norm_grad(grad, saved)
    # dL/dy arrives as a view that is not contiguous (as a Concat's backward hands it on)
    g_view = _gpu(np.concatenate([grad, grad], axis=1))[:, :C]
    got = fast._group_norm_grad(g_view, saved_gpu)
    for name, g, ref in zip(("dx", "dweight", "dbias"), got, want):
        assert isinstance(g, cupy.ndarray) and g.dtype == dtype, name
        np.testing.assert_allclose(cupy.asnumpy(g), ref, err_msg=name, **TOL[dtype])


def test_group_norm_silu_without_a_backward_keeps_no_u():
    x = cupy.asarray(np.random.default_rng(4).standard_normal((2, 4, 3, 3)))
    w, b = cupy.ones(4), cupy.zeros(4)
    with autograd.no_grad():                   # sampling: the twin asks the kernel for no u
        y, saved = fast.group_norm_silu_forward(x, 2, w, b, 1e-5)
    y2, saved2 = fast.group_norm_silu_forward(x, 2, w, b, 1e-5)
    assert saved[4] is None and saved2[4] is not None
    np.testing.assert_array_equal(cupy.asnumpy(y), cupy.asnumpy(y2))
