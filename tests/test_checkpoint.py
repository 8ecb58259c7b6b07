"""Tests for tinyddpm.checkpoint: an exact round trip of everything a run
needs, the layout of the .npz, atomic writes that say what is left when they
fail, and a one-line CheckpointError naming the file for every kind of bad
file, found from the entries' headers before their data is read."""
import errno
import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from hostile import peak_bytes

from autograd.optim import EMA, Adam
from tinyddpm import arrayfile
from tinyddpm import checkpoint as ckpt
from tinyddpm.checkpoint import FORMAT_VERSION, CheckpointError, load_checkpoint, save_checkpoint
from tinyddpm.config import TrainConfig
from tinyddpm.unet import UNet

CONFIG = TrainConfig(steps=123, lr=3e-4, seed=5)
MICRO = dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0, num_groups=4)


def trained_state(seed):
    """The UNet of CONFIG's preset, its Adam and EMA after two updates with random gradients."""
    model = UNet(**CONFIG.unet_kwargs(), rng=np.random.default_rng(seed))
    params = model.parameters()
    optimizer, ema = Adam(params, lr=1e-2), EMA(params, decay=0.9)
    rng = np.random.default_rng(seed + 100)
    for _ in range(2):
        for p in params:
            p.grad = rng.standard_normal(p.shape).astype(np.float32)
        optimizer.step()
        ema.update()
    return model, ema, optimizer


def generator_state(seed):
    return np.random.default_rng(seed).bit_generator.state


# What train.py saves: the data order's generator and how far into its epoch, the noise, the dropout.
RNG_STATE = {"data": {"epoch_start": generator_state(1), "batches_taken": 7},
             "noise": generator_state(3), "dropout": generator_state(4)}


@pytest.fixture(scope="module")
def state():
    return trained_state(seed=0)


@pytest.fixture
def saved(tmp_path, state):
    model, ema, optimizer = state
    path = tmp_path / "checkpoint.npz"
    save_checkpoint(path, model, ema, optimizer, 42, RNG_STATE, CONFIG)
    return path, state


def test_round_trip_restores_model_ema_optimizer_step_rng_and_config(saved):
    path, (model, ema, optimizer) = saved
    loaded = load_checkpoint(path)
    assert loaded.step == 42 and loaded.format_version == FORMAT_VERSION
    assert loaded.config == CONFIG
    assert loaded.rng_state == RNG_STATE                  # 128-bit PCG64 integers survive JSON

    fresh_model, fresh_ema, fresh_optimizer = trained_state(seed=1)
    loaded.load_into(fresh_model, fresh_ema, fresh_optimizer)
    for (name, a), (_, b) in zip(model.named_parameters(), fresh_model.named_parameters()):
        np.testing.assert_array_equal(a.data, b.data, err_msg=name)
    for a, b in zip(ema.shadow, fresh_ema.shadow):
        np.testing.assert_array_equal(a, b)
    assert fresh_optimizer.step_count == optimizer.step_count == 2
    for slot in ("m", "v"):
        for a, b in zip(getattr(optimizer, slot), getattr(fresh_optimizer, slot)):
            np.testing.assert_array_equal(a, b)


def test_ema_weights_can_be_loaded_into_a_model_for_sampling(saved):
    path, (_, ema, _) = saved
    model = UNet(**CONFIG.unet_kwargs())
    load_checkpoint(path).load_into(model, ema_weights=True)
    for p, s in zip(model.parameters(), ema.shadow):
        np.testing.assert_array_equal(p.data, s)


def test_layout_names_every_array_by_parameter(saved):
    path, (model, _, _) = saved
    with np.load(path, allow_pickle=False) as npz:
        files = set(npz.files)
        assert npz["format_version"] == FORMAT_VERSION and npz["step"] == 42
        assert npz["config"].dtype.kind == "U" and npz["rng"].dtype.kind == "U"
        assert npz["model/conv_in.weight"].dtype == np.float32
    names = [name for name, _ in model.named_parameters()]
    expected = {"format_version", "step", "config", "rng", "optimizer/step"}
    for name in names:
        expected |= {f"model/{name}", f"ema/{name}", f"optimizer/m/{name}", f"optimizer/v/{name}"}
    assert files == expected


# =============================================================================
# Writing: atomic, with the mode of any file, and what is left when it fails
# =============================================================================

def test_an_interrupted_write_leaves_the_old_checkpoint(saved, monkeypatch):
    path, (model, ema, optimizer) = saved
    before = path.read_bytes()

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.np, "savez", interrupt)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model, ema, optimizer, 43, RNG_STATE, CONFIG)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert load_checkpoint(path).step == 42
    assert os.listdir(path.parent) == ["checkpoint.npz"], "the temporary file was left behind"


@pytest.mark.parametrize("failing", ["write", "rename"])
def test_a_full_disk_names_the_file_and_the_intact_previous_step(saved, monkeypatch, failing):
    path, (model, ema, optimizer) = saved
    before = path.read_bytes()

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if failing == "write":
        monkeypatch.setattr(ckpt.np, "savez", no_space)
    else:
        monkeypatch.setattr(arrayfile.os, "replace", no_space)
    with pytest.raises(CheckpointError) as exc_info:
        save_checkpoint(path, model, ema, optimizer, 43, RNG_STATE, CONFIG)
    monkeypatch.undo()
    message = str(exc_info.value)
    assert "\n" not in message and str(path) in message
    assert "No space left on device" in message and "step 43" in message
    assert "previous checkpoint there (step 42) is intact" in message
    assert path.read_bytes() == before
    assert os.listdir(path.parent) == ["checkpoint.npz"]


def test_a_failed_first_save_says_there_was_no_checkpoint(tmp_path, state, monkeypatch):
    def broken_disk(*args, **kwargs):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(ckpt.np, "savez", broken_disk)
    with pytest.raises(CheckpointError, match="I/O error.*no checkpoint had been saved there before"):
        save_checkpoint(tmp_path / "checkpoint.npz", *state, 1, RNG_STATE, CONFIG)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_the_checkpoint_gets_the_mode_of_any_new_file(tmp_path, state, umask):
    previous = os.umask(umask)
    try:
        save_checkpoint(tmp_path / "checkpoint.npz", *state, 1, RNG_STATE, CONFIG)
        (tmp_path / "other.json").write_text("{}")
    finally:
        os.umask(previous)
    mode = (tmp_path / "checkpoint.npz").stat().st_mode & 0o777
    assert mode == 0o666 & ~umask == (tmp_path / "other.json").stat().st_mode & 0o777


def test_a_save_removes_the_temporary_files_of_dead_writers_only(saved, tmp_path):
    path, state = saved
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()                       # its process id now names no running process
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        host = arrayfile.socket.gethostname()
        names = {
            "dead": f".checkpoint.npz.{dead.pid}@{host}.0a1b2c3d.tmp",
            "alive": f".checkpoint.npz.{alive.pid}@{host}.0a1b2c3d.tmp",
            "other machine": f".checkpoint.npz.{dead.pid}@not-{host}.0a1b2c3d.tmp",
            "other file": f".metrics.csv.{dead.pid}@{host}.0a1b2c3d.tmp",
        }
        for name in names.values():
            (tmp_path / name).write_bytes(b"half a checkpoint")
        save_checkpoint(path, *state, 43, RNG_STATE, CONFIG)
        left = set(os.listdir(tmp_path))
    finally:
        alive.kill()
        alive.wait()
    assert names["dead"] not in left
    assert {names["alive"], names["other machine"], names["other file"], "checkpoint.npz"} <= left


# =============================================================================
# Reading: every bad file is one CheckpointError line naming the file
# =============================================================================

def assert_names_file(exc_info, path, words):
    message = str(exc_info.value)
    assert str(path) in message and words in message, message
    assert "\n" not in message
    assert "allow_pickle=" not in message     # NumPy's advice to load a stranger's file unsafely


def load_error(path, words):
    with pytest.raises(CheckpointError) as exc_info:
        load_checkpoint(path)
    assert_names_file(exc_info, path, words)


def test_missing_file(tmp_path):
    load_error(tmp_path / "nope.npz", "no such file")


@pytest.mark.parametrize("keep", [0, 100, 0.5, 0.999])
def test_truncated_file(saved, keep):
    path, _ = saved
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)] if isinstance(keep, float) else data[:keep])
    load_error(path, "")


def test_text_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.npz"
    path.write_text("these are not arrays\n")
    load_error(path, "not a tinyddpm checkpoint")


def test_npy_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.zeros(3))
    load_error(path, "not an .npz")


def test_npz_of_something_else_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "samples.npz"
    np.savez(path, samples=np.zeros((2, 1, 28, 28), np.float32))
    load_error(path, "not a tinyddpm checkpoint")


def entries_of(path):
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def rewrite(path, changes=None, remove=()):
    """Save the checkpoint again with entries changed ({name: array}) or removed."""
    entries = entries_of(path)
    for name in remove:
        del entries[name]
    entries.update(changes or {})
    np.savez(path, **entries)


def config_with(**changes):
    return np.array(json.dumps(dict(CONFIG.to_dict(), **changes)))


def rng_with(**changes):
    return np.array(json.dumps(dict(RNG_STATE, **changes)))


WEIGHT = "model/conv_in.weight"


@pytest.mark.parametrize("changes, words", [
    (dict(format_version=np.int64(FORMAT_VERSION + 1)), "newer tinyddpm"),
    (dict(format_version=np.int64(0)), "unknown format version"),
    (dict(config=np.array('{"preset": "no-such-preset"}')), "no-such-preset"),
    (dict(config=config_with(lr="0.001")), "lr: must be a finite number"),
    (dict(config=config_with(lr=float("inf"))), "lr: must be a finite number"),
    (dict(config=config_with(beta_end=1.5)), "beta_end < 1"),
    (dict(config=config_with(T=10**9)), "T: must be at most 100,000"),
    (dict(config=config_with(T=80_000, schedule="linear")), "at most T = 8769"),
    (dict(config=config_with(image_size=4096)), "image_size"),
    (dict(config=np.array("[" * 30_000 + "]" * 30_000)), "invalid configuration"),
    (dict(config=np.array(" " * 70_000)), "characters long"),
    (dict(config=np.int64(3)), "should be a text scalar"),
    (dict(rng=np.array("{}")), "random-generator state: 'data' must hold"),
    (dict(rng=np.array("[1, 2]")), "not a JSON object"),
    (dict(rng=np.array("not json")), "random-generator state"),
    (dict(rng=rng_with(noise={})), "noise is not the state of a PCG64"),
    (dict(rng=rng_with(dropout=None)), "dropout is not the state of a PCG64"),
    (dict(rng=rng_with(data={"epoch_start": generator_state(1), "batches_taken": 10**12})),
     "batches_taken must be an integer in 0..42"),
    (dict(rng=rng_with(extra=1)), "unknown key"),
    (dict(step=np.int64(-5)), "negative number of steps"),
    (dict(step=np.float64(5)), "'step' should be an integer scalar"),
    (dict(step=np.array("5")), "'step' should be an integer scalar"),
    ({"optimizer/step": np.array([1, 2])}, "'optimizer/step' should be an integer scalar"),
    ({"optimizer/step": np.array("2")}, "'optimizer/step' should be an integer scalar"),
    ({"optimizer/step": np.int64(50)}, "between 0 and the checkpoint's 42"),
    ({WEIGHT: np.zeros((32, 1, 3, 3))}, "is float64 (32, 1, 3, 3); the 'mnist-tiny' network needs float32"),
    ({WEIGHT: np.zeros((8, 1, 3, 3), np.float32)}, "needs float32 (32, 1, 3, 3)"),
    ({WEIGHT: np.full((32, 1, 3, 3), np.nan, np.float32)}, "NaN or infinite"),
    ({"optimizer/v/conv_in.weight": np.full((32, 1, 3, 3), -1, np.float32)}, "negative values"),
    (dict(extra=np.zeros(3)), "entries that no 'mnist-tiny' checkpoint has ('extra')"),
], ids=lambda value: value if isinstance(value, str) else None)
def test_crafted_entries_are_refused_in_one_line(saved, changes, words):
    path, _ = saved
    rewrite(path, changes)
    load_error(path, words)


@pytest.mark.parametrize("removed, words", [
    (["ema/conv_in.weight"], "1 ema entries are missing"),
    (["optimizer/step"], "optimizer's state is incomplete"),
    (["rng"], "no rng entry"),
])
def test_missing_entries_are_refused(saved, removed, words):
    path, _ = saved
    rewrite(path, remove=removed)
    load_error(path, words)


def test_a_checkpoint_without_optimizer_state_still_loads_for_sampling(saved):
    path, _ = saved
    rewrite(path, remove=[name for name in entries_of(path) if name.startswith("optimizer/")])
    assert load_checkpoint(path).optimizer == {}


def test_pickled_objects_are_refused_without_numpys_advice(saved):
    path, _ = saved
    rewrite(path, {"extra": np.array([{"run": "code"}], dtype=object)})
    load_error(path, "holds Python objects")


def add_member(path, name, header_shape, dtype="<f8", data_bytes=0, chunk=2**20):
    """Append a deflated .npy member declaring `header_shape`, followed by data_bytes zero bytes."""
    header = {"descr": dtype, "fortran_order": False, "shape": header_shape}
    with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        with zf.open(name, "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, header)
            zeros = bytes(chunk)
            for start in range(0, data_bytes, chunk):
                f.write(zeros[:min(chunk, data_bytes - start)])


def test_an_unused_large_entry_is_refused_without_inflating_it(saved):
    path, _ = saved
    # 256 MiB of zeros inflate from about 1 MB; np.load used to inflate them all.
    add_member(path, "unused.npy", (2**25,), data_bytes=2**28)
    assert path.stat().st_size < 40 * 2**20
    load_error(path, "entries that no 'mnist-tiny' checkpoint has ('unused')")
    assert peak_bytes(load_checkpoint, path, refusal=CheckpointError) < 128 * 2**20


def test_a_declared_4_tib_entry_is_one_line_not_a_memory_error(saved):
    path, _ = saved
    rewrite(path, remove=["model/conv_in.weight"])
    add_member(path, "model/conv_in.weight.npy", (2**39,))          # 4 TiB of float64, no data
    load_error(path, "entry 'model/conv_in.weight': the header declares float64 (549755813888,)")


def test_weights_of_another_architecture_are_refused(saved):
    path, _ = saved
    other = UNet(**MICRO)
    with pytest.raises(CheckpointError) as exc_info:
        load_checkpoint(path).load_into(other)
    assert_names_file(exc_info, path, "does not fit")


# =============================================================================
# Fields a resumed run may set anew: a checkpoint carrying a value refused today still loads
# =============================================================================

def test_a_checkpoint_saved_with_log_every_0_loads_and_resumes_with_a_new_value(tmp_path, state,
                                                                                 monkeypatch):
    from tinyddpm import train
    from tinyddpm.config import ConfigError

    stale = dict(CONFIG.to_dict(), log_every=0, sample_n=10**8)
    save_checkpoint(tmp_path / "checkpoint.npz", *state, 42, RNG_STATE, stale)
    assert load_checkpoint(tmp_path / "checkpoint.npz").config.log_every == 0
    with pytest.raises(ConfigError, match=r"log_every: must be >= 1, got 0 \(the checkpoint's value; "
                                          r"pass --log-every to continue with another\)"):
        train.prepare_run({}, tmp_path, resume=True)
    # A stand-in for the training set: only the checks before training matter here.
    monkeypatch.setattr(train, "load_mnist", lambda *a, **k: (np.zeros((100, 1, 28, 28), np.float32), None))
    plan = train.prepare_run({"log_every": 10, "sample_n": 16}, tmp_path, resume=True)
    assert (plan.config.log_every, plan.config.sample_n, plan.start_step) == (10, 16, 42)
