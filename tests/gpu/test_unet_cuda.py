"""The UNet on CuPy computes what it computes on NumPy, and trains the same."""
import numpy as np
import pytest

import autograd
from autograd import Tensor, optim
from tinyddpm.unet import UNet, PRESETS

# float32 against the same computation on the host: measured on the CPU, a float32
# UNet (either preset) is within 5e-7 of the float64 one, relative to the largest
# output, and its gradients within 2e-7 of the largest gradient; the GPU sums in
# other orders, so allow some 50x that, still 100x tighter than a wrong kernel's error.
FLOAT32_TOL = 2e-5


def _model(device, dtype=np.float32, preset="mnist-tiny"):
    model = UNet(**PRESETS[preset], rng=np.random.default_rng(0), dtype=dtype)
    # Zero-initialized layers would make the comparison trivial: randomize all.
    rng = np.random.default_rng(1)
    for p in model.parameters():
        p.data[...] = (0.05 * rng.standard_normal(p.shape)).astype(dtype)
    return model.to(device)


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-9), (np.float32, FLOAT32_TOL)])
def test_unet_output_on_cupy_equals_numpy(dtype, tol):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 1, 28, 28)).astype(dtype)
    t = np.array([0, 10, 500, 999])
    out_cpu = _model("cpu", dtype)(Tensor(x), t).numpy()
    import cupy
    out_gpu = _model("cuda", dtype)(Tensor(x).to("cuda"), cupy.asarray(t)).numpy()
    scale = np.abs(out_cpu).max()
    assert np.abs(out_gpu - out_cpu).max() <= tol * scale


def test_mnist_preset_on_cupy_equals_numpy_with_dropout_off():
    """The GPU default (ch 64, 32 groups, attention at 14x14, dropout 0.1): output
    and every gradient, in eval mode so that no dropout mask is drawn (the CPU's
    and the GPU's generators draw different masks)."""
    import cupy
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 1, 28, 28)).astype(np.float32)
    eps = rng.standard_normal(x.shape).astype(np.float32)
    t = np.array([5, 700])
    assert PRESETS["mnist"]["dropout"] > 0
    results = {}
    for device, move in (("cpu", lambda a: a), ("cuda", cupy.asarray)):
        model = _model(device, preset="mnist").eval()
        out = model(Tensor(move(x)), move(t))
        autograd.functional.mse_loss(out, Tensor(move(eps))).backward()
        results[device] = out.numpy(), [Tensor(p.grad).numpy() for p in model.parameters()]
    (out_cpu, grads_cpu), (out_gpu, grads_gpu) = results["cpu"], results["cuda"]
    assert np.abs(out_gpu - out_cpu).max() <= FLOAT32_TOL * np.abs(out_cpu).max()
    largest = max(np.abs(g).max() for g in grads_cpu)
    for i, (a, b) in enumerate(zip(grads_gpu, grads_cpu)):
        assert np.abs(a - b).max() <= FLOAT32_TOL * largest, f"parameter {i}"


def test_twenty_training_steps_on_gpu_match_cpu_losses():
    """Same data, timesteps and noise (drawn on the host) on both devices:
    the loss curves agree within float32 rounding (on the CPU, two kernel sets
    with different sums part by ~1e-7 over these 20 steps)."""
    import cupy
    from tinyddpm.diffusion import GaussianDiffusion
    from tinyddpm.schedule import linear_betas

    diffusion = GaussianDiffusion(linear_betas(1000))
    rng = np.random.default_rng(3)
    batches = [(rng.uniform(-1, 1, (8, 1, 28, 28)).astype(np.float32),
                rng.integers(0, 1000, 8),
                rng.standard_normal((8, 1, 28, 28)).astype(np.float32)) for _ in range(20)]

    def run(device):
        model = _model(device)
        opt = optim.Adam(model.parameters(), lr=2e-4)
        move = (lambda a: cupy.asarray(a)) if device == "cuda" else (lambda a: a)
        losses = []
        for x0, t, eps in batches:
            x0, t, eps = move(x0), move(t), move(eps)
            x_t = diffusion.q_sample(x0, t, eps)
            loss = autograd.functional.mse_loss(model(Tensor(x_t), t), Tensor(eps))
            opt.zero_grad()
            loss.backward()
            optim.clip_grad_norm(model.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
        return np.array(losses)

    np.testing.assert_allclose(run("cuda"), run("cpu"), rtol=2e-4)
