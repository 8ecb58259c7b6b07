"""Tests for autograd.optim: Adam and SGD against hand-written references,
gradient clipping, the EMA of weights, and state dicts that resume exactly."""
import io
import math

import numpy as np
import pytest

from autograd import nn, optim
from helpers import both_kernel_modes  # noqa: F401  (every test on both kernel sets)

SHAPES = [(3, 4), (5,), (2, 1, 3, 3)]


def make_params(dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    return [nn.Parameter(rng.standard_normal(s).astype(dtype)) for s in SHAPES]


def gradients(steps, scale=1.0, dtype=np.float64, seed=1):
    """A list, per step, of one gradient array per parameter."""
    rng = np.random.default_rng(seed)
    return [[(scale * rng.standard_normal(s)).astype(dtype) for s in SHAPES] for _ in range(steps)]


def run(opt, params, grads):
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.copy()
        opt.step()


def save_and_load(state):
    """Through an .npz in memory, as a checkpoint stores it."""
    buf = io.BytesIO()
    np.savez(buf, **state)
    buf.seek(0)
    with np.load(buf, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


# =============================================================================
# References, written from the papers
# =============================================================================

def adam_reference(p0, grads, lr, b1, b2, eps, weight_decay):
    """Kingma & Ba (2015), Algorithm 1, with L2 weight decay added to g."""
    p = p0.copy()
    m, v = np.zeros_like(p), np.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        g = g + weight_decay * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat = m / (1 - b1 ** t)
        v_hat = v / (1 - b2 ** t)
        p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
    return p


def sgd_reference(p0, grads, lr, momentum, weight_decay):
    """PyTorch's form of momentum: buf <- mu buf + g, p <- p - lr buf (buf starts at g)."""
    p, buf = p0.copy(), None
    for g in grads:
        g = g + weight_decay * p
        if momentum:
            buf = g if buf is None else momentum * buf + g
            g = buf
        p = p - lr * g
    return p


@pytest.mark.parametrize("lr, betas, eps, weight_decay, grad_scale", [
    (1e-2, (0.9, 0.999), 1e-8, 0.0, 1.0),
    (1e-3, (0.8, 0.99), 1e-8, 0.1, 1.0),
    # Gradients ~1e-4 with eps 1e-3: where eps enters (next to sqrt(v_hat)) decides the step.
    (1e-2, (0.9, 0.999), 1e-3, 0.0, 1e-4),
    (5e-2, (0.5, 0.9), 1e-6, 0.01, 1e-2),
])
def test_adam_matches_algorithm_1(lr, betas, eps, weight_decay, grad_scale):
    params = make_params()
    starts = [p.data.copy() for p in params]
    grads = gradients(6, grad_scale)
    run(optim.Adam(params, lr, betas=betas, eps=eps, weight_decay=weight_decay), params, grads)
    for i, (p, p0) in enumerate(zip(params, starts)):
        expected = adam_reference(p0, [g[i] for g in grads], lr, *betas, eps, weight_decay)
        np.testing.assert_allclose(p.data, expected, rtol=1e-12, atol=1e-15)
        assert not np.allclose(p.data, p0)


def test_adam_first_step_moves_each_element_by_lr():
    """With bias correction, step 1 is lr * g / (|g| + eps): lr in magnitude, for any gradient scale."""
    params = make_params()
    starts = [p.data.copy() for p in params]
    run(optim.Adam(params, lr=0.01), params, gradients(1, scale=1e3))
    for p, p0 in zip(params, starts):
        np.testing.assert_allclose(np.abs(p.data - p0), 0.01, rtol=1e-6)


@pytest.mark.parametrize("momentum, weight_decay", [(0.0, 0.0), (0.9, 0.0), (0.0, 0.05), (0.5, 0.05)])
def test_sgd_matches_reference(momentum, weight_decay):
    params = make_params()
    starts = [p.data.copy() for p in params]
    grads = gradients(5)
    run(optim.SGD(params, 0.1, momentum=momentum, weight_decay=weight_decay), params, grads)
    for i, (p, p0) in enumerate(zip(params, starts)):
        expected = sgd_reference(p0, [g[i] for g in grads], 0.1, momentum, weight_decay)
        np.testing.assert_allclose(p.data, expected, rtol=1e-12, atol=1e-15)


def test_parameters_without_gradient_are_left_alone():
    params = make_params()
    starts = [p.data.copy() for p in params]
    optimizers = (optim.Adam(params, 0.1, weight_decay=0.1), optim.SGD(params, 0.1, momentum=0.9, weight_decay=0.1))
    for opt in optimizers:
        params[0].grad = np.ones(SHAPES[0])
        params[1].grad = params[2].grad = None
        opt.step()
    assert not np.array_equal(params[0].data, starts[0])
    np.testing.assert_array_equal(params[1].data, starts[1])
    np.testing.assert_array_equal(params[2].data, starts[2])


def test_zero_grad_clears_gradients():
    params = make_params()
    opt = optim.SGD(params, 0.1)
    for p in params:
        p.grad = np.ones(p.shape)
    opt.zero_grad()
    assert all(p.grad is None for p in params)


@pytest.mark.parametrize("make", [
    lambda ps: optim.Adam(ps, 1e-3, weight_decay=0.01),
    lambda ps: optim.SGD(ps, 1e-2, momentum=0.9, weight_decay=0.01),
], ids=["adam", "sgd"])
def test_float32_parameters_stay_float32(make):
    params = make_params(np.float32)
    opt = make(params)
    run(opt, params, gradients(3, dtype=np.float32))
    optim.clip_grad_norm(params, 0.1)
    ema = optim.EMA(params, decay=0.9)
    ema.update()
    assert all(p.dtype == np.float32 and p.grad.dtype == np.float32 for p in params)
    assert all(s.dtype == np.float32 for s in ema.shadow)
    assert all(a.dtype == np.float32 for k, a in opt.state_dict().items() if k != "step")


@pytest.mark.parametrize("cls", [optim.Adam, optim.SGD])
def test_empty_parameter_list_raises(cls):
    with pytest.raises(ValueError, match="empty"):
        cls([], lr=1e-3)
    with pytest.raises(ValueError, match="empty"):
        cls(iter([]), lr=1e-3)


@pytest.mark.parametrize("cls", [optim.Adam, optim.SGD])
def test_negative_learning_rate_raises(cls):
    with pytest.raises(ValueError, match="-0.1"):
        cls(make_params(), lr=-0.1)


# =============================================================================
# Gradient clipping
# =============================================================================

def _global_norm(params):
    return math.sqrt(sum(float((p.grad ** 2).sum()) for p in params if p.grad is not None))


def test_clip_grad_norm_returns_the_norm_before_and_scales_all_to_max_norm():
    params = make_params()
    for p, g in zip(params, gradients(1, scale=3.0)[0]):
        p.grad = g
    params.append(nn.Parameter(np.zeros(2)))                 # no gradient: ignored
    before = [p.grad.copy() for p in params[:3]]
    norm = _global_norm(params)
    assert norm > 1

    returned = optim.clip_grad_norm(params, max_norm=1.0)
    # An array value in the gradients' dtype (on a GPU a device array: making a
    # Python float would wait for the device in the middle of a training step).
    assert isinstance(returned, (np.ndarray, np.generic)) and np.shape(returned) == ()
    assert returned.dtype == np.float64
    assert float(returned) == pytest.approx(norm, rel=1e-12)
    assert _global_norm(params) == pytest.approx(1.0, rel=1e-5)
    for p, g in zip(params, before):                          # one common factor: directions kept
        np.testing.assert_allclose(p.grad, g * (1.0 / norm), rtol=1e-5)


def test_clip_grad_norm_under_the_limit_changes_nothing():
    params = make_params()
    for p, g in zip(params, gradients(1, scale=0.01)[0]):
        p.grad = g
    before = [p.grad.copy() for p in params]
    norm = _global_norm(params)
    assert optim.clip_grad_norm(params, max_norm=1.0) == pytest.approx(norm, rel=1e-12)
    for p, g in zip(params, before):
        np.testing.assert_array_equal(p.grad, g)


def test_clip_grad_norm_without_gradients_returns_zero():
    assert optim.clip_grad_norm(make_params(), 1.0) == 0.0


def test_clip_grad_norm_float32_norm_and_factor_stay_float32():
    params = make_params(np.float32)
    for p, g in zip(params, gradients(1, scale=3.0, dtype=np.float32)[0]):
        p.grad = g
    norm = math.sqrt(sum(float((p.grad.astype(np.float64) ** 2).sum()) for p in params))
    returned = optim.clip_grad_norm(params, max_norm=0.5)
    assert returned.dtype == np.float32
    assert float(returned) == pytest.approx(norm, rel=1e-5)
    assert all(p.grad.dtype == np.float32 for p in params)
    assert _global_norm(params) == pytest.approx(0.5, rel=1e-5)


def test_clip_grad_norm_of_a_nan_gradient_is_nan_and_scales_nothing():
    # The training loop stops on a non-finite norm before the optimizer steps;
    # the gradients are left as they were, for a look at where the NaN came from.
    params = make_params()
    for p, g in zip(params, gradients(1, scale=3.0)[0]):
        p.grad = g
    params[0].grad.flat[0] = np.nan
    before = [p.grad.copy() for p in params]
    assert math.isnan(optim.clip_grad_norm(params, max_norm=1.0))
    for p, g in zip(params, before):
        np.testing.assert_array_equal(p.grad, g)


# =============================================================================
# Exponential moving average
# =============================================================================

def test_ema_follows_its_formula_and_copies_to_a_model():
    params = make_params()
    shadow = [p.data.copy() for p in params]
    ema = optim.EMA(params, decay=0.9)
    rng = np.random.default_rng(4)
    for _ in range(4):
        for p in params:
            p.data += rng.standard_normal(p.shape)
        ema.update()
        shadow = [0.9 * s + 0.1 * p.data for s, p in zip(shadow, params)]
    for s, expected in zip(ema.shadow, shadow):
        np.testing.assert_allclose(s, expected, rtol=1e-12)

    targets = make_params(seed=9)
    ema.copy_to(targets)
    for t, s in zip(targets, shadow):
        np.testing.assert_allclose(t.data, s, rtol=1e-12)
    # The shadow is the EMA's own copy: changing the targets leaves it alone.
    targets[0].data[...] = 0
    assert np.any(ema.shadow[0] != 0)


def test_ema_copy_to_a_module():
    model = nn.Linear(3, 2, rng=np.random.default_rng(0))
    ema = optim.EMA(model.parameters(), decay=0.5)
    model.weight.data[...] = 1
    ema.update()
    other = nn.Linear(3, 2, rng=np.random.default_rng(1))
    ema.copy_to(other)
    np.testing.assert_array_equal(other.weight.data, ema.shadow[0])
    np.testing.assert_array_equal(other.bias.data, model.bias.data)


def test_ema_rejects_bad_decay_and_mismatched_targets():
    with pytest.raises(ValueError, match="decay"):
        optim.EMA(make_params(), decay=1.0)
    ema = optim.EMA(make_params())
    with pytest.raises(ValueError, match="3"):
        ema.copy_to(make_params()[:2])
    with pytest.raises(ValueError, match="shape"):
        ema.copy_to([nn.Parameter(np.zeros(s[::-1])) for s in SHAPES])


# =============================================================================
# State dicts: a resumed run continues bit for bit
# =============================================================================

@pytest.mark.parametrize("make", [
    lambda ps: optim.Adam(ps, 1e-2, betas=(0.8, 0.99), weight_decay=0.01),
    lambda ps: optim.SGD(ps, 1e-2, momentum=0.9, weight_decay=0.01),
], ids=["adam", "sgd"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_optimizer_resumed_from_its_state_dict_is_bit_identical(make, dtype):
    grads = gradients(6, dtype=dtype)
    params = make_params(dtype)
    opt = make(params)
    run(opt, params, grads[:3])
    checkpoint = save_and_load(opt.state_dict())
    resumed_params = [nn.Parameter(p.data.copy()) for p in params]

    resumed = make(resumed_params)
    resumed.load_state_dict(checkpoint)
    assert resumed.step_count == 3
    run(opt, params, grads[3:])
    run(resumed, resumed_params, grads[3:])
    for a, b in zip(params, resumed_params):
        np.testing.assert_array_equal(a.data, b.data)
        assert b.dtype == dtype


def test_optimizer_load_state_dict_rejects_missing_and_misshaped_entries():
    opt = optim.Adam(make_params(), 1e-3)
    state = save_and_load(opt.state_dict())
    del state["v.1"]
    with pytest.raises(ValueError, match="v.1"):
        optim.Adam(make_params(), 1e-3).load_state_dict(state)
    state = save_and_load(opt.state_dict())
    state["m.0"] = np.zeros((4, 3))
    with pytest.raises(ValueError, match=r"m.0.*\(4, 3\)"):
        optim.Adam(make_params(), 1e-3).load_state_dict(state)


def test_ema_state_dict_round_trip():
    params = make_params()
    ema = optim.EMA(params, decay=0.9)
    for p in params:
        p.data += 1
    ema.update()
    checkpoint = save_and_load(ema.state_dict())

    resumed = optim.EMA(params, decay=0.9)
    resumed.load_state_dict(checkpoint)
    for p in params:
        p.data -= 3
    ema.update()
    resumed.update()
    for a, b in zip(ema.shadow, resumed.shadow):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="shadow.2"):
        resumed.load_state_dict({k: v for k, v in checkpoint.items() if k != "shadow.2"})
