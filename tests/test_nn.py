"""Tests for autograd.nn: how a Module finds, names, saves and loads its
parameters; train/eval and devices; and each layer against NumPy."""
import math

import numpy as np
import pytest

from autograd import Tensor, backend, nn, no_grad
from helpers import both_kernel_modes, randn  # noqa: F401  (every test on both kernel sets)


class Net(nn.Module):
    """Attributes deliberately not in alphabetical order, with a nested list."""

    def __init__(self, seed=0):
        rng = np.random.default_rng(seed)
        self.proj = nn.Linear(3, 4, rng=rng)
        self.blocks = nn.ModuleList([nn.Conv2d(4, 4, 3, padding=1, rng=rng),
                                     nn.ModuleList([nn.Linear(4, 2, bias=False, rng=rng)])])
        self.act = nn.Dropout(0.5)
        self.norm = nn.GroupNorm(2, 4)
        self.alpha = nn.Parameter(np.ones(1, np.float32))
        self.note = "not a parameter"


NET_PARAMETERS = [
    ("proj.weight", (4, 3)), ("proj.bias", (4,)),
    ("blocks.0.weight", (4, 4, 3, 3)), ("blocks.0.bias", (4,)),
    ("blocks.1.0.weight", (2, 4)),
    ("norm.weight", (4,)), ("norm.bias", (4,)),
    ("alpha", (1,)),
]


def snapshot(model):
    return {k: v.copy() for k, v in model.state_dict().items()}


# =============================================================================
# Parameters, names and state dicts
# =============================================================================

def test_named_parameters_in_definition_order_with_dotted_names():
    net = Net()
    assert [(n, tuple(p.shape)) for n, p in net.named_parameters()] == NET_PARAMETERS
    assert [id(p) for p in net.parameters()] == [id(p) for _, p in net.named_parameters()]
    assert all(isinstance(p, nn.Parameter) and p.requires_grad for p in net.parameters())
    assert net.num_parameters() == sum(math.prod(s) for _, s in NET_PARAMETERS)


def test_module_list_indexes_and_iterates_in_order():
    net = Net()
    assert len(net.blocks) == 2
    assert net.blocks[0] is list(net.blocks)[0] and net.blocks[-1] is net.blocks[1]
    assert isinstance(net.blocks[1][0], nn.Linear)


def test_module_list_index_past_the_end_raises_index_error():
    blocks = Net().blocks
    with pytest.raises(IndexError):
        blocks[2]


def test_state_dict_round_trip():
    source, target = Net(seed=0), Net(seed=1)
    state = snapshot(source)
    assert list(state) == [n for n, _ in NET_PARAMETERS]
    assert any(not np.array_equal(state[k], v) for k, v in target.state_dict().items())
    target.load_state_dict(state)
    for k, v in target.state_dict().items():
        np.testing.assert_array_equal(v, state[k])
        assert v.dtype == np.float32
    # Loading copies: changing the source afterwards leaves the target alone.
    source.proj.weight.data[...] = 7
    assert not np.any(target.proj.weight.data == 7)


def test_load_state_dict_keeps_the_parameter_dtype():
    net = Net()
    state = {k: v.astype(np.float64) + 1 for k, v in snapshot(net).items()}
    net.load_state_dict(state)
    assert all(p.dtype == np.float32 for p in net.parameters())
    np.testing.assert_allclose(net.proj.weight.data, state["proj.weight"], rtol=1e-6)


def _missing(state):
    del state["blocks.0.bias"]
    return "blocks.0.bias"


def _unexpected(state):
    state["blocks.2.weight"] = np.zeros(3, np.float32)
    return "blocks.2.weight"


def _misshaped(state):
    state["norm.bias"] = np.zeros(5, np.float32)
    return r"norm.bias: expected \(4,\), got \(5,\)"


@pytest.mark.parametrize("spoil", [_missing, _unexpected, _misshaped])
def test_load_state_dict_rejects_bad_keys_naming_them_and_changes_nothing(spoil):
    net = Net(seed=0)
    before = snapshot(net)
    state = {k: v + 1 for k, v in before.items()}   # every valid entry would change something
    name = spoil(state)
    with pytest.raises(ValueError, match=name):
        net.load_state_dict(state)
    for k, v in net.state_dict().items():
        np.testing.assert_array_equal(v, before[k], err_msg=f"{k} changed by a refused load")


def test_load_state_dict_names_every_problem_at_once():
    net = Net()
    state = snapshot(net)
    names = [_missing(state), _unexpected(state), _misshaped(state)]
    with pytest.raises(ValueError) as info:
        net.load_state_dict(state)
    for name in names:
        assert info.match(name)


# =============================================================================
# Modes and devices
# =============================================================================

def test_train_and_eval_reach_every_submodule():
    net = Net()
    assert all(m.training for m in net.modules())
    assert net.eval() is net
    assert len(list(net.modules())) == 8   # Net, proj, blocks, its conv, list, linear, act, norm
    assert not any(m.training for m in net.modules())
    assert not net.blocks[1][0].training and not net.act.training
    net.train()
    assert all(m.training for m in net.modules())


def test_to_cpu_is_a_no_op():
    net = Net()
    arrays = [p.data for p in net.parameters()]
    assert net.to("cpu") is net
    assert all(p.data is a for p, a in zip(net.parameters(), arrays))


@pytest.mark.skipif(backend.cupy_available(), reason="a CUDA device is present")
def test_to_cuda_without_a_gpu_raises_a_clear_error():
    net = Net()
    before = snapshot(net)
    with pytest.raises(RuntimeError, match="cuda.*(CuPy|CUDA)"):
        net.to("cuda")
    assert all(p.device == "cpu" for p in net.parameters())
    for k, v in net.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


# =============================================================================
# Initialization as PyTorch: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
# =============================================================================

@pytest.mark.parametrize("make, fan_in", [
    (lambda rng: nn.Linear(400, 300, rng=rng), 400),
    (lambda rng: nn.Conv2d(16, 64, 3, rng=rng), 16 * 9),
    (lambda rng: nn.Conv2d(64, 64, 1, rng=rng), 64),
])
def test_init_is_uniform_within_one_over_sqrt_fan_in(make, fan_in):
    layer = make(np.random.default_rng(0))
    bound = 1 / math.sqrt(fan_in)
    w, b = layer.weight.data, layer.bias.data
    assert w.dtype == np.float32 and b.dtype == np.float32
    assert np.abs(w).max() <= bound and np.abs(b).max() <= bound
    # A uniform on [-bound, bound] has standard deviation bound / sqrt(3).
    assert w.std() == pytest.approx(bound / math.sqrt(3), rel=0.03)
    assert abs(w.mean()) < 0.02 * bound
    assert np.abs(w).max() > 0.99 * bound


def test_init_is_reproducible_from_the_generator():
    a = nn.Conv2d(3, 5, 3, rng=np.random.default_rng(7))
    b = nn.Conv2d(3, 5, 3, rng=np.random.default_rng(7))
    c = nn.Conv2d(3, 5, 3, rng=np.random.default_rng(8))
    np.testing.assert_array_equal(a.weight.data, b.weight.data)
    assert not np.array_equal(a.weight.data, c.weight.data)


# =============================================================================
# Layers against NumPy
# =============================================================================

def _float64(layer):
    """Random float64 weights (including the GroupNorm affine), so nothing is trivially 1 or 0."""
    rng = np.random.default_rng(3)
    for p in layer.parameters():
        p.data = rng.standard_normal(p.shape)
    return layer


@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_numpy(bias):
    layer = _float64(nn.Linear(5, 3, bias=bias))
    x = randn(2, 4, 5)
    expected = x.numpy() @ layer.weight.numpy().T + (layer.bias.numpy() if bias else 0)
    np.testing.assert_allclose(layer(x).numpy(), expected, rtol=1e-12, atol=1e-12)


def _conv_loops(x, w, b, stride, padding):
    """Cross-correlation by explicit loops over output positions."""
    B, C, H, W = x.shape
    O, _, k, _ = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    Ho, Wo = (H + 2 * padding - k) // stride + 1, (W + 2 * padding - k) // stride + 1
    out = np.zeros((B, O, Ho, Wo))
    for i in range(Ho):
        for j in range(Wo):
            window = xp[:, :, i * stride:i * stride + k, j * stride:j * stride + k]   # (B, C, k, k)
            out[:, :, i, j] = np.einsum("bcuv,ocuv->bo", window, w) + b
    return out


@pytest.mark.parametrize("k, stride, padding", [(3, 1, 1), (3, 2, 1), (1, 1, 0), (3, 1, 0)])
def test_conv2d_matches_loops(k, stride, padding):
    layer = _float64(nn.Conv2d(3, 4, k, stride=stride, padding=padding))
    x = randn(2, 3, 7, 7)
    expected = _conv_loops(x.numpy(), layer.weight.numpy(), layer.bias.numpy(), stride, padding)
    out = layer(x)
    assert out.shape == expected.shape
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-12, atol=1e-12)


def test_group_norm_matches_numpy():
    layer = _float64(nn.GroupNorm(3, 6, eps=1e-5))
    x = randn(2, 6, 4, 5)
    xs = x.numpy().reshape(2, 3, 2 * 4 * 5)                 # (B, groups, C/groups * H * W)
    mean, var = xs.mean(-1, keepdims=True), xs.var(-1, keepdims=True)   # biased variance
    xhat = ((xs - mean) / np.sqrt(var + 1e-5)).reshape(2, 6, 4, 5)
    expected = xhat * layer.weight.numpy()[:, None, None] + layer.bias.numpy()[:, None, None]
    np.testing.assert_allclose(layer(x).numpy(), expected, rtol=1e-10, atol=1e-12)


def test_group_norm_without_affine_has_no_parameters_and_bad_groups_raise():
    assert list(nn.GroupNorm(2, 4, affine=False).named_parameters()) == []
    with pytest.raises(ValueError, match="6 channels.*4 groups"):
        nn.GroupNorm(4, 6)


def test_self_attention_matches_numpy():
    C, H, W = 4, 3, 2
    layer = _float64(nn.SelfAttention2d(C))
    x = randn(2, C, H, W)

    def conv1x1(conv, a):                                     # a (B, C, N)
        return np.einsum("oc,bcn->bon", conv.weight.numpy()[:, :, 0, 0], a) + conv.bias.numpy()[:, None]

    a = x.numpy().reshape(2, C, H * W)
    q, k, v = conv1x1(layer.q, a), conv1x1(layer.k, a), conv1x1(layer.v, a)   # (B, C, N)
    expected = np.zeros_like(a)
    for b in range(2):
        scores = q[b].T @ k[b] / math.sqrt(C)                 # (N, N): query i, key j
        weights = np.exp(scores - scores.max(1, keepdims=True))
        weights /= weights.sum(1, keepdims=True)
        expected[b] = v[b] @ weights.T                        # (C, N)
    expected = conv1x1(layer.proj_out, expected).reshape(2, C, H, W)
    np.testing.assert_allclose(layer(x).numpy(), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sinusoidal_embedding_shape_and_dtype(dtype):
    emb = nn.SinusoidalEmbedding(10, dtype=dtype)(np.array([0, 3, 999]))
    assert emb.shape == (3, 10) and emb.dtype == dtype
    assert not emb.requires_grad


@pytest.mark.parametrize("dim", [7, 2])
def test_sinusoidal_embedding_rejects_bad_widths(dim):
    with pytest.raises(ValueError, match=str(dim)):
        nn.SinusoidalEmbedding(dim)


def test_dropout_in_eval_mode_is_the_identity():
    layer = nn.Dropout(0.5).eval()
    x = randn(100, 100)
    np.testing.assert_array_equal(layer(x).numpy(), x.numpy())


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_in_train_mode_zeroes_p_and_scales_the_rest(p):
    layer = nn.Dropout(p)
    x = Tensor(np.random.default_rng(0).uniform(1, 2, (200, 500)), requires_grad=True)
    out = layer(x, rng=np.random.default_rng(1)).numpy()
    kept = out != 0
    # 100,000 draws: the fraction dropped is within 0.005 of p (> 3 sigma).
    assert abs(1 - kept.mean() - p) < 0.005
    np.testing.assert_allclose(out[kept], x.numpy()[kept] / (1 - p), rtol=1e-12)


def test_dropout_draws_from_the_given_generator():
    x = Tensor(np.ones((50, 50), np.float32))
    a = nn.Dropout(0.3)(x, rng=np.random.default_rng(5)).numpy()
    b = nn.Dropout(0.3)(x, rng=np.random.default_rng(5)).numpy()
    c = nn.Dropout(0.3)(x, rng=np.random.default_rng(6)).numpy()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.dtype == np.float32


def test_layers_keep_float32():
    rng = np.random.default_rng(0)
    x = Tensor(rng.standard_normal((2, 4, 6, 6)).astype(np.float32))
    with no_grad():
        layers = (nn.Conv2d(4, 4, 3, padding=1, rng=rng), nn.GroupNorm(2, 4), nn.SelfAttention2d(4, rng=rng))
        for layer in layers:
            assert layer(x).dtype == np.float32, type(layer).__name__
        assert nn.Linear(6, 3, rng=rng)(x).dtype == np.float32
