"""The flat-buffer twins of Adam, the EMA and clipping (autograd/fast/optim.py).

On a GPU the twins keep every parameter, moment, shadow and gradient as views
of one buffer each, so an update is a handful of kernels. Here the buffers are
forced on NumPy (FLAT["mode"] = True) and compared with the plain loops of
autograd/optim.py: the same numbers up to rounding (the flat Adam folds both
bias corrections into its step size, so its last bits differ), the same state
dicts, the loop wherever flat cannot serve (a missing gradient, mixed dtypes),
and no update lost when something rebinds a parameter's .data.
"""
import contextlib

import numpy as np
import pytest

import autograd
from autograd import fast, functional as F, nn, optim, seam
from autograd.fast import optim as fast_optim, processes
from fast_helpers import TINY, assert_all_equal
from test_optim import save_and_load
from tinyddpm.unet import UNet

SHAPES = [(3, 4), (5,), (2, 1, 3, 3), (1,)]
DTYPES = [np.float32, np.float64]
UPDATES = ("adam_update", "ema_update", "clip_grad_norm")


@contextlib.contextmanager
def optimizer_updates(flat):
    """flat=True: the fast layer's optimizer twins, on flat buffers even on NumPy;
    False: the plain loops. Every other kernel stays as it was, so that two runs
    differ in their optimizer updates alone."""
    before, mode = seam.installed(), fast_optim.FLAT["mode"]
    twins = {name: twin for name, twin in before.items() if name not in UPDATES}
    if flat:
        twins.update({name: fast.TWINS[name] for name in UPDATES})
    seam.uninstall()
    seam.install(twins)
    fast_optim.FLAT["mode"] = True if flat else mode
    try:
        yield
    finally:
        seam.uninstall()
        seam.install(before)
        fast_optim.FLAT["mode"] = mode


def make_params(dtype, seed=0, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    return [nn.Parameter(rng.standard_normal(s).astype(dtype)) for s in shapes]


def gradients(steps, dtype, scale=1.0, seed=1):
    rng = np.random.default_rng(seed)
    return [[(scale * rng.standard_normal(s)).astype(dtype) for s in SHAPES] for _ in range(steps)]


class Run:
    """Adam, clipping and the EMA over some parameters, on flat buffers or by the plain loops."""

    def __init__(self, params, flat, max_norm=1e6, weight_decay=0.0):
        self.params, self.flat, self.max_norm = params, flat, max_norm
        self.opt = optim.Adam(params, 1e-2, betas=(0.8, 0.99), weight_decay=weight_decay)
        self.ema = optim.EMA(params, decay=0.9)
        self.norms = []

    def step(self, grads):
        for p, g in zip(self.params, grads):
            p.grad = None if g is None else g.copy()
        with optimizer_updates(self.flat):
            self.norms.append(optim.clip_grad_norm(self.params, self.max_norm))
            self.opt.step()
            self.ema.update()

    def arrays(self):
        """Everything the run holds, as copies: parameters, m, v, shadow."""
        return [a.copy() for a in [p.data for p in self.params] + self.opt.m + self.opt.v + self.ema.shadow]


def assert_equal_to_rounding(actual, expected, steps):
    """Adam's two ways of writing the bias corrections differ in the last bit of
    each update, and a parameter rounds either way: a few ulps per step, of the
    largest value (a parameter, or the moments derived from its gradient)."""
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.dtype == e.dtype, f"array {i}: {a.dtype} vs {e.dtype}"
        ulp = np.finfo(e.dtype).eps * max(1.0, float(np.abs(e).max()))
        np.testing.assert_allclose(a, e, rtol=0, atol=4 * steps * ulp, err_msg=f"array {i}")


def assert_trained_alike(actual, expected):
    """After training steps of a model in float64: its weights feed back into the
    gradients, which then differ in their last bits too, and Adam divides by
    sqrt(v), so where a gradient is near zero those bits move its weight by a
    larger fraction of the step. 1e-12 is still 1e-10 of a step (lr 1e-2)."""
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.dtype == e.dtype == np.float64
        np.testing.assert_allclose(a, e, rtol=0, atol=1e-12, err_msg=f"array {i}")


def assert_views_of_one_buffer(arrays, shapes=SHAPES):
    base = arrays[0].base
    assert base is not None and base.ndim == 1 and base.size == sum(int(np.prod(s)) for s in shapes)
    offset = 0
    for a, shape in zip(arrays, shapes):
        assert a.base is base and a.shape == shape
        assert np.shares_memory(a, base[offset:offset + a.size])
        offset += a.size


def train_both(grads, dtype, **options):
    """(flat run, loop run) after the same steps."""
    flat, loop = (Run(make_params(dtype), f, **options) for f in (True, False))
    for step_grads in grads:
        flat.step(step_grads)
        loop.step(step_grads)
    return flat, loop


# =============================================================================
# The flat twins give the loops' numbers
# =============================================================================

@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize("dtype", DTYPES)
def test_flat_adam_and_ema_match_the_loops_up_to_rounding(dtype, weight_decay):
    # max_norm far above the norms: the factor is exactly 1, so only Adam and the EMA differ.
    flat, loop = train_both(gradients(5, dtype), dtype, weight_decay=weight_decay)
    assert_equal_to_rounding(flat.arrays(), loop.arrays(), steps=5)
    assert not np.array_equal(flat.params[0].data, make_params(dtype)[0].data)      # they did move
    if not weight_decay:       # then the moments never see a parameter: the same formulas, the same bits
        assert_all_equal(flat.opt.m + flat.opt.v, loop.opt.m + loop.opt.v)


@pytest.mark.parametrize("dtype", DTYPES)
def test_flat_clipping_matches_the_loop_up_to_rounding(dtype):
    # One product over the flat buffer sums the squares in another order than
    # the per-parameter terms: the norms, and so the factors, agree to rounding.
    flat, loop = train_both(gradients(5, dtype, scale=3.0), dtype, max_norm=1.0)
    for a, b in zip(flat.norms, loop.norms):
        assert a.dtype == b.dtype == dtype and np.shape(a) == ()
        assert float(a) > 1.0                                     # so every step clipped
        np.testing.assert_allclose(a, b, rtol=8 * np.finfo(dtype).eps)
    assert_equal_to_rounding(flat.arrays(), loop.arrays(), steps=5)


def test_flat_clipping_scales_the_gradients_the_caller_reads(monkeypatch):
    monkeypatch.setitem(fast_optim.FLAT, "mode", True)
    params = make_params(np.float64)
    grads = gradients(1, np.float64, scale=3.0)[0]
    for p, g in zip(params, grads):
        p.grad = g.copy()
    norm = fast_optim.clip_grad_norm(params, 0.5)
    np.testing.assert_allclose(norm, np.sqrt(sum((g ** 2).sum() for g in grads)), rtol=1e-14)
    assert_views_of_one_buffer([p.grad for p in params])
    for p, g in zip(params, grads):
        np.testing.assert_allclose(p.grad, g * (0.5 / (float(norm) + 1e-6)), rtol=1e-14)
    assert fast_optim.clip_grad_norm([nn.Parameter(np.zeros(2))], 1.0) == 0.0     # no gradients at all


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_parameter_without_gradient_sends_the_step_to_the_loop(dtype):
    """The loop skips a parameter without gradient: it does not move, and its m and v
    stand still (a zero gradient would decay them and move it)."""
    grads = gradients(4, dtype)
    grads[2][2] = None                     # step 3: parameter 2 has no gradient
    flat, loop = train_both(grads[:2], dtype, weight_decay=0.01)
    held = [a[2].copy() for a in ([p.data for p in flat.params], flat.opt.m, flat.opt.v)]
    flat.step(grads[2])
    loop.step(grads[2])
    assert_all_equal([a[2] for a in ([p.data for p in flat.params], flat.opt.m, flat.opt.v)], held)
    flat.step(grads[3])
    loop.step(grads[3])
    assert_equal_to_rounding(flat.arrays(), loop.arrays(), steps=4)


def test_parameters_of_mixed_dtypes_go_through_the_loop():
    shapes = SHAPES + [(2,)]

    def params():
        return make_params(np.float32) + [nn.Parameter(np.arange(2.0))]

    rng = np.random.default_rng(4)
    grads = [[rng.standard_normal(s).astype(p.dtype) for s, p in zip(shapes, params())] for _ in range(3)]
    flat, loop = Run(params(), True), Run(params(), False)
    for step_grads in grads:
        flat.step(step_grads)
        loop.step(step_grads)
    assert_equal_to_rounding(flat.arrays(), loop.arrays(), steps=len(grads))
    assert all(p.data.base is None for p in flat.params)           # left alone, not flattened


@pytest.mark.parametrize("mode, arrays, flat", [
    (None, [np.zeros(2), np.zeros(3)], False),                     # NumPy: the loops unless forced
    (True, [np.zeros(2), np.zeros(3)], True),
    (False, [np.zeros(2), np.zeros(3)], False),
    (True, [np.zeros(2), np.zeros(3, np.float32)], False),         # mixed dtypes
    (True, [], False),
])
def test_use_flat_says_where_the_buffers_serve(mode, arrays, flat, monkeypatch):
    monkeypatch.setitem(fast_optim.FLAT, "mode", mode)
    assert fast_optim.use_flat(arrays) is flat


def test_an_array_listed_twice_is_not_flattened(monkeypatch):
    monkeypatch.setitem(fast_optim.FLAT, "mode", True)
    a = np.zeros(3)
    assert fast_optim.use_flat([a, np.zeros(2), a]) is False


def test_flat_unet_training_steps_match_the_loops():
    dtype = np.float64
    x = np.random.default_rng(2).standard_normal((3, 1, 8, 8))
    t = np.array([0, 500, 999])

    def train(flat):
        model = UNet(**TINY, dtype=dtype, rng=np.random.default_rng(1))
        run = Run(model.parameters(), flat, weight_decay=0.01)
        for _ in range(3):
            run.opt.zero_grad()
            F.mse_loss(model(autograd.Tensor(x), t), autograd.Tensor(x)).backward()
            run.step([p.grad for p in run.params])
        return run

    flat, loop = train(True), train(False)
    assert_views_of_one_buffer([p.data for p in flat.params], [p.shape for p in flat.params])
    assert_trained_alike(flat.arrays(), loop.arrays())


# =============================================================================
# The layout
# =============================================================================

def test_a_flat_step_puts_parameters_moments_shadow_and_gradients_in_one_buffer_each():
    run = Run(make_params(np.float32), True)
    run.step(gradients(1, np.float32)[0])
    for arrays in ([p.data for p in run.params], run.opt.m, run.opt.v, run.ema.shadow, [p.grad for p in run.params]):
        assert_views_of_one_buffer(arrays)
    datas = [p.data for p in run.params]
    run.step(gradients(2, np.float32)[1])
    assert all(p.data is d for p, d in zip(run.params, datas)), "the next step updates the same buffer in place"


def test_flattening_keeps_the_values_and_finds_the_buffer_again(monkeypatch):
    params = make_params(np.float64)
    values = [p.data.copy() for p in params]
    buffer = fast_optim.flatten_params(params)
    assert_views_of_one_buffer([p.data for p in params])
    assert_all_equal([p.data for p in params], values)
    datas = [p.data for p in params]
    assert fast_optim.flatten_params(params) is not None
    assert all(p.data is d for p, d in zip(params, datas)), "flat already: no copy"
    assert np.shares_memory(fast_optim.found_flat(datas), buffer)
    assert fast_optim.found_flat(datas[::-1]) is None                      # out of order
    assert fast_optim.found_flat([datas[0], datas[2]]) is None             # a gap
    assert fast_optim.found_flat(values) is None                           # separate arrays


# =============================================================================
# State dicts: the same keys and shapes whichever the mode
# =============================================================================

@pytest.mark.parametrize("saved_flat, loaded_flat", [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_state_dicts_move_between_flat_and_loop(saved_flat, loaded_flat, dtype):
    grads = gradients(6, dtype)
    run = Run(make_params(dtype), saved_flat, weight_decay=0.01)
    for step_grads in grads[:3]:
        run.step(step_grads)
    values = [p.data.copy() for p in run.params]
    opt_state, ema_state = save_and_load(run.opt.state_dict()), save_and_load(run.ema.state_dict())
    assert sorted(opt_state) == sorted(["step"] + [f"{s}.{i}" for s in "mv" for i in range(len(SHAPES))])
    assert sorted(ema_state) == sorted(f"shadow.{i}" for i in range(len(SHAPES)))

    resumed = Run(make_params(dtype, seed=5), loaded_flat, weight_decay=0.01)
    if loaded_flat:
        resumed.step(grads[0])              # its buffers flat already: loading must write into them
    for p, v in zip(resumed.params, values):
        p.data[...] = v
    resumed.opt.load_state_dict(opt_state)
    resumed.ema.load_state_dict(ema_state)
    assert resumed.opt.step_count == 3
    if loaded_flat:
        for arrays in ([p.data for p in resumed.params], resumed.opt.m, resumed.opt.v, resumed.ema.shadow):
            assert_views_of_one_buffer(arrays)
    assert_all_equal(resumed.arrays(), run.arrays())
    for step_grads in grads[3:]:
        run.step(step_grads)
        resumed.step(step_grads)
    if saved_flat == loaded_flat:
        assert_all_equal(resumed.arrays(), run.arrays())
    else:
        assert_equal_to_rounding(resumed.arrays(), run.arrays(), steps=3)


# =============================================================================
# Something rebinds p.data after the buffers were made
# =============================================================================

@pytest.mark.parametrize("dtype", DTYPES)
def test_a_rebound_parameter_is_taken_back_into_a_flat_buffer(dtype):
    # As Module.to or a user's `p.data = ...` would: the old buffer is no longer
    # what the model computes with, and must not be the one updated.
    grads = gradients(4, dtype)
    flat, loop = train_both(grads[:2], dtype)
    for run in (flat, loop):
        run.params[1].data = run.params[1].data + 1       # a new array, the values changed
        run.params[3].data = run.params[3].data.copy()
    rebound = flat.params[1].data.copy()
    flat.step(grads[2])
    loop.step(grads[2])
    assert_equal_to_rounding(flat.arrays(), loop.arrays(), steps=3)
    assert not np.array_equal(rebound, flat.params[1].data)   # the model's weight did move
    assert_views_of_one_buffer([p.data for p in flat.params])
    flat.step(grads[3])
    loop.step(grads[3])
    assert_equal_to_rounding(flat.arrays(), loop.arrays(), steps=4)


def test_parameters_rebound_to_another_flat_buffer_are_updated_there_in_place():
    # A SplitModel moves the parameters into one shared buffer of its own and
    # refuses a call once they are replaced: the optimizer must update that buffer.
    grads = gradients(2, np.float64)
    flat, loop = train_both(grads[:1], np.float64)
    shared = np.concatenate([p.data.ravel() for p in flat.params])
    offset = 0
    for p in flat.params:
        p.data = shared[offset:offset + p.size].reshape(p.shape)
        offset += p.size
    held = [p.data for p in flat.params]
    flat.step(grads[1])
    loop.step(grads[1])
    assert all(p.data is h for p, h in zip(flat.params, held))
    assert_equal_to_rounding(flat.arrays(), loop.arrays(), steps=2)


def test_module_load_state_dict_and_to_keep_the_flat_buffer():
    model = nn.Linear(3, 2, rng=np.random.default_rng(0))
    run = Run(model.parameters(), True)
    run.step([np.ones(p.shape) for p in model.parameters()])
    datas = [p.data for p in model.parameters()]
    model.load_state_dict({"weight": np.ones((2, 3)), "bias": np.zeros(2)})   # copies in place
    model.to("cpu")                                                          # already there
    assert all(p.data is d for p, d in zip(model.parameters(), datas))
    run.opt = optim.Adam(model.parameters(), 1e-2)                          # a fresh Adam: step 1 again
    with optimizer_updates(True):
        for p in model.parameters():
            p.grad = np.ones(p.shape)
        run.opt.step()
    assert all(p.data is d for p, d in zip(model.parameters(), datas))
    np.testing.assert_allclose(model.weight.data, 1 - 1e-2)                 # Adam's first step: lr sign(g)


@pytest.mark.skipif(not processes._can_fork(), reason="the split forks only on Linux")
def test_flat_steps_inside_a_split_model_match_the_loops():
    # Inside the block the parameters live in the split's shared memory; the
    # flat twins find that buffer and update it in place, and the child
    # computes with it (a replaced parameter would be refused).
    rng = np.random.default_rng(3)
    batches = [(rng.standard_normal((6, 1, 8, 8)), rng.integers(0, 1000, 6), rng.standard_normal((6, 1, 8, 8)))
               for _ in range(3)]

    def train(flat):
        model = UNet(**TINY, dtype=np.float64, rng=np.random.default_rng(1))
        run = Run(model.parameters(), flat, max_norm=1.0)
        with processes.SplitModel(model, processes=2) as net:
            assert len(net.children) == 1
            for x, t, noise in batches:
                run.opt.zero_grad()
                F.mse_loss(net(autograd.Tensor(x), t), autograd.Tensor(noise)).backward()
                run.step([p.grad for p in run.params])
            assert all(p.data is view for p, view in zip(run.params, net.shared))
        return run

    flat, loop = train(True), train(False)
    np.testing.assert_allclose([float(n) for n in flat.norms], [float(n) for n in loop.norms], rtol=1e-12)
    assert_trained_alike(flat.arrays(), loop.arrays())
