"""Adam, clipping and the EMA on CuPy: with the fast layer, flat buffers by
default (autograd/fast/optim.py: a handful of kernels a step, not a few per
parameter), with the numbers of the plain loops over parameters on NumPy, in
float64 (tight) and float32 (float32 tolerances)."""
import contextlib

import numpy as np
import pytest

from autograd import Tensor, backend, nn, optim
from autograd import functional as F
from autograd.fast import optim as fast_optim
from tinyddpm.unet import UNet

SHAPES = [(3, 4), (5,), (2, 1, 3, 3), (1,)]
TINY = dict(in_channels=1, image_size=8, ch=8, ch_mult=(1, 2), num_res_blocks=1,
            attn_resolutions=(4,), dropout=0.0, num_groups=4)
TOLERANCES = [(np.float64, 1e-12), (np.float32, 1e-5)]


def make_params(dtype, device, seed=0):
    rng = np.random.default_rng(seed)
    return [nn.Parameter(backend.to_device(rng.standard_normal(s).astype(dtype), device)) for s in SHAPES]


def gradients(steps, dtype, scale=3.0, seed=1):
    rng = np.random.default_rng(seed)
    return [[(scale * rng.standard_normal(s)).astype(dtype) for s in SHAPES] for _ in range(steps)]


pytestmark = pytest.mark.usefixtures("fast_layer")      # autograd.fast on (conftest.py)


@contextlib.contextmanager
def flat_mode(mode):
    """fast.optim.FLAT["mode"]: None lets the device decide (flat on CuPy), False: the loops."""
    before = fast_optim.FLAT["mode"]
    fast_optim.FLAT["mode"] = mode
    try:
        yield
    finally:
        fast_optim.FLAT["mode"] = before


class Run:
    """Adam, clipping and the EMA over some parameters; flat=None lets the device decide."""

    def __init__(self, params, flat=None, max_norm=1.0, weight_decay=0.01):
        self.params, self.flat, self.max_norm = params, flat, max_norm
        self.opt = optim.Adam(params, 1e-2, betas=(0.8, 0.99), weight_decay=weight_decay)
        self.ema = optim.EMA(params, decay=0.9)
        self.norms = []

    def step(self, grads):
        for p, g in zip(self.params, grads):
            p.grad = None if g is None else backend.to_device(g, p.device).copy()
        with flat_mode(self.flat):
            self.norms.append(float(optim.clip_grad_norm(self.params, self.max_norm)))
            self.opt.step()
            self.ema.update()

    def arrays(self):
        """Parameters, m, v and shadow, as host copies."""
        return [backend.to_numpy(a).copy()
                for a in [p.data for p in self.params] + self.opt.m + self.opt.v + self.ema.shadow]


def assert_close(gpu, cpu, rtol):
    assert len(gpu) == len(cpu)
    for a, b in zip(gpu, cpu):
        assert a.dtype == b.dtype
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol)


def assert_views_of_one_buffer(arrays):
    """Consecutive views, in order, filling one contiguous 1-D device array."""
    import cupy
    base = arrays[0].base
    assert isinstance(base, cupy.ndarray) and base.ndim == 1 and base.size == sum(a.size for a in arrays)
    ptr = base.data.ptr
    for a in arrays:
        assert a.base is base and a.flags.c_contiguous and a.data.ptr == ptr
        ptr += a.nbytes


def test_on_cuda_parameters_moments_shadow_and_gradients_are_flat_by_default():
    params = make_params(np.float32, "cuda")
    values = [backend.to_numpy(p.data) for p in params]
    run = Run(params)
    run.step(gradients(1, np.float32)[0])          # the first step makes the buffers
    for slot in ([p.data for p in params], run.opt.m, run.opt.v, run.ema.shadow, [p.grad for p in params]):
        assert_views_of_one_buffer(slot)
    assert not any(np.array_equal(backend.to_numpy(p.data), v) for p, v in zip(params, values))
    datas = [p.data for p in params]
    run.step(gradients(2, np.float32)[1])
    assert all(p.data is d for p, d in zip(params, datas))       # updated in place


@pytest.mark.parametrize("dtype, rtol", TOLERANCES)
def test_flat_steps_on_cupy_match_the_loops_on_numpy(dtype, rtol):
    grads = gradients(5, dtype)
    gpu, cpu = Run(make_params(dtype, "cuda")), Run(make_params(dtype, "cpu"))
    for step_grads in grads:
        gpu.step(step_grads)
        cpu.step(step_grads)
    assert_views_of_one_buffer([p.data for p in gpu.params])
    assert all(p.data.base is None for p in cpu.params)          # NumPy: the loops, arrays left alone
    np.testing.assert_allclose(gpu.norms, cpu.norms, rtol=rtol)
    assert min(cpu.norms) > 1.0                                  # every step clipped
    assert_close(gpu.arrays(), cpu.arrays(), 10 * rtol)


@pytest.mark.parametrize("dtype, rtol", TOLERANCES)
def test_flat_and_loop_on_cupy_agree(dtype, rtol):
    grads = gradients(4, dtype)
    grads[1][2] = None                     # step 2 goes back to the loop in both
    flat, loop = Run(make_params(dtype, "cuda")), Run(make_params(dtype, "cuda"), flat=False)
    for step_grads in grads:
        flat.step(step_grads)
        loop.step(step_grads)
    assert_views_of_one_buffer(flat.opt.m)
    assert all(m.base is None for m in loop.opt.m)
    assert_close(flat.arrays(), loop.arrays(), 10 * rtol)


@pytest.mark.parametrize("dtype, rtol", TOLERANCES)
def test_a_rebound_parameter_on_cupy_is_taken_back_into_a_flat_buffer(dtype, rtol):
    grads = gradients(3, dtype)
    gpu, cpu = Run(make_params(dtype, "cuda")), Run(make_params(dtype, "cpu"))
    gpu.step(grads[0])
    cpu.step(grads[0])
    for run in (gpu, cpu):
        run.params[1].data = run.params[1].data + 1
    for step_grads in grads[1:]:
        gpu.step(step_grads)
        cpu.step(step_grads)
    assert_views_of_one_buffer([p.data for p in gpu.params])
    assert_close(gpu.arrays(), cpu.arrays(), 10 * rtol)


def test_flat_unet_training_on_cupy_matches_numpy_and_its_state_loads_on_the_cpu():
    import cupy
    rng = np.random.default_rng(2)
    batches = [(rng.standard_normal((3, 1, 8, 8)).astype(np.float64), rng.integers(0, 1000, 3))
               for _ in range(3)]

    def train(device):
        model = UNet(**TINY, dtype=np.float64, rng=np.random.default_rng(1)).to(device)
        run = Run(model.parameters())
        move = cupy.asarray if device == "cuda" else (lambda a: a)
        for x, t in batches:
            run.opt.zero_grad()
            F.mse_loss(model(Tensor(move(x)), move(t)), Tensor(move(x))).backward()
            run.step([p.grad for p in run.params])
        return model, run

    (_, gpu), (cpu_model, cpu) = train("cuda"), train("cpu")
    assert_views_of_one_buffer([p.data for p in gpu.params])
    np.testing.assert_allclose(gpu.norms, cpu.norms, rtol=1e-10)
    assert_close(gpu.arrays(), cpu.arrays(), 1e-9)

    # Same keys and shapes as the loop's state: it loads into a CPU optimizer.
    state = {k: backend.to_numpy(v) if k != "step" else v for k, v in gpu.opt.state_dict().items()}
    reloaded = optim.Adam(cpu_model.parameters(), 1e-2)
    reloaded.load_state_dict(state)
    assert_close([*reloaded.m, *reloaded.v], [*cpu.opt.m, *cpu.opt.v], 1e-9)
