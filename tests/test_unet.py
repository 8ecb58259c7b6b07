"""Tests for tinyddpm.unet: the DDPM UNet against its PyTorch reference, its
gradients, its time embedding, its zero initialization and its input checks.

The PyTorch comparison runs without torch: tools/make_unet_fixture.py (run
once with a torch venv) stored the reference's weights, input and output in
tests/fixtures/unet_tiny_reference.npz, and the parameter names and shapes of
both presets in tests/fixtures/unet_preset_shapes.json.
"""
import json
import math
import pathlib

import numpy as np
import pytest

import autograd
import autograd.functional as F
from autograd import Tensor, nn, no_grad, optim
from helpers import ADJOINT_TOL, ELEMENT_TOL, both_kernel_modes  # noqa: F401  (every test on both kernel sets)
from tinyddpm.unet import PRESETS, UNet

FIXTURES = pathlib.Path(__file__).parent / "fixtures"

# The configuration of the stored reference, small enough to gradcheck:
# 8x8 images, two levels (8 -> 4), attention at 4x4, every kind of block.
TINY = dict(in_channels=1, image_size=8, ch=8, ch_mult=(1, 2), num_res_blocks=1,
            attn_resolutions=(4,), dropout=0.0, num_groups=4)


def torch_name(name):
    """tinyddpm's parameter name as the reference spells it: the reference's
    attention block holds q, k, v, proj_out itself, ours in an `attn` child."""
    return name.replace(".attn.", ".")


@pytest.fixture(scope="module")
def reference():
    """The stored reference: weights (float64, exactly codes * scale), x, t, out."""
    with np.load(FIXTURES / "unet_tiny_reference.npz", allow_pickle=False) as f:
        ref = {k: f[k] for k in f.files}
    config = json.loads(str(ref["config"]))
    assert {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()} == TINY
    names = json.loads(str(ref["names"]))
    sizes = [math.prod(shape) for _, shape in names]
    codes = np.split(ref["codes"].astype(np.float64), np.cumsum(sizes)[:-1])
    ref["weights"] = [(c * s).reshape(shape) for c, s, (_, shape) in zip(codes, ref["scales"], names)]
    ref["names"] = names
    return ref


def load_by_position(model, weights, names):
    """Assign the reference's weights to `model` in order, after checking each shape."""
    ours = list(model.named_parameters())
    assert len(ours) == len(weights), f"{len(ours)} parameters, reference has {len(weights)}"
    for (name, p), w, (ref_name, ref_shape) in zip(ours, weights, names):
        assert (torch_name(name), tuple(p.shape)) == (ref_name, tuple(ref_shape))
        p.data[...] = w


def tiny_model(reference, dtype=np.float64):
    model = UNet(**TINY, dtype=dtype)
    load_by_position(model, reference["weights"], reference["names"])
    return model


def randomize(model, seed=0):
    """Random weights everywhere, at the scale of PyTorch's init: the
    zero-initialized layers would otherwise hide whatever comes before them."""
    rng = np.random.default_rng(seed)
    for name, p in model.named_parameters():
        if p.ndim > 1:
            value = rng.uniform(-1, 1, p.shape) / math.sqrt(math.prod(p.shape[1:]))
        else:
            value = ("norm" in name and name.endswith("weight")) + 0.2 * rng.standard_normal(p.shape)
        p.data[...] = value
    return model


def images(batch, size=28, seed=0, dtype=np.float32):
    return Tensor(np.random.default_rng(seed).standard_normal((batch, 1, size, size)).astype(dtype))


# =============================================================================
# Shapes, sizes and the parameter layout of the reference
# =============================================================================

@pytest.mark.parametrize("preset", ["mnist-tiny", "mnist"])
def test_output_has_the_input_shape_and_dtype(preset):
    model = UNet(**PRESETS[preset]).eval()
    x = images(2)
    with no_grad():
        out = model(x, np.array([0, 999]))
    assert out.shape == (2, 1, 28, 28)
    assert out.dtype == np.float32


@pytest.mark.parametrize("preset, count", [("mnist-tiny", 1_112_801), ("mnist", 6_469_889)])
def test_parameter_count_of_presets(preset, count):
    assert UNet(**PRESETS[preset]).num_parameters() == count


@pytest.mark.parametrize("preset", ["mnist-tiny", "mnist"])
def test_preset_parameters_have_the_reference_order_and_shapes(preset):
    """Same names (up to the `attn.` child) and shapes, in the same order, so
    weights carry over from the reference by position."""
    expected = json.loads((FIXTURES / "unet_preset_shapes.json").read_text())[preset]
    ours = [[torch_name(n), list(p.shape)] for n, p in UNet(**PRESETS[preset]).named_parameters()]
    assert len(ours) == len(expected)
    for i, (a, b) in enumerate(zip(ours, expected)):
        assert a == b, f"parameter {i}: ours {a}, reference {b}"


def test_output_matches_pytorch_reference_with_its_weights(reference):
    model = tiny_model(reference)
    with no_grad():
        out = model(Tensor(reference["x"]), reference["t"])
    assert out.dtype == np.float64
    assert np.abs(reference["out"]).max() > 0.1, "the reference output must not be trivial"
    np.testing.assert_allclose(out.numpy(), reference["out"], rtol=0, atol=1e-10)


def test_output_matches_pytorch_reference_in_float32(reference):
    model = tiny_model(reference, np.float32)
    with no_grad():
        out = model(Tensor(reference["x"].astype(np.float32)), reference["t"])
    assert out.dtype == np.float32
    np.testing.assert_allclose(out.numpy(), reference["out"], rtol=0, atol=1e-4)


# =============================================================================
# Gradients through the whole network
# =============================================================================

# Parameters that between them reach every kind of block: the time MLP, a
# zero-initialized conv2, a group norm, the attention's q and proj_out, the
# downsampling and upsampling convs, a skip 1x1 conv and the output conv.
CHECKED_PARAMETERS = [
    "temb_dense0.weight", "down.0.0.conv2.weight", "down.1.weight", "down.2.0.norm1.bias",
    "down.2.1.attn.q.weight", "mid_attn.attn.proj_out.weight", "mid1.temb_proj.bias",
    "up.0.0.skip.weight", "up.2.weight", "norm_out.weight", "conv_out.bias",
]


def test_checked_parameters_exist(reference):
    names = dict(tiny_model(reference).named_parameters())
    assert [n for n in CHECKED_PARAMETERS if n not in names] == []


def test_gradient_wrt_input_adjoint(reference):
    model = tiny_model(reference)
    x = Tensor(reference["x"].copy(), requires_grad=True)
    assert autograd.gradcheck(lambda x: model(x, reference["t"]), [x], mode="adjoint", **ADJOINT_TOL)


def test_gradient_wrt_input_elements(reference):
    model = tiny_model(reference)
    x = Tensor(reference["x"][:1].copy(), requires_grad=True)
    assert autograd.gradcheck(lambda x: model(x, reference["t"][1:]), [x], mode="elements", **ELEMENT_TOL)


@pytest.mark.parametrize("name", CHECKED_PARAMETERS)
def test_gradient_wrt_parameter_adjoint(reference, name):
    """gradcheck perturbs the Parameter's array in place, which the model reads."""
    model = tiny_model(reference)
    w = dict(model.named_parameters())[name]
    x = Tensor(reference["x"])
    assert autograd.gradcheck(lambda w: model(x, reference["t"]), [w], mode="adjoint", **ADJOINT_TOL)


def test_gradient_wrt_input_and_all_parameters_at_once(reference):
    model = tiny_model(reference)
    x = Tensor(reference["x"].copy(), requires_grad=True)
    params = model.parameters()
    assert autograd.gradcheck(lambda x, *ps: model(x, reference["t"]), [x, *params],
                              mode="adjoint", **ADJOINT_TOL)
    assert all(p.grad is not None and np.abs(p.grad).max() > 0 for p in params)


# =============================================================================
# Time embedding
# =============================================================================

@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-12), (np.float32, 1e-6)])
def test_time_embedding_is_sin_then_cos_of_the_documented_frequencies(dtype, tol):
    model = UNet(**TINY, dtype=dtype)
    t = np.array([0, 1, 999])
    emb = model.temb(t)
    half = TINY["ch"] // 2
    expected = np.zeros((3, 2 * half))
    for row, step in enumerate(t):
        for i in range(half):
            freq = math.exp(-math.log(10000) * i / (half - 1))
            expected[row, i] = math.sin(step * freq)
            expected[row, half + i] = math.cos(step * freq)
    assert emb.shape == (3, 2 * half) and emb.dtype == dtype
    np.testing.assert_allclose(emb.numpy(), expected, rtol=0, atol=tol)
    # Pinned by hand: t = 0 is all sines 0 and cosines 1; the slowest frequency is 1/10000.
    np.testing.assert_array_equal(emb.numpy()[0], [0] * half + [1] * half)
    assert emb.numpy()[1, half - 1] == pytest.approx(math.sin(1e-4), abs=tol)


# =============================================================================
# Zero initialization
# =============================================================================

def test_fresh_model_predicts_exactly_zero_then_learns():
    """The official code zero-scales the last conv of every residual branch,
    of every attention block and the output conv, so each block starts as the
    identity and the untrained UNet predicts eps = 0 exactly (a loss of
    E[eps^2] = 1 at step 0). One Adam step moves the output conv off zero."""
    model = UNet(**PRESETS["mnist-tiny"])
    rng = np.random.default_rng(0)
    x, t = images(2, seed=1), np.array([5, 700])
    eps = Tensor(rng.standard_normal((2, 1, 28, 28)).astype(np.float32))

    out = model(x, t)
    assert not np.any(out.numpy()), "a fresh UNet must output exactly zero"
    loss = F.mse_loss(out, eps)
    assert loss.item() == pytest.approx(float((eps.numpy().astype(np.float64) ** 2).mean()), rel=1e-6)

    opt = optim.Adam(model.parameters(), lr=1e-3)
    loss.backward()
    opt.step()
    with no_grad():
        after = model(x, t).numpy()
    assert after.dtype == np.float32
    assert np.abs(after).max() > 0, "one Adam step must move the output off zero"


# =============================================================================
# Inputs that do not fit
# =============================================================================

@pytest.mark.parametrize("shape, t_shape, message", [
    ((2, 3, 8, 8), (2,), r"\(B, 1, 8, 8\), got \(2, 3, 8, 8\)"),
    ((2, 1, 16, 16), (2,), r"\(B, 1, 8, 8\), got \(2, 1, 16, 16\)"),
    ((2, 1, 8, 4), (2,), r"\(B, 1, 8, 8\), got \(2, 1, 8, 4\)"),
    ((2, 1, 8, 8), (3,), r"\(2,\), got \(3,\)"),
    ((2, 1, 8, 8), (2, 1), r"\(2,\), got \(2, 1\)"),
    ((2, 1, 8, 8), (), r"\(2,\), got \(\)"),
])
def test_bad_input_raises_value_error_naming_the_shapes(shape, t_shape, message):
    model = UNet(**TINY)
    x = Tensor(np.zeros(shape, np.float32))
    with pytest.raises(ValueError, match=message):
        model(x, np.zeros(t_shape, dtype=np.int64))


@pytest.mark.parametrize("shape, t, message", [
    ((2, 8, 8), np.zeros(2, dtype=np.int64), r"\(B, 1, 8, 8\), got \(2, 8, 8\)"),
    ((1, 1, 8, 8), 500, r"\(1,\)"),
], ids=["no channel axis", "int timestep"])
def test_input_of_the_wrong_kind_raises_value_error_naming_the_shapes(shape, t, message):
    model = UNet(**TINY)
    with pytest.raises(ValueError, match=message):
        model(Tensor(np.zeros(shape, np.float32)), t)


def test_image_size_must_halve_cleanly():
    with pytest.raises(ValueError, match="divisible"):
        UNet(**dict(TINY, image_size=10, ch_mult=(1, 2, 2)))


# =============================================================================
# Train and eval modes
# =============================================================================

def test_train_and_eval_reach_every_dropout_of_the_mnist_preset():
    model = UNet(**PRESETS["mnist"])
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    # One per ResBlock: 2x3 down, 2 middle, 3x3 up.
    assert len(dropouts) == 17 and all(d.p == 0.1 for d in dropouts)
    assert all(m.training for m in model.modules())
    model.eval()
    assert not any(m.training for m in model.modules())
    model.train()
    assert all(m.training for m in model.modules())


def test_eval_mode_is_deterministic_and_train_mode_is_not():
    """The mnist preset, with random weights (its zero-initialized conv2 right
    after each dropout would otherwise hide any dropout)."""
    model = randomize(UNet(**PRESETS["mnist"]))
    x, t = images(1, seed=2), np.array([250])
    with no_grad():
        model.eval()
        first, second = model(x, t).numpy(), model(x, t).numpy()
        model.train()
        dropped = model(x, t).numpy()
    np.testing.assert_array_equal(first, second)
    assert np.abs(dropped - first).max() > 1e-3 * np.abs(first).max()
