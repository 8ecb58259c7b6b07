"""The CPU convolution and upsampling twins (autograd/fast/conv_cpu.py) equal the plain kernels.

The plain kernels of autograd/kernels/conv.py (im2col and one product) are
the oracle: every path of the twin (chunks of images, rows without side
padding, left-padded rows, the bias inside the product, the output-side
forward, the backward from dL/dy's patches, 1x1) gives their numbers to
float64 rounding, and float32 stays float32. The patch views the twin makes
with as_strided stay inside their buffers.
"""
import numpy as np
import pytest

from autograd.fast import conv_cpu
from autograd.kernels import conv as plain_conv
from fast_helpers import CONV_CASES, CONV_IDS, conv_arrays, images_per_chunk

plain_forward = plain_conv.conv2d_forward.plain
plain_backward = plain_conv.conv2d_backward.plain

NEEDS = [(True, True, True), (True, False, False), (False, True, False), (False, False, True),
         (True, True, False), (True, False, True), (False, True, True)]


def assert_like_plain(actual, expected, rtol=1e-11, atol_scale=1e-13, names=("dx", "dw", "db")):
    """Equal to rounding: float64 sums of products, so ~1e-15 of the largest value."""
    for name, a, e in zip(names, actual, expected):
        if e is None:
            assert a is None, f"{name}: not asked for, yet computed"
            continue
        assert a.shape == e.shape and a.dtype == e.dtype, f"{name}: {a.shape} {a.dtype} vs {e.shape} {e.dtype}"
        np.testing.assert_allclose(a, e, rtol=rtol, atol=atol_scale * float(np.abs(e).max()), err_msg=name)


@pytest.mark.parametrize("per_chunk", [None, 1, 4], ids=["default chunks", "image by image", "4 a chunk"])
@pytest.mark.parametrize("x_shape, w_shape, stride, padding, bias", CONV_CASES, ids=CONV_IDS)
def test_conv_matches_the_plain_kernel(x_shape, w_shape, stride, padding, bias, per_chunk, monkeypatch):
    x, w, b, g = conv_arrays(x_shape, w_shape, stride, padding, bias)
    if per_chunk is not None:
        images_per_chunk(monkeypatch, per_chunk)
    y = conv_cpu.conv2d_forward(x, w, b, stride, padding)
    assert_like_plain([y], [plain_forward(x, w, b, stride, padding)], names=["y"])
    want = plain_backward(g, x, w, stride, padding, True, True, True)
    for need in NEEDS:
        got = conv_cpu.conv2d_backward(g, x, w, stride, padding, *need)
        assert_like_plain(got, [e if asked else None for e, asked in zip(want, need)])


@pytest.mark.parametrize("x_shape, w_shape, stride, padding, bias", [
    CONV_CASES[0], CONV_CASES[3], CONV_CASES[5], CONV_CASES[7]], ids=["3x3", "output side", "stride 2", "1x1"])
def test_conv_float32_in_float32_out_with_the_plain_numbers(x_shape, w_shape, stride, padding, bias,
                                                           monkeypatch):
    x, w, b, g = conv_arrays(x_shape, w_shape, stride, padding, bias, dtype=np.float32)
    images_per_chunk(monkeypatch, 4)
    got = [conv_cpu.conv2d_forward(x, w, b, stride, padding)] + list(
        conv_cpu.conv2d_backward(g, x, w, stride, padding, True, True, bias))
    want = [plain_forward(x, w, b, stride, padding)] + list(
        plain_backward(g, x, w, stride, padding, True, True, bias))
    # float32 sums of up to a few thousand terms: rounding ~1e-6 of the largest value
    for name, a, e in zip(["y", "dx", "dw", "db"], got, want):
        if e is None:
            assert a is None
            continue
        assert a.dtype == np.float32, f"{name} is {a.dtype}"
        np.testing.assert_allclose(a, e, rtol=1e-4, atol=5e-6 * float(np.abs(e).max()), err_msg=name)


@pytest.mark.parametrize("need, x_shape, w_shape, shared", [
    ((True, True, True), (2, 4, 12, 12), (6, 4, 3, 3), True),
    ((True, True, False), (2, 4, 12, 12), (6, 4, 3, 3), True),
    ((True, False, True), (2, 4, 12, 12), (6, 4, 3, 3), False),    # no dL/dw: dL/dx alone
    ((False, True, True), (2, 4, 12, 12), (6, 4, 3, 3), False),    # no dL/dx: x's patches
    ((True, True, True), (2, 4, 28, 28), (12, 4, 3, 3), False),    # dL/dx output-side (O >= 2 C at 28x28)
])
def test_backward_from_the_patches_of_dy_is_taken_when_both_gradients_are(need, x_shape, w_shape,
                                                                          shared, monkeypatch):
    calls = []
    real = conv_cpu._conv2d_backward_shared_patches
    monkeypatch.setattr(conv_cpu, "_conv2d_backward_shared_patches",
                        lambda *args: calls.append(1) or real(*args))
    x, w, _, g = conv_arrays(x_shape, w_shape, 1, 1, False)
    got = conv_cpu.conv2d_backward(g, x, w, 1, 1, *need)
    assert bool(calls) == shared
    want = plain_backward(g, x, w, 1, 1, *need)
    assert_like_plain(got, want)


@pytest.mark.parametrize("x_shape, w_shape, padding", [
    ((2, 96, 28, 28), (32, 96, 3, 3), 1),    # up path, 96 -> 32
    ((2, 32, 28, 28), (1, 32, 3, 3), 1),     # conv_out
    ((2, 6, 29, 30), (3, 6, 3, 3), 1),       # odd, non-square map
    ((2, 2, 6, 1), (1, 2, 1, 5), 2),         # a kernel wider than the padded row minus one (_padded_row)
])
@pytest.mark.parametrize("chunk_bytes", [1, 1 << 20], ids=["image by image", "default"])
def test_output_side_conv_matches_the_plain_kernel(x_shape, w_shape, padding, chunk_bytes, monkeypatch):
    rng = np.random.default_rng(0)
    x, w, b = rng.standard_normal(x_shape), rng.standard_normal(w_shape), rng.standard_normal(w_shape[0])
    monkeypatch.setattr(conv_cpu, "_CHUNK_BYTES", chunk_bytes)
    for bias in (None, b):
        got = conv_cpu._conv2d_forward_output_side(x, w, padding, None if bias is None else bias.reshape(-1, 1, 1, 1))
        assert_like_plain([got], [plain_forward(x, w, bias, 1, padding)], names=["y"])


def test_the_output_side_path_is_taken_where_c_in_is_well_above_c_out(monkeypatch):
    """The dispatch of conv2d_forward: stride 1, C_in >= 2 C_out, 28x28 or larger."""
    calls = []
    real = conv_cpu._conv2d_forward_output_side
    monkeypatch.setattr(conv_cpu, "_conv2d_forward_output_side", lambda *a: calls.append(a[1].shape) or real(*a))
    rng = np.random.default_rng(1)
    for c_in, side in ((8, 28), (4, 28), (8, 14)):
        conv_cpu.conv2d_forward(rng.standard_normal((1, c_in, side, side)), rng.standard_normal((4, c_in, 3, 3)),
                                None, 1, 1)
    assert calls == [(4, 8, 3, 3)]


@pytest.mark.parametrize("x_shape, w_shape, stride, padding", [
    ((3, 2, 5, 4), (3, 2, 3, 3), 1, 1),       # rows without side padding, short last chunk
    ((2, 2, 3, 2), (3, 2, 1, 7), 1, 3),       # kernel columns past both edges
    ((2, 3, 6, 6), (2, 3, 4, 4), 1, 1),       # output narrower than the input
    ((2, 2, 5, 4), (3, 2, 2, 2), 1, 0),
    ((2, 2, 3, 1), (3, 2, 1, 6), 1, 3),       # left-padded rows shorter than the kernel
    ((2, 2, 5, 6), (3, 2, 3, 3), 1, 2),       # left-padded rows
    ((2, 2, 7, 6), (3, 2, 2, 3), 2, 1),       # stride 2
])
@pytest.mark.parametrize("chunk_bytes", [1, 1 << 20], ids=["image by image", "default"])
def test_im2col_views_stay_inside_their_buffers(x_shape, w_shape, stride, padding, chunk_bytes, monkeypatch):
    """The patch views are made with as_strided, which checks nothing: a view
    that reaches past its buffer reads other memory (and the wrap fixes would
    hide it in the numbers). Every view made must lie inside its base array."""
    try:
        byte_bounds = np.lib.array_utils.byte_bounds          # NumPy 2
    except AttributeError:                                     # pragma: no cover - NumPy 1.x
        byte_bounds = np.byte_bounds
    real = np.lib.stride_tricks.as_strided
    made = []

    def recording(base, shape, strides):
        view = real(base, shape, strides)
        made.append((view, base))
        return view

    monkeypatch.setattr(np.lib.stride_tricks, "as_strided", recording)
    monkeypatch.setattr(conv_cpu, "_CHUNK_BYTES", chunk_bytes)
    x, w, b, g = conv_arrays(x_shape, w_shape, stride, padding, True)
    y = conv_cpu.conv2d_forward(x, w, b, stride, padding)
    conv_cpu.conv2d_backward(g, x, w, stride, padding, True, True, True)
    conv_cpu.conv2d_backward(g, x, w, stride, padding, False, True, False)
    assert made
    for view, base in made:
        lo, hi = byte_bounds(view)
        base_lo, base_hi = byte_bounds(base)
        assert base_lo <= lo and hi <= base_hi, (view.shape, view.strides, base.shape)
    assert_like_plain([y], [plain_forward(x, w, b, stride, padding)], names=["y"])


@pytest.mark.parametrize("chunk_bytes", [1, 1 << 20], ids=["image by image", "default"])
@pytest.mark.parametrize("scale", [1, 2, 3])
def test_upsample_matches_the_plain_kernel(scale, chunk_bytes, monkeypatch):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((7, 3, 4, 5))
    g = rng.standard_normal((7, 3, 4 * scale, 5 * scale))
    monkeypatch.setattr(conv_cpu, "_CHUNK_BYTES", chunk_bytes)
    np.testing.assert_array_equal(conv_cpu.upsample_nearest2d_forward(x, scale),
                                  plain_conv.upsample_nearest2d_forward.plain(x, scale))
    # The block sums in another order than the plain reduction: equal to rounding.
    np.testing.assert_allclose(conv_cpu.upsample_nearest2d_backward(g, scale),
                               plain_conv.upsample_nearest2d_backward.plain(g, scale), rtol=1e-12, atol=1e-14)
