"""The class-conditional UNet and classifier-free guidance on CuPy compute what they compute on NumPy."""
import numpy as np

from autograd import Tensor, backend, no_grad
from tinyddpm.diffusion import GaussianDiffusion
from tinyddpm.guidance import NULL_LABEL, Guided, drop_labels
from tinyddpm.schedule import linear_betas
from tinyddpm.unet import PRESETS, UNet

FLOAT32_TOL = 2e-5     # as tests/gpu/test_unet_cuda.py: GPU sums in other orders


def _model(device, dtype):
    model = UNet(**PRESETS["mnist-tiny"], num_classes=10, rng=np.random.default_rng(0), dtype=dtype)
    rng = np.random.default_rng(1)
    for p in model.parameters():          # off the zero init, so that the label's path matters
        p.data[...] = (0.05 * rng.standard_normal(p.shape)).astype(dtype)
    return model.eval().to(device)


def _inputs(dtype):
    rng = np.random.default_rng(2)
    return (rng.standard_normal((4, 1, 28, 28)).astype(dtype), np.array([0, 10, 500, 999]),
            np.array([3, 7, 0, NULL_LABEL]))


def test_conditional_unet_on_cupy_equals_numpy():
    import cupy
    for dtype, tol in ((np.float64, 1e-9), (np.float32, FLOAT32_TOL)):
        x, t, y = _inputs(dtype)
        with no_grad():
            out_cpu = _model("cpu", dtype)(Tensor(x), t, y).numpy()
            out_gpu = _model("cuda", dtype)(Tensor(cupy.asarray(x)), cupy.asarray(t), cupy.asarray(y)).numpy()
        assert np.abs(out_gpu - out_cpu).max() <= tol * np.abs(out_cpu).max()


def test_guided_eps_on_cupy_is_its_definition_and_equals_numpy():
    import cupy
    x, t, y = _inputs(np.float64)
    x, t, y = x[:3], t[:3], y[:3]
    w = 3.0
    with no_grad():
        gpu = _model("cuda", np.float64)
        xg, tg, yg = Tensor(cupy.asarray(x)), cupy.asarray(t), cupy.asarray(y)
        guided = Guided(gpu, yg, w)(xg, tg).numpy()
        conditional = gpu(xg, tg, yg).numpy()
        unconditional = gpu(xg, tg, cupy.full(3, NULL_LABEL)).numpy()
        on_cpu = Guided(_model("cpu", np.float64), y, w)(Tensor(x), t).numpy()
    np.testing.assert_allclose(guided, (1 + w) * conditional - w * unconditional, rtol=1e-9, atol=1e-9)
    assert np.abs(guided - on_cpu).max() <= 1e-9 * np.abs(on_cpu).max()


def test_labels_are_dropped_on_the_gpu_at_the_rate_asked():
    import cupy
    rng = backend.default_rng(0, device="cuda")
    dropped = drop_labels(cupy.full(20_000, 4), 0.25, rng)
    assert isinstance(dropped, cupy.ndarray)
    share = float((dropped == NULL_LABEL).astype(cupy.float64).mean())
    assert abs(share - 0.25) < 0.015 and set(cupy.asnumpy(dropped).tolist()) == {4, NULL_LABEL}


def test_a_guided_sample_on_the_gpu_is_finite_and_in_range():
    import cupy
    diffusion = GaussianDiffusion(linear_betas(1000), variance="posterior")
    model = Guided(_model("cuda", np.float32), cupy.asarray(np.array([1, 8])), 2.0)
    with no_grad():
        x = diffusion.sample(model, (2, 1, 28, 28), backend.default_rng(0, device="cuda"), steps=5)
    x = backend.to_numpy(x)
    assert x.shape == (2, 1, 28, 28) and np.isfinite(x).all() and np.abs(x).max() <= 1.0
