"""The examples a learner runs first: each runs, writes real pictures, and shows what it claims.

Scripts run in a subprocess, as a learner runs them, from the repository root.
They get one BLAS thread (OPENBLAS_NUM_THREADS=1): the tests check results,
not speed, and on a 2-core machine shared with other jobs several BLAS threads
fighting for the cores can make a step ten times slower.
"""
import io
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))

import forward_noising  # noqa: E402
import gradcheck_tour  # noqa: E402
import toy2d  # noqa: E402


def run_example(script, *args, tmp_path, block_matplotlib=False, timeout=120):
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if block_matplotlib:
        # A package named matplotlib that fails to import, found first: the script
        # must then take its Pillow path, as on a machine without the `plot` extra.
        blocker = tmp_path / "no_matplotlib" / "matplotlib"
        blocker.mkdir(parents=True)
        (blocker / "__init__.py").write_text("raise ImportError('matplotlib blocked by the test')\n")
        env["PYTHONPATH"] = os.pathsep.join([str(blocker.parent), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{script} {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def assert_png(path):
    path = Path(path)
    assert path.is_file(), f"{path} was not written"
    assert path.stat().st_size > 0
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.width > 0 and img.height > 0
        img.verify()                      # raises on a truncated or corrupt file


def have_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


PLOTTERS = [pytest.param(True, id="pillow"),
            pytest.param(False, id="matplotlib",
                         marks=pytest.mark.skipif(not have_matplotlib(), reason="matplotlib not installed"))]


# =============================================================================
# Every example runs in its fast mode and writes valid PNGs
# =============================================================================

@pytest.mark.parametrize("block_matplotlib", PLOTTERS)
def test_toy2d_fast_writes_its_pictures(tmp_path, block_matplotlib):
    out = run_example("toy2d.py", "--quick", "--out", str(tmp_path / "out"), tmp_path=tmp_path,
                      block_matplotlib=block_matplotlib)
    assert ("drawing with Pillow" in out) == block_matplotlib
    assert_png(tmp_path / "out" / "toy2d_samples.png")
    assert_png(tmp_path / "out" / "toy2d_reverse.png")
    stats = json.loads((tmp_path / "out" / "toy2d_stats.json").read_text())
    assert set(stats) >= {"near", "modes_hit", "counts", "train_seconds"}


@pytest.mark.parametrize("block_matplotlib", PLOTTERS)
def test_forward_noising_fast_writes_its_pictures(tmp_path, block_matplotlib):
    out = run_example("forward_noising.py", "--quick", "--out", str(tmp_path), tmp_path=tmp_path,
                      block_matplotlib=block_matplotlib)
    assert ("drawn with Pillow" if block_matplotlib else "drawn with matplotlib") in out
    assert "linear" in out and "cosine" in out          # the printed alpha_bar table
    assert_png(tmp_path / "forward_noising.png")
    assert_png(tmp_path / "alpha_bar.png")


def write_tiny_mnist(folder, n=16, seed=0):
    """A stand-in training set in MNIST's IDX format, so the test needs no download."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x00000803, n, 28, 28)
                                                     + pixels.tobytes())
    (folder / "train-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x00000801, n) + labels.tobytes())
    return folder


def test_mnist_quickstart_fast_trains_and_writes_a_grid(tmp_path):
    data = write_tiny_mnist(tmp_path / "mnist")
    out = run_example("mnist_quickstart.py", "--quick", "--out", str(tmp_path / "out"),
                      "--data-dir", str(data), "--no-cache", tmp_path=tmp_path)
    run = tmp_path / "out" / "mnist-quickstart"
    assert (run / "checkpoint.npz").is_file()
    assert_png(run / "samples-000002.png")
    assert "tinyddpm sample" in out


def test_mnist_quickstart_reports_missing_data_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(EXAMPLES / "mnist_quickstart.py"), "--quick", "--out",
                           str(tmp_path), "--data-dir", str(tmp_path / "empty"), "--no-cache"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("mnist_quickstart: no MNIST train files")


# =============================================================================
# gradcheck_tour: a correct backward passes, a broken one is caught
# =============================================================================

@pytest.mark.parametrize("twins", [False, True])
@pytest.mark.parametrize("op", gradcheck_tour.OPS)
def test_gradcheck_tour_passes_a_correct_backward(op, twins):
    out = io.StringIO()
    assert gradcheck_tour.run(op, quick=True, out=out, twins=twins)
    text = out.getvalue()
    assert "passed" in text and "FAILED" not in text
    worst = [float(line.split(":")[1].split()[0]) for line in text.splitlines() if line.startswith("worst")]
    assert worst and max(worst) < 1e-6


@pytest.mark.parametrize("op", gradcheck_tour.OPS)
def test_gradcheck_tour_catches_a_broken_backward(op):
    import autograd.functional as F
    original = getattr(F, gradcheck_tour._op_table(True)[op]["function"])
    out = io.StringIO()
    assert gradcheck_tour.run(op, break_it=True, quick=True, out=out)
    assert "FAILED, as it should" in out.getvalue()
    # The sabotage is undone afterwards.
    assert getattr(F, gradcheck_tour._op_table(True)[op]["function"]) is original


@pytest.mark.parametrize("twins", [False, True])
def test_gradcheck_tour_checks_the_kernels_it_names_and_restores_the_switch(twins, monkeypatch):
    import autograd
    seen, real_gradcheck = [], autograd.gradcheck

    def gradcheck(*args, **kwargs):
        seen.append(autograd.fast.enabled())
        return real_gradcheck(*args, **kwargs)

    monkeypatch.setattr(autograd, "gradcheck", gradcheck)
    before = autograd.fast.enabled()
    out = io.StringIO()
    assert gradcheck_tour.run("group_norm", quick=True, out=out, twins=twins)
    assert seen == [twins] and autograd.fast.enabled() == before
    named = "the fast layer's twin of group_norm_backward" if twins else "autograd/kernels/norm.py::group_norm_backward"
    assert f"backward: {named}" in out.getvalue()


def test_gradcheck_tour_command_line(tmp_path):
    out = run_example("gradcheck_tour.py", "--op", "silu", "--break", "--quick", tmp_path=tmp_path)
    assert "analytic" in out and "numeric" in out and "FAILED, as it should" in out


# =============================================================================
# forward_noising: q_sample at the extremes
# =============================================================================

def test_forward_noising_goes_from_the_digit_to_noise():
    x0, _ = forward_noising.one_digit(quick=True)
    diffusion = forward_noising.GaussianDiffusion(forward_noising.linear_betas(1000))
    strip = forward_noising.noised(x0, diffusion, (0, 999))
    assert np.abs(strip[0] - x0).max() < 0.05                         # t = 0: barely touched
    assert abs(strip[1].std() - 1) < 0.1 and abs(strip[1].mean()) < 0.2   # t = 999: ~N(0, 1)


# =============================================================================
# toy2d: the sampler reproduces the distribution it was trained on
# =============================================================================

def test_toy_mode_stats_tell_data_from_noise():
    rng = np.random.default_rng(0)
    data = toy2d.mode_stats(toy2d.make_data(4000, rng))
    assert data["near"] > 0.99 and data["modes_hit"] == toy2d.N_MODES
    noise = toy2d.mode_stats(rng.uniform(-1, 1, (4000, 2)))
    assert noise["near"] < 0.5


@pytest.mark.slow
def test_toy_sampler_reproduces_its_distribution(tmp_path):
    # The real example, trained for real: 3000 steps of a 3 x 32 MLP (~20-40 s on 2 cores).
    # Over seeds 0, 1, 2 this reached 95-96% of samples within 0.2 of a mode.
    run_example("toy2d.py", "--steps", "3000", "--hidden", "32", "--seed", "0", "--out", str(tmp_path),
                tmp_path=tmp_path, timeout=300)
    stats = json.loads((tmp_path / "toy2d_stats.json").read_text())
    assert stats["near"] >= 0.90, stats
    assert stats["modes_hit"] == toy2d.N_MODES, stats
    # Every mode gets a fair share, not just one sample (2000 samples, 250 per mode expected).
    assert min(stats["counts"]) >= 150, stats


def test_toy_sampling_is_repeatable_bit_for_bit():
    model = toy2d.ToyDenoiser(hidden=16, rng=np.random.default_rng(1))
    diffusion = toy2d.make_diffusion()
    toy2d.train(model, diffusion, steps=20, rng=np.random.default_rng(0), batch_size=64)
    first = toy2d.sample(model, diffusion, 256, np.random.default_rng(7))
    again = toy2d.sample(model, diffusion, 256, np.random.default_rng(7))
    other = toy2d.sample(model, diffusion, 256, np.random.default_rng(8))
    assert first.dtype == np.float32 and first.shape == (256, 2)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)
