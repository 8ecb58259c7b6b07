"""The GPU's convolution (autograd/kernels/conv.py, "On a GPU"), run here on NumPy.

On CuPy the patch gather and its adjoint are CUDA kernels and the products go
straight to cuBLAS; every other line of conv2d_forward_gpu/backward_gpu is the
same on NumPy, where the gather is a strided view. So these tests check the
layout arithmetic (chunks, a short last chunk, the (O, images, pixels)
transpose, the row of ones that gives dL/db, every choice of which gradients
to make) against the direct-loop reference and the CPU kernels without a
GPU; tests/gpu/test_kernels_cuda.py checks the CUDA kernels against these.
"""
import numpy as np
import pytest

from autograd import backend
from autograd.kernels import conv

# (x shape, weight shape, stride, padding): every kind of UNet convolution and some odd ones
SHAPES = [
    ((3, 4, 7, 7), (5, 4, 3, 3), 1, 1),
    ((3, 4, 9, 9), (5, 4, 3, 3), 2, 1),
    ((2, 3, 5, 5), (4, 3, 1, 1), 1, 0),
    ((2, 2, 6, 5), (3, 2, 3, 3), 1, 0),
    ((2, 2, 6, 6), (3, 2, 3, 3), 1, 2),
    ((2, 3, 8, 8), (2, 3, 3, 3), 2, 0),
    ((4, 3, 7, 6), (2, 3, 3, 3), 3, 1),
    ((2, 2, 6, 1), (3, 2, 1, 5), 1, 2),
    ((5, 2, 3, 3), (4, 2, 3, 3), 1, 0),         # a 1x1 output
]


# one chunk; image by image; two images a chunk (a short last chunk for odd batches)
CHUNKS = [(1 << 30, "one chunk"), (1, "image by image"), ("two", "two a chunk")]


def _set_chunk(monkeypatch, chunk, x_shape, w_shape, stride, padding):
    if chunk == "two":
        # the backward's patches and their gradients of two images: 2-4 images a chunk forward,
        # 2-3 backward, depending on which gradients are asked for
        C, k1, k2 = w_shape[1:]
        K = C * k1 * k2
        P = conv.output_size(x_shape[2], k1, stride, padding) * conv.output_size(x_shape[3], k2, stride, padding)
        chunk = 2 * (2 * K + 1) * P * 8
    monkeypatch.setattr(conv, "_GPU_CHUNK_BYTES", chunk)


@pytest.mark.parametrize("chunk", [c for c, _ in CHUNKS], ids=[n for _, n in CHUNKS])
@pytest.mark.parametrize("x_shape, w_shape, stride, padding", SHAPES)
def test_gpu_conv_path_matches_the_reference(x_shape, w_shape, stride, padding, chunk, monkeypatch):
    _set_chunk(monkeypatch, chunk, x_shape, w_shape, stride, padding)
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal(x_shape), rng.standard_normal(w_shape)
    b = rng.standard_normal(w_shape[0])
    y_ref = conv.conv2d_reference(x, w, stride, padding)
    add = rng.standard_normal((x_shape[0], w_shape[0], 1, 1))
    for bias, extra, want in ((None, None, y_ref), (b, None, y_ref + b[:, None, None]),
                              (None, add, y_ref + add), (b, add, y_ref + b[:, None, None] + add)):
        y = conv.conv2d_forward_gpu(x, w, stride, padding, bias=bias, add=extra)
        np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)
    grad = rng.standard_normal(y_ref.shape)
    want = conv.conv2d_backward(grad, x, w, stride, padding, True, True, True)     # the CPU kernel
    for need in [(True, True, True), (True, False, False), (False, True, False), (False, False, True),
                 (True, False, True), (False, True, True), (True, True, False)]:
        got = conv.conv2d_backward_gpu(grad, x, w, stride, padding, *need)
        for g, ref, needed in zip(got, want, need):
            if not needed:
                assert g is None
            else:
                np.testing.assert_allclose(g, ref, rtol=1e-11, atol=1e-11)


def test_gpu_conv_gradients_by_finite_differences():
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal((2, 2, 5, 5)), rng.standard_normal((3, 2, 3, 3))
    grad = rng.standard_normal((2, 3, 3, 3))
    dx, dw, _ = conv.conv2d_backward_gpu(grad, x, w, 2, 1, True, True, False)
    h = 1e-6
    for arr, d in ((x, dx), (w, dw)):
        for idx in [(0, 1, 2, 3), (1, 0, 0, 0), (0, 0, 4, 4)] if arr is x else [(2, 1, 0, 2), (0, 0, 1, 1)]:
            plus, minus = arr.copy(), arr.copy()
            plus[idx] += h
            minus[idx] -= h
            f = (lambda a: np.sum(grad * conv.conv2d_forward_gpu(a, w, 2, 1))) if arr is x else \
                (lambda a: np.sum(grad * conv.conv2d_forward_gpu(x, a, 2, 1)))
            assert d[idx] == pytest.approx((f(plus) - f(minus)) / (2 * h), rel=1e-6, abs=1e-8)


def test_gather_and_scatter_are_adjoint():
    """<gather(x), c> = <x, scatter(c)>: the backward's dL/dx is exactly the gather's transpose."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 2, 6, 7))
    k, s, p = 3, 2, 1
    Ho, Wo = conv.output_size(6, k, s, p), conv.output_size(7, k, s, p)
    shape = (3, 2 * k * k, Ho * Wo)
    cols = conv.gather_patches(x, k, k, s, p, np.empty(shape))
    c = rng.standard_normal(shape)
    dx = conv.scatter_patches(c, k, k, s, p, np.empty_like(x))
    assert np.vdot(cols, c) == pytest.approx(np.vdot(x, dx), rel=1e-12)


def test_gemm_on_numpy_writes_and_accumulates_into_out():
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((4, 3)), rng.standard_normal((2, 3, 5))
    out = np.empty((2, 4, 5))
    backend.gemm(a, b, out)
    np.testing.assert_allclose(out, a @ b)
    backend.gemm(a, b, out, accumulate=True)
    np.testing.assert_allclose(out, 2 * (a @ b))


@pytest.mark.parametrize("shape, strides, want", [
    ((3, 4), (16, 4), (False, 4, 0)),            # rows of 4 floats
    ((3, 4), (32, 4), (False, 8, 0)),            # rows padded to 8
    ((3, 4), (4, 12), (True, 3, 0)),             # columns of 3: a transposed view
    ((2, 3, 4), (48, 16, 4), (False, 4, 12)),    # batch stride 12 values
    ((3, 4), (8, 8), None),                      # every other value: neither
])
def test_matrix_layout_reads_rows_columns_and_batch_strides(shape, strides, want):
    base = np.zeros(1000, np.float32)
    a = np.lib.stride_tricks.as_strided(base, shape, strides)
    assert backend._matrix_layout(a) == want


def test_patch_strides_accept_any_stride_on_an_axis_of_length_one():
    """CuPy's reshape gives an axis of length 1 the next axis's stride (a 1x1
    output, one image in a chunk): the rows are still runs of memory."""
    base = np.zeros(64)
    cols = np.lib.stride_tricks.as_strided(base, (1, 4, 1), (32, 32, 32))
    assert conv._cols_strides(cols, base.dtype) == (4, 4)
    with pytest.raises(ValueError, match="runs of memory"):
        conv._cols_strides(np.lib.stride_tricks.as_strided(base, (1, 4, 2), (32, 8, 16)), base.dtype)
    with pytest.raises(TypeError, match="dtype"):
        conv._cols_strides(cols, np.float32)
