"""The GPU's convolution (autograd/fast/conv_gpu.py), run here on NumPy.

On CuPy the patch gather and its adjoint are CUDA kernels and the products go
straight to cuBLAS; every other line of conv2d_forward_gpu/backward_gpu is the
same on NumPy, where the gather is a strided view. So these tests check the
layout arithmetic (chunks, a short last chunk, the (O, images, pixels)
transpose, the row of ones that gives dL/db, every choice of which gradients
to make) against the plain kernels without a GPU; tests/gpu/test_kernels_cuda.py
checks the CUDA kernels against these.
"""
import numpy as np
import pytest

from autograd.fast import conv_gpu
from autograd.kernels import conv as plain_conv
from autograd.kernels.conv import output_size

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
SHAPE_IDS = [f"{x}*{w} s{s} p{p}" for x, w, s, p in SHAPES]

# one chunk; image by image; two images a chunk (a short last chunk for odd batches)
CHUNKS = {"one chunk": 1 << 30, "image by image": 1, "two a chunk": "two"}


def gpu_chunk_bytes(chunk, w_shape, P):
    """_GPU_CHUNK_BYTES for `chunk`; "two": the backward's patches and their
    gradients of two images (2-4 images a chunk forward, 2-3 backward,
    depending on which gradients are asked for)."""
    if chunk != "two":
        return chunk
    C, kh, kw = w_shape[1:]
    return 2 * (2 * C * kh * kw + 1) * P * 8


NEEDS = [(True, True, True), (True, False, False), (False, True, False), (False, False, True),
         (True, False, True), (False, True, True), (True, True, False)]


@pytest.mark.parametrize("chunk", list(CHUNKS.values()), ids=list(CHUNKS))
@pytest.mark.parametrize("x_shape, w_shape, stride, padding", SHAPES, ids=SHAPE_IDS)
def test_gpu_conv_path_matches_the_plain_kernels(x_shape, w_shape, stride, padding, chunk, monkeypatch):
    P = output_size(x_shape[2], w_shape[2], stride, padding) * output_size(x_shape[3], w_shape[3], stride, padding)
    monkeypatch.setattr(conv_gpu, "_GPU_CHUNK_BYTES", gpu_chunk_bytes(chunk, w_shape, P))
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal(x_shape), rng.standard_normal(w_shape)
    b = rng.standard_normal(w_shape[0])
    for bias in (None, b):
        want = plain_conv.conv2d_forward.plain(x, w, bias, stride, padding)
        y = conv_gpu.conv2d_forward_gpu(x, w, bias, stride, padding)
        np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)
    grad = rng.standard_normal(y.shape)
    want = plain_conv.conv2d_backward.plain(grad, x, w, stride, padding, True, True, True)
    for need in NEEDS:
        got = conv_gpu.conv2d_backward_gpu(grad, x, w, stride, padding, *need)
        for name, g, ref, needed in zip(("dx", "dw", "db"), got, want, need):
            if not needed:
                assert g is None, f"{name} not asked for, yet computed"
            else:
                assert g.shape == ref.shape
                np.testing.assert_allclose(g, ref, rtol=1e-11, atol=1e-11, err_msg=f"{name} of {need}")


def test_gpu_conv_gradients_by_finite_differences():
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal((2, 2, 5, 5)), rng.standard_normal((3, 2, 3, 3))
    grad = rng.standard_normal((2, 3, 3, 3))
    dx, dw, _ = conv_gpu.conv2d_backward_gpu(grad, x, w, 2, 1, True, True, False)
    h = 1e-6
    f = {"x": lambda a: np.sum(grad * conv_gpu.conv2d_forward_gpu(a, w, None, 2, 1)),
         "w": lambda a: np.sum(grad * conv_gpu.conv2d_forward_gpu(x, a, None, 2, 1))}
    for name, arr, d, indices in (("x", x, dx, [(0, 1, 2, 3), (1, 0, 0, 0), (0, 0, 4, 4)]),
                                  ("w", w, dw, [(2, 1, 0, 2), (0, 0, 1, 1)])):
        for idx in indices:
            plus, minus = arr.copy(), arr.copy()
            plus[idx] += h
            minus[idx] -= h
            assert d[idx] == pytest.approx((f[name](plus) - f[name](minus)) / (2 * h), rel=1e-6, abs=1e-8), \
                f"d{name}{idx}"


def test_gather_matches_the_plain_im2col_and_scatter_is_its_adjoint():
    """<gather(x), c> = <x, scatter(c)>: the backward's dL/dx is exactly the gather's transpose."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 2, 6, 7))
    k, s, p = 3, 2, 1
    Ho, Wo = output_size(6, k, s, p), output_size(7, k, s, p)
    shape = (3, 2 * k * k, Ho * Wo)
    cols = conv_gpu.gather_patches(x, k, k, s, p, np.empty(shape))
    np.testing.assert_array_equal(cols, plain_conv.im2col(x, k, k, s, p))
    c = rng.standard_normal(shape)
    dx = conv_gpu.scatter_patches(c, k, k, s, p, np.empty_like(x))
    assert np.vdot(cols, c) == pytest.approx(np.vdot(x, dx), rel=1e-12)
    np.testing.assert_allclose(dx, plain_conv.col2im(c, x.shape, k, k, s, p), rtol=1e-14, atol=1e-14)


def test_patch_strides_accept_any_stride_on_an_axis_of_length_one():
    """CuPy's reshape gives an axis of length 1 the next axis's stride (a 1x1
    output, one image in a chunk): the rows are still runs of memory."""
    base = np.zeros(64)
    cols = np.lib.stride_tricks.as_strided(base, (1, 4, 1), (32, 32, 32))
    assert conv_gpu._cols_strides(cols, base.dtype) == (4, 4)
    with pytest.raises(ValueError, match="runs of memory"):
        conv_gpu._cols_strides(np.lib.stride_tricks.as_strided(base, (1, 4, 2), (32, 8, 16)), base.dtype)
    with pytest.raises(TypeError, match="dtype"):
        conv_gpu._cols_strides(cols, np.float32)


@pytest.mark.parametrize("pixels", [1, 31, 32, 49, 256, 257, 784, 100000])
def test_grid_covers_every_pixel_with_warp_sized_blocks(pixels):
    (blocks, rows, images), (block,) = conv_gpu._grid(pixels, 7, 3)
    assert (rows, images) == (7, 3)
    assert block % 32 == 0 and block <= 256
    assert blocks * block >= pixels > (blocks - 1) * block       # enough blocks, none idle


def test_grid_refuses_what_the_kernels_cannot_index():
    for pixels, rows, images in ((10, 65536, 1), (10, 1, 65536), (1 << 31, 1, 1)):
        with pytest.raises(ValueError, match="too large for the GPU kernels' grid"):
            conv_gpu._grid(pixels, rows, images)


def test_gpu_chunks_hold_at_most_65535_images():
    """The kernels' grid has the images of a chunk on an axis of at most 65535 blocks."""
    assert conv_gpu._gpu_chunk(100000, 1, 4) == 65535
    assert conv_gpu._gpu_chunk(3, conv_gpu._GPU_CHUNK_BYTES, 8) == 1       # one image is always allowed
