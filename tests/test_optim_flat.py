"""Tests for the flat buffers of autograd.optim (what a GPU runs), forced on
NumPy with flat=True: the same numbers as the loops over parameters, the same
state dicts, and no update lost when something rebinds a parameter's .data."""
import numpy as np
import pytest

import autograd
from autograd import functional as F, nn, optim, processes
from autograd.processes import GradientSplit
from tinyddpm.unet import UNet

from test_optim import save_and_load

SHAPES = [(3, 4), (5,), (2, 1, 3, 3), (1,)]
TINY = dict(in_channels=1, image_size=8, ch=8, ch_mult=(1, 2), num_res_blocks=1,
            attn_resolutions=(4,), dropout=0.0, num_groups=4)
DTYPES = [np.float32, np.float64]


def make_params(dtype, seed=0):
    rng = np.random.default_rng(seed)
    return [nn.Parameter(rng.standard_normal(s).astype(dtype)) for s in SHAPES]


def gradients(steps, dtype, scale=1.0, seed=1):
    rng = np.random.default_rng(seed)
    return [[(scale * rng.standard_normal(s)).astype(dtype) for s in SHAPES] for _ in range(steps)]


class Run:
    """Adam, clipping and the EMA over some parameters, all flat or all one at a time."""

    def __init__(self, params, flat, max_norm, weight_decay=0.0):
        self.params, self.flat, self.max_norm = params, flat, max_norm
        self.opt = optim.Adam(params, 1e-2, betas=(0.8, 0.99), weight_decay=weight_decay, flat=flat)
        self.ema = optim.EMA(params, decay=0.9, flat=flat)
        self.norms = []

    def step(self, grads):
        for p, g in zip(self.params, grads):
            p.grad = None if g is None else g.copy()
        self.norms.append(optim.clip_grad_norm(self.params, self.max_norm, flat=self.flat))
        self.opt.step()
        self.ema.update()

    def arrays(self):
        """Everything the run holds, as copies: parameters, m, v, shadow."""
        return [a.copy() for a in [p.data for p in self.params] + self.opt.m + self.opt.v + self.ema.shadow]


def assert_all_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


# =============================================================================
# The flat path gives the loops' numbers
# =============================================================================

@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize("dtype", DTYPES)
def test_flat_adam_and_ema_match_the_loops_bit_for_bit(dtype, weight_decay):
    # max_norm far above the norms: the factor is exactly 1, so only Adam and the EMA differ.
    grads = gradients(5, dtype)
    flat, loop = (Run(make_params(dtype), f, max_norm=1e6, weight_decay=weight_decay) for f in (True, False))
    for step_grads in grads:
        flat.step(step_grads)
        loop.step(step_grads)
    assert_all_equal(flat.arrays(), loop.arrays())
    assert not np.array_equal(flat.params[0].data, make_params(dtype)[0].data)


@pytest.mark.parametrize("dtype, rtol", [(np.float32, 1e-5), (np.float64, 1e-12)])
def test_flat_clipping_matches_the_loop_up_to_rounding(dtype, rtol):
    # One product over the flat buffer sums the squares in another order than
    # the per-parameter terms: the norms, and so the factors, agree to rounding.
    grads = gradients(5, dtype, scale=3.0)
    flat, loop = Run(make_params(dtype), True, max_norm=1.0), Run(make_params(dtype), False, max_norm=1.0)
    for step_grads in grads:
        flat.step(step_grads)
        loop.step(step_grads)
    for a, b in zip(flat.norms, loop.norms):
        assert a.dtype == b.dtype == dtype and np.shape(a) == ()
        assert float(a) > 1.0                                     # so every step clipped
        np.testing.assert_allclose(a, b, rtol=rtol)
    for a, b in zip(flat.arrays(), loop.arrays()):
        np.testing.assert_allclose(a, b, rtol=100 * rtol, atol=100 * rtol)


def test_flat_clipping_scales_the_gradients_the_caller_reads():
    params = make_params(np.float64)
    grads = gradients(1, np.float64, scale=3.0)[0]
    for p, g in zip(params, grads):
        p.grad = g.copy()
    norm = optim.clip_grad_norm(params, 0.5, flat=True)
    np.testing.assert_allclose(norm, np.sqrt(sum((g ** 2).sum() for g in grads)), rtol=1e-12)
    for p, g in zip(params, grads):
        np.testing.assert_allclose(p.grad, g * (0.5 / (float(norm) + 1e-6)), rtol=1e-12)
    assert optim.clip_grad_norm([nn.Parameter(np.zeros(2))], 1.0, flat=True) == 0.0


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_parameter_without_gradient_sends_the_step_to_the_loop(dtype):
    grads = gradients(4, dtype)
    grads[1][2] = None                     # step 2: parameter 2 has no gradient
    grads[2][0] = None                     # step 3: nor has parameter 0
    flat, loop = (Run(make_params(dtype), f, max_norm=1e6, weight_decay=0.01) for f in (True, False))
    for step_grads in grads:
        flat.step(step_grads)
        loop.step(step_grads)
    assert_all_equal(flat.arrays(), loop.arrays())


@pytest.mark.parametrize("dtype", DTYPES)
def test_flat_unet_training_steps_match_the_loops(dtype):
    x = np.random.default_rng(2).standard_normal((3, 1, 8, 8)).astype(dtype)
    t = np.array([0, 500, 999])

    def train(flat):
        model = UNet(**TINY, dtype=dtype, rng=np.random.default_rng(1))
        run = Run(model.parameters(), flat, max_norm=1e6, weight_decay=0.01)
        for _ in range(3):
            run.opt.zero_grad()
            F.mse_loss(model(autograd.Tensor(x), t), autograd.Tensor(x)).backward()
            run.step([p.grad for p in run.params])
        return run

    flat, loop = train(True), train(False)
    assert_all_equal(flat.arrays(), loop.arrays())


# =============================================================================
# The layout
# =============================================================================

def assert_views_of_one_buffer(arrays, shapes):
    base = arrays[0].base
    assert base is not None and base.ndim == 1 and base.size == sum(int(np.prod(s)) for s in shapes)
    offset = 0
    for a, shape in zip(arrays, shapes):
        assert a.base is base and a.shape == shape
        assert np.shares_memory(a, base[offset:offset + a.size])
        offset += a.size


def test_flat_mode_puts_parameters_moments_shadow_and_gradients_in_one_buffer_each():
    params = make_params(np.float32)
    values = [p.data.copy() for p in params]
    opt = optim.Adam(params, 1e-3, flat=True)
    datas = [p.data for p in params]
    ema = optim.EMA(params, flat=True)
    assert all(p.data is d for p, d in zip(params, datas))     # the EMA took Adam's buffer
    assert_views_of_one_buffer(datas, SHAPES)
    assert_all_equal(datas, values)                            # values copied over
    for slot in (opt.m, opt.v, ema.shadow):
        assert_views_of_one_buffer(slot, SHAPES)
    assert_all_equal(ema.shadow, values)
    for p, g in zip(params, gradients(1, np.float32)[0]):
        p.grad = g
    optim.clip_grad_norm(params, 1.0, flat=True)
    assert_views_of_one_buffer([p.grad for p in params], SHAPES)


def test_flat_is_off_on_numpy_unless_asked_and_refuses_mixed_dtypes():
    params = make_params(np.float32)
    assert optim.Adam(params, 1e-3).flat is False and optim.EMA(params).flat is False
    assert all(p.data.base is None for p in params)           # left alone
    mixed = make_params(np.float32) + [nn.Parameter(np.zeros(2))]
    with pytest.raises(ValueError, match="one dtype"):
        optim.Adam(mixed, 1e-3, flat=True)
    with pytest.raises(ValueError, match="one dtype"):
        optim.EMA(mixed, flat=True)
    assert optim.Adam(mixed, 1e-3).flat is False              # None: the loop, no error
    twice = params + params[:1]
    with pytest.raises(ValueError, match="distinct"):
        optim.Adam(twice, 1e-3, flat=True)


# =============================================================================
# State dicts: the same keys and shapes whichever the mode
# =============================================================================

@pytest.mark.parametrize("saved_flat, loaded_flat", [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_state_dicts_move_between_flat_and_loop_bit_for_bit(saved_flat, loaded_flat, dtype):
    grads = gradients(6, dtype)
    run = Run(make_params(dtype), saved_flat, max_norm=1e6, weight_decay=0.01)
    for step_grads in grads[:3]:
        run.step(step_grads)
    opt_state, ema_state = save_and_load(run.opt.state_dict()), save_and_load(run.ema.state_dict())
    assert sorted(opt_state) == sorted(["step"] + [f"{s}.{i}" for s in "mv" for i in range(len(SHAPES))])
    assert sorted(ema_state) == sorted(f"shadow.{i}" for i in range(len(SHAPES)))

    resumed = Run([nn.Parameter(p.data.copy()) for p in run.params], loaded_flat, max_norm=1e6,
                  weight_decay=0.01)
    resumed.opt.load_state_dict(opt_state)
    resumed.ema.load_state_dict(ema_state)
    assert resumed.opt.step_count == 3
    if loaded_flat:                        # loaded in place: still the flat buffers' views
        assert_views_of_one_buffer(resumed.opt.m, SHAPES)
        assert_views_of_one_buffer(resumed.ema.shadow, SHAPES)
    for step_grads in grads[3:]:
        run.step(step_grads)
        resumed.step(step_grads)
    assert_all_equal(resumed.arrays(), run.arrays())


# =============================================================================
# Something rebinds p.data after the optimizer was made
# =============================================================================

@pytest.mark.parametrize("dtype", DTYPES)
def test_a_rebound_parameter_is_taken_back_into_a_flat_buffer(dtype):
    # As Module.to or a user's `p.data = ...` would: the optimizer's old buffer
    # is no longer what the model computes with, and must not be the one updated.
    grads = gradients(4, dtype)
    flat, loop = (Run(make_params(dtype), f, max_norm=1e6) for f in (True, False))
    for step_grads in grads[:2]:
        flat.step(step_grads)
        loop.step(step_grads)
    for run in (flat, loop):
        run.params[1].data = run.params[1].data + 1       # a new array, the values changed
        run.params[3].data = run.params[3].data.copy()
    rebound = flat.params[1].data
    flat.step(grads[2])
    loop.step(grads[2])
    assert_all_equal(flat.arrays(), loop.arrays())
    assert not np.array_equal(rebound, flat.params[1].data)   # the model's weight did move
    assert_views_of_one_buffer([p.data for p in flat.params], SHAPES)
    flat.step(grads[3])
    loop.step(grads[3])
    assert_all_equal(flat.arrays(), loop.arrays())


def test_parameters_rebound_to_another_flat_buffer_are_updated_there_in_place():
    # GradientSplit moves the parameters into one shared buffer of its own and
    # refuses a step that replaces them: the optimizer must update that buffer.
    dtype = np.float64
    grads = gradients(2, dtype)
    flat, loop = (Run(make_params(dtype), f, max_norm=1e6) for f in (True, False))
    flat.step(grads[0])
    loop.step(grads[0])
    shared = np.concatenate([p.data.ravel() for p in flat.params])
    offset = 0
    for p in flat.params:
        p.data = shared[offset:offset + p.size].reshape(p.shape)
        offset += p.size
    held = [p.data for p in flat.params]
    flat.step(grads[1])
    loop.step(grads[1])
    assert all(p.data is h for p, h in zip(flat.params, held))
    assert_all_equal(flat.arrays(), loop.arrays())


def test_module_load_state_dict_and_to_keep_the_flat_buffer():
    model = nn.Linear(3, 2, rng=np.random.default_rng(0))
    opt = optim.Adam(model.parameters(), 1e-2, flat=True)
    datas = [p.data for p in model.parameters()]
    model.load_state_dict({"weight": np.ones((2, 3)), "bias": np.zeros(2)})   # copies in place
    model.to("cpu")                                                          # already there
    assert all(p.data is d for p, d in zip(model.parameters(), datas))
    for p in model.parameters():
        p.grad = np.ones(p.shape)
    opt.step()
    np.testing.assert_allclose(model.weight.data, 1 - 1e-2)


@pytest.mark.skipif(not processes._can_fork(), reason="GradientSplit forks only on Linux")
def test_flat_steps_inside_a_gradient_split_match_the_loops():
    # Inside the block the parameters live in the split's shared memory; the
    # flat path updates them there in place, and the child computes with them.
    rng = np.random.default_rng(3)
    batches = [(rng.standard_normal((6, 1, 8, 8)), rng.integers(0, 1000, 6), rng.standard_normal((6, 1, 8, 8)))
               for _ in range(3)]

    def train(flat):
        model = UNet(**TINY, dtype=np.float64, rng=np.random.default_rng(1))
        run = Run(model.parameters(), flat, max_norm=1.0)

        def loss_fn(x, t, noise):
            return F.mse_loss(model(autograd.Tensor(x), t), autograd.Tensor(noise))

        with GradientSplit(run.params, loss_fn, processes=2) as split:
            for batch in batches:
                run.opt.zero_grad()
                split(*batch)
                run.step([p.grad for p in run.params])
        return run

    flat, loop = train(True), train(False)
    np.testing.assert_allclose([float(n) for n in flat.norms], [float(n) for n in loop.norms], rtol=1e-12)
    for a, b in zip(flat.arrays(), loop.arrays()):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
