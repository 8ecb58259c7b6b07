"""A checkpoint written from a model on the GPU loads on the CPU and back,
with the same weights, optimizer state and outputs."""
import numpy as np

from autograd import Tensor, optim
from tinyddpm.checkpoint import load_checkpoint, save_checkpoint
from tinyddpm.config import TrainConfig
from tinyddpm.train import build_model


def test_checkpoint_written_on_gpu_loads_on_cpu_and_back(tmp_path):
    import cupy
    config = TrainConfig(preset="mnist-tiny", device="cuda")
    model = build_model(config).to("cuda")
    opt = optim.Adam(model.parameters(), lr=1e-3)
    ema = optim.EMA(model.parameters(), decay=0.9)
    x = Tensor(np.random.default_rng(0).standard_normal((2, 1, 28, 28)).astype(np.float32)).to("cuda")
    t = cupy.asarray([3, 700])
    for _ in range(2):           # move the zero-initialized layers off zero
        opt.zero_grad()
        (model(x, t) - x).mean().backward()
        opt.step()
        ema.update()
    expected = model(x, t).numpy()
    path = tmp_path / "checkpoint.npz"
    # As train.py saves them on the GPU: CuPy's generators cannot be read out.
    rng = {"data": {"epoch_start": np.random.default_rng(0).bit_generator.state, "batches_taken": 2},
           "noise": None, "dropout": None, "note": "gpu"}
    save_checkpoint(path, model, ema, opt, 2, rng, config)

    checkpoint = load_checkpoint(path)
    cpu_model = build_model(config)
    cpu_opt = optim.Adam(cpu_model.parameters(), lr=1e-3)
    checkpoint.load_into(cpu_model, optimizer=cpu_opt)
    out_cpu = cpu_model(x.to("cpu"), t.get()).numpy()
    np.testing.assert_allclose(out_cpu, expected, rtol=1e-4, atol=1e-5)
    assert cpu_opt.step_count == 2

    back = build_model(config).to("cuda")
    checkpoint.load_into(back)
    assert isinstance(back.parameters()[0].data, cupy.ndarray)
    np.testing.assert_array_equal(back(x, t).numpy(), expected)
