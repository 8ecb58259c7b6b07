"""Fused ops equal the composition of the unfused ops they replace.

Each fused op is checked three ways: its gradients against finite differences
in float64 (element by element at a small size, the adjoint test at the
UNet's sizes), its forward and its gradients against the same computation
composed from the unfused ops, and float32 in, float32 out.
"""
import numpy as np
import pytest

import autograd.functional as F
from autograd.kernels import conv as conv_k
from autograd.kernels import norm as norm_k
from helpers import case, check_float32, check_forward, check_gradient


def group_norm_silu_composed(x, num_groups, w=None, b=None):
    return F.silu(F.group_norm(x, num_groups, w, b))


def group_norm_silu_np(x, num_groups, w=None, b=None, eps=1e-5):
    """The same, written independently in NumPy."""
    B, C = x.shape[:2]
    xg = x.reshape(B, num_groups, -1)
    z = ((xg - xg.mean(axis=2, keepdims=True)) / np.sqrt(xg.var(axis=2, keepdims=True) + eps)).reshape(x.shape)
    channel = (1, C) + (1,) * (x.ndim - 2)
    if w is not None:
        z = z * w.reshape(channel) + b.reshape(channel)
    return z / (1 + np.exp(-z))


def _tensors(shapes, dtype=np.float64, seed=0):
    from autograd import Tensor
    rng = np.random.default_rng(seed)
    return [Tensor(rng.standard_normal(s).astype(dtype), requires_grad=True) for s in shapes]


SMALL = [
    case("group_norm_silu 2 groups", lambda x, w, b: F.group_norm_silu(x, 2, w, b),
         lambda x, w, b: group_norm_silu_np(x, 2, w, b), (2, 4, 3, 3), (4,), (4,)),
    case("group_norm_silu 1 group batch 3", lambda x, w, b: F.group_norm_silu(x, 1, w, b),
         lambda x, w, b: group_norm_silu_np(x, 1, w, b), (3, 2, 2, 5), (2,), (2,)),
    case("group_norm_silu no affine 3-D", lambda x: F.group_norm_silu(x, 3),
         lambda x: group_norm_silu_np(x, 3), (2, 6, 5)),
]

# The UNet's sizes: mnist-tiny at 28x28 (8 groups), mnist at 14x14 (32 groups).
REALISTIC = [
    case("group_norm_silu 8 groups 32 @28", lambda x, w, b: F.group_norm_silu(x, 8, w, b), None,
         (4, 32, 28, 28), (32,), (32,)),
    case("group_norm_silu 32 groups 64 @14", lambda x, w, b: F.group_norm_silu(x, 32, w, b), None,
         (8, 64, 14, 14), (64,), (64,)),
]


@pytest.mark.parametrize("c", SMALL)
def test_fused_gradient_matches_finite_differences(c):
    check_gradient(c, mode="elements")


@pytest.mark.parametrize("c", REALISTIC)
def test_fused_adjoint_gradient_check_at_unet_size(c):
    check_gradient(c, mode="adjoint")


@pytest.mark.parametrize("c", SMALL)
def test_fused_forward_matches_numpy(c):
    check_forward(c)


@pytest.mark.parametrize("c", SMALL)
def test_fused_float32_in_float32_out(c):
    check_float32(c)


@pytest.mark.parametrize("x_shape, num_groups, affine", [
    ((2, 4, 3, 3), 2, True),
    ((3, 6, 5), 3, False),
    ((4, 32, 28, 28), 8, True),      # several chunks of images (see kernels/norm.py)
    ((8, 64, 14, 14), 32, True),
])
def test_group_norm_silu_matches_silu_of_group_norm(x_shape, num_groups, affine):
    C = x_shape[1]
    shapes = [x_shape, (C,), (C,)] if affine else [x_shape]
    cotangent = np.random.default_rng(3).standard_normal(x_shape)
    results = []
    for op in (F.group_norm_silu, group_norm_silu_composed):
        inputs = _tensors(shapes)
        if affine:   # a weight away from 1 and a bias away from 0
            inputs[1].data = inputs[1].data + 1.5
        out = op(inputs[0], num_groups, *inputs[1:])
        (out * cotangent).sum().backward()
        results.append([out.numpy()] + [t.grad for t in inputs])
    for fused, composed in zip(*results):
        np.testing.assert_allclose(fused, composed, rtol=1e-10, atol=1e-12)


def test_group_norm_silu_chunks_agree_with_one_chunk(monkeypatch):
    """Going through the batch a few images at a time changes no number."""
    x, w, b = _tensors([(6, 8, 5, 5), (8,), (8,)])
    g = np.random.default_rng(1).standard_normal(x.shape)

    def run():
        y, mean, rstd, u = norm_k.group_norm_fused_forward(x.data, 4, w.data, b.data, 1e-5, silu=True)
        return (y,) + norm_k.group_norm_fused_backward(g, x.data, mean, rstd, 4, w.data, y, u)

    one_chunk = run()
    monkeypatch.setitem(norm_k._CHUNK_BYTES, "cpu", 1)    # one image per chunk
    for a, b_ in zip(run(), one_chunk):
        np.testing.assert_allclose(a, b_, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("x_shape, w_shape, stride, padding", [
    ((3, 2, 5, 4), (3, 2, 3, 3), 1, 1),       # rows without side padding, short last chunk
    ((2, 2, 3, 2), (3, 2, 1, 7), 1, 3),       # kernel columns past both edges
    ((2, 3, 6, 6), (2, 3, 4, 4), 1, 1),       # output narrower than the input
    ((2, 2, 5, 4), (3, 2, 2, 2), 1, 0),
    ((2, 2, 3, 1), (3, 2, 1, 6), 1, 3),       # left-padded rows shorter than the kernel
    ((2, 2, 5, 6), (3, 2, 3, 3), 1, 2),       # left-padded rows
    ((2, 2, 7, 6), (3, 2, 2, 3), 2, 1),       # stride 2
])
@pytest.mark.parametrize("chunk_bytes", [1, 1 << 20])
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
    monkeypatch.setitem(conv_k._CHUNK_BYTES, "cpu", chunk_bytes)
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal(x_shape), rng.standard_normal(w_shape)
    g = rng.standard_normal(conv_k.conv2d_forward(x, w, stride, padding).shape)
    conv_k.conv2d_backward(g, x, w, stride, padding, need_x=True, need_w=True, need_b=True)
    conv_k.conv2d_backward(g, x, w, stride, padding, need_x=False, need_w=True)
    assert made
    for view, base in made:
        lo, hi = byte_bounds(view)
        base_lo, base_hi = byte_bounds(base)
        assert base_lo <= lo and hi <= base_hi, (view.shape, view.strides, base.shape)


def test_group_norm_leaves_numpys_buffer_size_as_it_found_it(monkeypatch):
    """The kernels narrow NumPy's buffer for rows of 28x28 maps (backend.narrow_buffer)
    and must put it back, also when a chunk fails; results do not depend on it."""
    from autograd import backend
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 4, 28, 28))
    w, b, g = rng.standard_normal(4), rng.standard_normal(4), rng.standard_normal(x.shape)
    before = np.getbufsize()
    y, mean, rstd, u = norm_k.group_norm_fused_forward(x, 2, w, b, 1e-5, silu=True)
    grads = norm_k.group_norm_fused_backward(g, x, mean, rstd, 2, w, y, u)
    assert np.getbufsize() == before
    old = np.setbufsize(8192 * 2)          # the kernels' results do not depend on the buffer
    try:
        y2 = norm_k.group_norm_fused_forward(x, 2, w, b, 1e-5, silu=True)[0]
        grads2 = norm_k.group_norm_fused_backward(g, x, mean, rstd, 2, w, y, u)
    finally:
        np.setbufsize(old)
    np.testing.assert_array_equal(y2, y)
    for a, b_ in zip(grads2, grads):
        np.testing.assert_array_equal(a, b_)
    assert backend.narrow_buffer(49) is None and np.getbufsize() == before
    previous = backend.narrow_buffer(784)
    assert previous == before and np.getbufsize() < 784
    backend.restore_buffer(previous)
    assert np.getbufsize() == before

    class Failing:                         # numpy, but a chunk's multiply fails
        def __getattr__(self, name):
            return getattr(np, name)

        def multiply(self, *args, **kwargs):
            assert np.getbufsize() < 784   # inside the narrowed part
            raise FloatingPointError("a chunk failed")
    monkeypatch.setattr(norm_k, "get_array_module", lambda *arrays: Failing())
    with pytest.raises(FloatingPointError, match="a chunk failed"):
        norm_k.group_norm_fused_forward(x, 2, w, b, 1e-5, silu=True)
    assert np.getbufsize() == before


# =============================================================================
# Convolution by shifted outputs (kernels/conv.py, used where C_in >= 2 C_out at 28x28)
# =============================================================================

@pytest.mark.parametrize("x_shape, w_shape, padding", [
    ((2, 96, 28, 28), (32, 96, 3, 3), 1),    # up path, 96 -> 32
    ((2, 32, 28, 28), (1, 32, 3, 3), 1),     # conv_out
    ((2, 6, 29, 30), (3, 6, 3, 3), 1),       # odd, non-square map (chunk of one image below)
    ((2, 2, 6, 1), (1, 2, 1, 5), 2),         # a kernel wider than the padded row minus one (_padded_row)
])
def test_output_side_conv_matches_reference(x_shape, w_shape, padding, monkeypatch):
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal(x_shape), rng.standard_normal(w_shape)
    expected = conv_k.conv2d_reference(x, w, 1, padding)
    got = conv_k._conv2d_forward_output_side(x, w, padding)
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-10)
    monkeypatch.setitem(conv_k._CHUNK_BYTES, "cpu", 1)
    got = conv_k._conv2d_forward_output_side(x, w, padding)
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("c", [
    case("conv2d 96->32 @28 (output side)", lambda x, w, b: F.conv2d(x, w, b, padding=1), None,
         (2, 96, 28, 28), (32, 96, 3, 3), (32,)),
])
def test_output_side_conv_adjoint_gradient_check(c):
    check_gradient(c, mode="adjoint")


# =============================================================================
# Convolution plus an addition (F.conv2d(..., add=r): the UNet's time-embedding
# shift and residual connections, added as the convolution writes its output)
# =============================================================================

def conv2d_add_np(x, w, b, r, stride=1, padding=0):
    """The same, from the loop-over-offsets oracle and a NumPy addition."""
    return conv_k.conv2d_reference(x, w, stride, padding) + b.reshape(1, -1, 1, 1) + r


# Every forward path of conv2d_forward (3x3 by im2col, at stride 2, output side,
# 1x1), each with an addend of the output's full shape and one per (example, channel).
CONV_ADD = [
    case("conv2d 3x3 + full", lambda x, w, b, r: F.conv2d(x, w, b, padding=1, add=r),
         lambda x, w, b, r: conv2d_add_np(x, w, b, r, 1, 1), (3, 4, 5, 5), (6, 4, 3, 3), (6,), (3, 6, 5, 5)),
    case("conv2d 3x3 + per channel", lambda x, w, b, r: F.conv2d(x, w, b, padding=1, add=r),
         lambda x, w, b, r: conv2d_add_np(x, w, b, r, 1, 1), (3, 4, 5, 5), (6, 4, 3, 3), (6,), (3, 6, 1, 1)),
    case("conv2d 3x3 stride 2 + shared", lambda x, w, b, r: F.conv2d(x, w, b, stride=2, padding=1, add=r),
         lambda x, w, b, r: conv2d_add_np(x, w, b, r, 2, 1), (2, 3, 7, 6), (4, 3, 3, 3), (4,), (4, 1, 1)),
    case("conv2d 1x1 + full", lambda x, w, b, r: F.conv2d(x, w, b, add=r),
         lambda x, w, b, r: conv2d_add_np(x, w, b, r), (2, 6, 4, 3), (5, 6, 1, 1), (5,), (2, 5, 4, 3)),
    case("conv2d 1x1 + per channel", lambda x, w, b, r: F.conv2d(x, w, b, add=r),
         lambda x, w, b, r: conv2d_add_np(x, w, b, r), (2, 6, 4, 3), (5, 6, 1, 1), (5,), (2, 5, 1, 1)),
]
CONV_ADD_REALISTIC = [
    case("conv2d 96->32 @28 output side + full", lambda x, w, b, r: F.conv2d(x, w, b, padding=1, add=r),
         lambda x, w, b, r: conv2d_add_np(x, w, b, r, 1, 1), (2, 96, 28, 28), (32, 96, 3, 3), (32,),
         (2, 32, 28, 28)),
    case("conv2d 32->32 @28 + per channel", lambda x, w, b, r: F.conv2d(x, w, b, padding=1, add=r),
         lambda x, w, b, r: conv2d_add_np(x, w, b, r, 1, 1), (3, 32, 28, 28), (32, 32, 3, 3), (32,),
         (3, 32, 1, 1)),
]


@pytest.mark.parametrize("c", CONV_ADD + CONV_ADD_REALISTIC)
def test_conv2d_add_forward_matches_numpy(c):
    check_forward(c)


@pytest.mark.parametrize("c", CONV_ADD)
def test_conv2d_add_gradient_matches_finite_differences(c):
    check_gradient(c, mode="elements")


@pytest.mark.parametrize("c", CONV_ADD_REALISTIC)
def test_conv2d_add_adjoint_gradient_check_at_unet_size(c):
    check_gradient(c, mode="adjoint")


@pytest.mark.parametrize("c", CONV_ADD)
def test_conv2d_add_float32_in_float32_out(c):
    check_float32(c)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("k, stride, c_in", [(3, 1, 4), (3, 2, 4), (1, 1, 4), (3, 1, 16)])
def test_conv2d_add_in_chunks_equals_conv_then_add(k, stride, c_in, dtype, monkeypatch):
    """One image per chunk (each chunk adds its own slice of r, some straight
    into the output) changes nothing; c_in 16 -> 4 at 28x28 takes the output-side path."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((5, c_in, 28, 28)).astype(dtype)
    w = rng.standard_normal((4, c_in, k, k)).astype(dtype)
    b = rng.standard_normal(4).astype(dtype)
    monkeypatch.setitem(conv_k._CHUNK_BYTES, "cpu", 1)
    y = conv_k.conv2d_forward(x, w, stride, k // 2, bias=b)
    assert y.dtype == dtype
    for r in (rng.standard_normal(y.shape).astype(dtype), rng.standard_normal((5, 4, 1, 1)).astype(dtype)):
        np.testing.assert_array_equal(conv_k.conv2d_forward(x, w, stride, k // 2, bias=b, add=r), y + r)


def test_conv2d_add_takes_stride_and_padding_as_conv2d_does():
    """Whole numbers given as floats are accepted, with or without add."""
    x, w = np.ones((2, 3, 5, 5)), np.ones((4, 3, 3, 3))
    y = F.conv2d(x, w, stride=2.0, padding=1.0)
    r = np.arange(4.0).reshape(1, 4, 1, 1)
    np.testing.assert_array_equal(F.conv2d(x, w, stride=2.0, padding=1.0, add=r).numpy(), y.numpy() + r)


def test_conv2d_add_of_the_wrong_shape_or_dtype_is_refused():
    x, w = np.zeros((2, 3, 5, 5)), np.zeros((4, 3, 3, 3))
    with pytest.raises(ValueError, match=r"add \(2, 3, 5, 5\) does not broadcast to the output \(2, 4, 5, 5\)"):
        F.conv2d(x, w, padding=1, add=np.zeros((2, 3, 5, 5)))
    with pytest.raises(ValueError, match=r"add \(2, 4, 5, 5\) does not broadcast to the output \(2, 4, 3, 3\)"):
        F.conv2d(x, w, add=np.zeros((2, 4, 5, 5)))
    with pytest.raises(TypeError, match="different dtypes"):
        F.conv2d(x, w, padding=1, add=np.zeros((2, 4, 1, 1), dtype=np.float32))
