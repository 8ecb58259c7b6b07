"""The engine's ops on CuPy give NumPy's results: forward and gradients, in
float64 (tight) and float32 (float32 tolerances), and the float64 gradient
check passes on the GPU too. Each runs twice: with the fast layer's twins
(autograd/fast: the CUDA kernels, cuBLAS, flat optimizer buffers) and with
the plain kernels alone, which must work on CuPy as written."""
import numpy as np
import pytest

import autograd.functional as F
from autograd import Tensor, fast, gradcheck

# The op suite with autograd.fast enabled, then disabled (conftest.py's fixture)
both_layers = pytest.mark.parametrize("fast_layer", ["fast", "plain"], indirect=True)

# (name, function of tensors, input shapes)
CASES = [
    ("add_broadcast", lambda a, b: a + b, [(3, 4), (4,)]),
    ("mul_div", lambda a, b: a * b / (b * b + 1), [(3, 4), (3, 4)]),
    ("matmul", lambda a, b: a @ b, [(2, 3, 4), (4, 5)]),
    ("sum_mean", lambda a: a.sum(axis=1).exp().mean(), [(3, 4)]),
    ("getitem", lambda a: a[[0, 0, 2], 1:3], [(3, 4)]),
    ("linear", F.linear, [(5, 4), (3, 4), (3,)]),
    ("conv3x3_pad1", lambda x, w, b: F.conv2d(x, w, b, padding=1), [(2, 3, 7, 7), (4, 3, 3, 3), (4,)]),
    ("conv3x3_stride2", lambda x, w: F.conv2d(x, w, stride=2, padding=1), [(2, 3, 9, 9), (4, 3, 3, 3)]),
    ("conv1x1", F.conv2d, [(2, 3, 5, 5), (4, 3, 1, 1)]),
    ("conv1x5_pad2", lambda x, w: F.conv2d(x, w, padding=2), [(2, 2, 6, 1), (3, 2, 1, 5)]),
    ("group_norm", lambda x, g, b: F.group_norm(x, 2, g, b), [(2, 4, 5, 5), (4,), (4,)]),
    ("group_norm_silu", lambda x, g, b: F.group_norm_silu(x, 2, g, b), [(2, 4, 5, 5), (4,), (4,)]),
    ("silu", F.silu, [(3, 4)]),
    ("sigmoid_tanh_relu", lambda a: F.sigmoid(a) + F.tanh(a) + F.relu(a), [(3, 4)]),
    ("softmax", F.softmax, [(3, 5)]),
    ("log_softmax", F.log_softmax, [(3, 5)]),
    ("attention", F.attention, [(2, 5, 3), (2, 4, 3), (2, 4, 6)]),
    ("upsample", F.upsample_nearest2d, [(2, 2, 3, 3)]),
    ("concat", lambda a, b: F.concat([a, b], axis=1), [(2, 3), (2, 2)]),
    ("mse", F.mse_loss, [(3, 4), (3, 4)]),
]


def _run(fn, arrays, device, dtype):
    inputs = [Tensor(a.astype(dtype), requires_grad=True).to(device) for a in arrays]
    out = fn(*inputs)
    upstream = np.random.default_rng(1).standard_normal(out.shape).astype(dtype)
    out.backward(Tensor(upstream).to(device).data)
    return out.numpy(), [x.grad for x in inputs]


@both_layers
@pytest.mark.parametrize("dtype, rtol, atol", [(np.float64, 1e-10, 1e-12), (np.float32, 1e-4, 1e-5)])
@pytest.mark.parametrize("name, fn, shapes", CASES, ids=[c[0] for c in CASES])
def test_op_on_cupy_matches_numpy(name, fn, shapes, dtype, rtol, atol, fast_layer):
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(s) for s in shapes]
    out_cpu, grads_cpu = _run(fn, arrays, "cpu", dtype)
    out_gpu, grads_gpu = _run(fn, arrays, "cuda", dtype)
    assert out_gpu.dtype == dtype
    np.testing.assert_allclose(out_gpu, out_cpu, rtol=rtol, atol=atol)
    for g_cpu, g_gpu in zip(grads_cpu, grads_gpu):
        assert type(g_gpu).__module__.startswith("cupy"), "gradient left the GPU"
        np.testing.assert_allclose(Tensor(g_gpu).numpy(), g_cpu, rtol=rtol, atol=atol)


@both_layers
@pytest.mark.parametrize("name, fn, shapes", CASES, ids=[c[0] for c in CASES])
def test_gradcheck_on_cupy(name, fn, shapes, fast_layer):
    rng = np.random.default_rng(0)
    inputs = [Tensor(rng.standard_normal(s), requires_grad=True).to("cuda") for s in shapes]
    assert gradcheck(fn, inputs, mode="adjoint")


def test_dropout_draws_on_the_gpu():
    import cupy
    x = Tensor(np.ones((64, 64), np.float32)).to("cuda")
    y = F.dropout(x, 0.5, training=True, rng=cupy.random.default_rng(0))
    kept = float((y.data != 0).mean())
    assert 0.4 < kept < 0.6
    assert isinstance(y.data, cupy.ndarray)


def test_mixing_devices_is_refused():
    a = Tensor(np.ones(3, np.float32))
    b = Tensor(np.ones(3, np.float32)).to("cuda")
    with pytest.raises(ValueError, match="cpu"):
        _ = a + b


@both_layers
@pytest.mark.parametrize("dtype, rtol, atol", [(np.float64, 1e-12, 1e-14), (np.float32, 1e-5, 1e-7)])
def test_adam_update_on_cupy_matches_numpy(dtype, rtol, atol, fast_layer):
    """With the fast layer Adam's update is one fused kernel on CuPy (cupy.fuse) over
    a flat buffer, written in place; without it, the plain loop. Either way NumPy's numbers."""
    from autograd.nn import Parameter
    from autograd.optim import Adam
    rng = np.random.default_rng(0)
    values, grads = rng.standard_normal((3, 40)).astype(dtype), rng.standard_normal((4, 3, 40)).astype(dtype)
    results = []
    for device in ("cpu", "cuda"):
        p = Parameter(values.copy()).to(device)
        opt = Adam([p], lr=1e-2, weight_decay=0.01)
        data = None
        for g in grads:
            p.grad = Tensor(g).to(device).data.copy()
            opt.step()                  # the first flat step makes p.data a view of the flat buffer
            assert data is None or p.data is data, "the update must be in place"
            data = p.data
        results.append(Tensor(p.data).numpy())
    np.testing.assert_allclose(results[1], results[0], rtol=rtol, atol=atol)


@both_layers
@pytest.mark.parametrize("scale", [3.0, 0.01], ids=["clipped", "under_the_limit"])
def test_clip_grad_norm_stays_on_the_gpu_and_matches_numpy(scale, fast_layer):
    """The norm comes back as a CuPy array (no host read inside a training step),
    and the clipped gradients equal NumPy's."""
    import cupy
    from autograd.nn import Parameter
    from autograd.optim import clip_grad_norm
    rng = np.random.default_rng(0)
    grads = [scale * rng.standard_normal(s).astype(np.float32) for s in ((4, 3), (7,), (2, 2, 3))]
    results = {}
    for device in ("cpu", "cuda"):
        params = [Parameter(np.zeros(g.shape, np.float32)).to(device) for g in grads]
        for p, g in zip(params, grads):
            p.grad = Tensor(g).to(device).data.copy()
        norm = clip_grad_norm(params, 1.0)
        results[device] = (float(norm), [Tensor(p.grad).numpy() for p in params])
        if device == "cuda":
            assert isinstance(norm, cupy.ndarray) and norm.shape == () and norm.dtype == np.float32
    assert results["cuda"][0] == pytest.approx(results["cpu"][0], rel=1e-5)
    for a, b in zip(results["cuda"][1], results["cpu"][1]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_tf32_is_opt_in_and_can_be_switched_off_again():
    import cupy
    a = cupy.asarray(np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32))
    exact = Tensor(a).numpy().astype(np.float64) @ Tensor(a).numpy().astype(np.float64)
    fast.set_tf32(False)                           # whatever CUPY_TF32 the environment had
    full = Tensor(a @ a).numpy()
    try:
        assert fast.set_tf32(True)
        tf32 = Tensor(a @ a).numpy()
    finally:
        fast.set_tf32(False)
    again = Tensor(a @ a).numpy()
    err = lambda c: np.abs(c - exact).max() / np.abs(exact).max()  # noqa: E731
    assert err(full) < 1e-5 and err(again) < 1e-5
    assert err(tf32) < 1e-2
    if int(cupy.cuda.Device().compute_capability) >= 80:   # TF32 tensor cores exist: it must show
        assert err(tf32) > 10 * err(full)
