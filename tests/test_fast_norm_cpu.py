"""The CPU group norm twins (autograd/fast/norm_cpu.py) equal the plain kernels.

The plain group norm and group norm + SiLU of autograd/kernels/norm.py are
the oracle: the fused kernels (two reductions, then x a + c; SiLU through
tanh; the backward from two sums per channel) give their numbers to float64
rounding at small and at the UNet's sizes, in one chunk or image by image,
and float32 stays float32. Through the ops (F.group_norm_silu with the fast
layer on) the gradients also pass the finite-difference check. The kernels
narrow NumPy's buffer for long rows and always put it back.
"""
import numpy as np
import pytest

import autograd
import autograd.functional as F
from autograd import fast
from autograd.fast import memory, norm_cpu
from autograd.kernels import norm as plain_norm
from fast_helpers import fast_on, images_per_chunk  # noqa: F401  (fixture)
from helpers import case, check_gradient

EPS = 1e-5
SHAPES = [
    # x shape, groups
    ((2, 4, 3, 3), 2),
    ((3, 2, 2, 5), 1),
    ((2, 6, 5), 3),              # 3-D input
    ((2, 6, 1, 1), 3),           # one pixel
    ((4, 32, 28, 28), 8),        # mnist-tiny at 28x28
    ((8, 64, 14, 14), 32),       # mnist at 14x14: groups of 2 channels
]
SHAPE_IDS = [f"{x} G{g}" for x, g in SHAPES]


def norm_inputs(x_shape, dtype=np.float64, seed=0):
    """x off centre (var = E[x^2] - mean^2 must hold up), weight away from 1, bias from 0, dL/dy."""
    rng = np.random.default_rng(seed)
    C = x_shape[1]
    x = 2 * rng.standard_normal(x_shape) + 0.5
    w, b = rng.standard_normal(C) + 1.5, rng.standard_normal(C)
    g = rng.standard_normal(x_shape)
    return [a.astype(dtype) for a in (x, w, b, g)]


def fused(x, G, w, b, g, silu):
    """(y, dx, dw, db) from the fast kernels."""
    y, mean, rstd, u = norm_cpu.group_norm_fused_forward(x, G, w, b, EPS, silu=silu)
    return (y,) + norm_cpu.group_norm_fused_backward(g, x, mean, rstd, G, w, y if silu else None, u)


def plain(x, G, w, b, g, silu):
    """(y, dx, dw, db) from the plain kernels."""
    forward, backward = ((plain_norm.group_norm_silu_forward, plain_norm.group_norm_silu_backward) if silu
                         else (plain_norm.group_norm_forward, plain_norm.group_norm_backward))
    y, saved = forward.plain(x, G, w, b, EPS)
    return (y,) + backward.plain(g, saved)


def assert_close(actual, expected, rtol, atol_scale):
    for name, a, e in zip(["y", "dx", "dw", "db"], actual, expected):
        assert a.shape == e.shape and a.dtype == e.dtype, f"{name}: {a.shape} {a.dtype} vs {e.shape} {e.dtype}"
        np.testing.assert_allclose(a, e, rtol=rtol, atol=atol_scale * max(1.0, float(np.abs(e).max())),
                                   err_msg=name)


@pytest.mark.parametrize("per_chunk", [None, 1], ids=["default chunks", "image by image"])
@pytest.mark.parametrize("silu", [False, True], ids=["group_norm", "group_norm_silu"])
@pytest.mark.parametrize("x_shape, G", SHAPES, ids=SHAPE_IDS)
def test_fused_group_norm_matches_the_plain_kernels(x_shape, G, silu, per_chunk, monkeypatch):
    x, w, b, g = norm_inputs(x_shape)
    if per_chunk is not None:
        images_per_chunk(monkeypatch, per_chunk)
    assert_close(fused(x, G, w, b, g, silu), plain(x, G, w, b, g, silu), rtol=1e-10, atol_scale=1e-12)


@pytest.mark.parametrize("silu", [False, True], ids=["group_norm", "group_norm_silu"])
@pytest.mark.parametrize("x_shape, G", [SHAPES[0], SHAPES[4]], ids=[SHAPE_IDS[0], SHAPE_IDS[4]])
def test_fused_group_norm_float32_in_float32_out_with_the_plain_numbers(x_shape, G, silu):
    inputs = norm_inputs(x_shape, np.float32)
    # float32 sums over a group of up to 3136 values: ~1e-5 of the largest value
    assert_close(fused(*inputs[:1], G, *inputs[1:], silu), plain(*inputs[:1], G, *inputs[1:], silu),
                 rtol=1e-5, atol_scale=1e-5)


def test_chunks_change_no_number(monkeypatch):
    """Image by image or the whole batch at once: the same bits (every sum is per example)."""
    x, w, b, g = norm_inputs((6, 8, 5, 5))
    whole = fused(x, 4, w, b, g, silu=True)
    images_per_chunk(monkeypatch, 1)
    for a, e in zip(fused(x, 4, w, b, g, silu=True), whole):
        np.testing.assert_array_equal(a, e)


def test_group_norm_silu_without_keeping_u_gives_the_same_output(monkeypatch):
    x, w, b, _ = norm_inputs((5, 8, 6, 6))
    monkeypatch.setattr(norm_cpu, "_CHUNK_BYTES", 1)             # one image per chunk: scratch reused
    y, mean, rstd, u = norm_cpu.group_norm_fused_forward(x, 4, w, b, EPS, silu=True)
    y2, mean2, rstd2, u2 = norm_cpu.group_norm_fused_forward(x, 4, w, b, EPS, silu=True, keep_u=False)
    assert u is not None and u2 is None
    for a, e in ((y2, y), (mean2, mean), (rstd2, rstd)):
        np.testing.assert_array_equal(a, e)


@pytest.mark.parametrize("silu", [False, True], ids=["group_norm", "group_norm_silu"])
def test_the_twins_save_u_only_when_a_backward_may_come(silu, fast_on):
    """fast.group_norm(_silu)_forward on NumPy: norm_cpu's kernel, keep_u from the grad mode."""
    x, w, b, g = norm_inputs((3, 4, 5, 5))
    forward = fast.group_norm_silu_forward if silu else fast.group_norm_forward
    y, saved = forward(x, 2, w, b, EPS)
    with autograd.no_grad():
        y_sampling, saved_sampling = forward(x, 2, w, b, EPS)
    np.testing.assert_array_equal(y_sampling, y)
    assert (saved[4] is not None) == silu and saved_sampling[4] is None          # u
    assert_close((y,) + fast._group_norm_grad(g, saved), plain(x, 2, w, b, g, silu),
                 rtol=1e-10, atol_scale=1e-12)


# Through the op, with the twins in place: the finite-difference check.
GRADIENT_CASES = [
    case("group_norm_silu 2 groups", lambda x, w, b: F.group_norm_silu(x, 2, w, b), None,
         (2, 4, 3, 3), (4,), (4,)),
    case("group_norm_silu no affine 3-D", lambda x: F.group_norm_silu(x, 3), None, (2, 6, 5)),
    case("group_norm 1 group batch 3", lambda x, w, b: F.group_norm(x, 1, w, b), None,
         (3, 2, 2, 5), (2,), (2,)),
]


@pytest.mark.parametrize("c", GRADIENT_CASES)
def test_fused_gradient_matches_finite_differences(c, fast_on):
    check_gradient(c, mode="elements")


@pytest.mark.parametrize("c", [
    case("group_norm_silu 8 groups 32 @28", lambda x, w, b: F.group_norm_silu(x, 8, w, b), None,
         (4, 32, 28, 28), (32,), (32,)),
])
def test_fused_adjoint_gradient_check_at_unet_size(c, fast_on):
    check_gradient(c, mode="adjoint")


# =============================================================================
# NumPy's buffer size (fast/memory.py's narrow_buffer)
# =============================================================================

def test_narrow_buffer_narrows_only_long_rows_and_restore_puts_it_back():
    before = np.getbufsize()
    assert memory.narrow_buffer(49) is None and np.getbufsize() == before      # 7x7 rows: left alone
    previous = memory.narrow_buffer(784)
    assert previous == before and np.getbufsize() < 784
    memory.restore_buffer(previous)
    assert np.getbufsize() == before


def test_group_norm_leaves_numpys_buffer_size_as_it_found_it(monkeypatch):
    """The kernels narrow NumPy's buffer for rows of 28x28 maps and must put it
    back, also when a chunk fails; their results do not depend on it."""
    x, w, b, g = norm_inputs((3, 4, 28, 28))
    before = np.getbufsize()
    results = fused(x, 2, w, b, g, silu=True)
    assert np.getbufsize() == before
    old = np.setbufsize(8192 * 2)
    try:
        wider = fused(x, 2, w, b, g, silu=True)
    finally:
        np.setbufsize(old)
    for a, e in zip(wider, results):
        np.testing.assert_array_equal(a, e)

    class Failing:                         # numpy, but a chunk's multiply fails
        def __getattr__(self, name):
            return getattr(np, name)

        def multiply(self, *args, **kwargs):
            assert np.getbufsize() < 784   # inside the narrowed part
            raise FloatingPointError("a chunk failed")

    monkeypatch.setattr(norm_cpu, "get_array_module", lambda *arrays: Failing())
    with pytest.raises(FloatingPointError, match="a chunk failed"):
        norm_cpu.group_norm_fused_forward(x, 2, w, b, EPS, silu=True)
    assert np.getbufsize() == before
