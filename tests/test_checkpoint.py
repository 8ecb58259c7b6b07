"""Tests for tinyddpm.checkpoint: an exact round trip of everything a run
needs, the layout of the .npz, atomic writes, and a one-line CheckpointError
naming the file for every kind of bad file."""
import os

import numpy as np
import pytest

from autograd.optim import EMA, Adam
from tinyddpm import checkpoint as ckpt
from tinyddpm.checkpoint import FORMAT_VERSION, CheckpointError, load_checkpoint, save_checkpoint
from tinyddpm.config import TrainConfig
from tinyddpm.unet import UNet

MICRO = dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0, num_groups=4)


def trained_state(seed):
    """A small UNet, its Adam and EMA after two updates with random gradients."""
    model = UNet(**MICRO, rng=np.random.default_rng(seed))
    params = model.parameters()
    optimizer, ema = Adam(params, lr=1e-2), EMA(params, decay=0.9)
    rng = np.random.default_rng(seed + 100)
    for _ in range(2):
        for p in params:
            p.grad = rng.standard_normal(p.shape).astype(np.float32)
        optimizer.step()
        ema.update()
    return model, ema, optimizer


RNG_STATE = {"noise": np.random.default_rng(3).bit_generator.state, "data": {"batches_taken": 7}}
CONFIG = TrainConfig(steps=123, lr=3e-4, seed=5)


@pytest.fixture
def saved(tmp_path):
    model, ema, optimizer = trained_state(seed=0)
    path = tmp_path / "checkpoint.npz"
    save_checkpoint(path, model, ema, optimizer, 42, RNG_STATE, CONFIG)
    return path, (model, ema, optimizer)


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
    model = UNet(**MICRO)
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


@pytest.mark.parametrize("failing, error", [("os.replace", OSError), ("np.savez", KeyboardInterrupt)])
def test_an_interrupted_write_leaves_the_old_checkpoint(saved, monkeypatch, failing, error):
    path, (model, ema, optimizer) = saved
    before = path.read_bytes()

    def fail(*args, **kwargs):
        raise error("simulated crash")

    module, name = failing.split(".")
    monkeypatch.setattr(getattr(ckpt, module), name, fail)
    with pytest.raises(error):
        save_checkpoint(path, model, ema, optimizer, 43, RNG_STATE, CONFIG)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert load_checkpoint(path).step == 42
    assert os.listdir(path.parent) == ["checkpoint.npz"], "the temporary file was left behind"


def assert_names_file(exc_info, path, words):
    message = str(exc_info.value)
    assert str(path) in message and words in message
    assert "\n" not in message


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError) as exc_info:
        load_checkpoint(tmp_path / "nope.npz")
    assert_names_file(exc_info, tmp_path / "nope.npz", "no such file")


@pytest.mark.parametrize("keep", [0, 100, 0.5])
def test_truncated_file(saved, keep):
    path, _ = saved
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)] if isinstance(keep, float) else data[:keep])
    with pytest.raises(CheckpointError) as exc_info:
        load_checkpoint(path)
    assert_names_file(exc_info, path, "")


def test_text_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.npz"
    path.write_text("these are not arrays\n")
    with pytest.raises(CheckpointError) as exc_info:
        load_checkpoint(path)
    assert_names_file(exc_info, path, "not a readable .npz")


def test_npy_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.zeros(3))
    with pytest.raises(CheckpointError) as exc_info:
        load_checkpoint(path)
    assert_names_file(exc_info, path, "not an .npz")


def test_npz_of_something_else_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "samples.npz"
    np.savez(path, samples=np.zeros((2, 1, 28, 28), np.float32))
    with pytest.raises(CheckpointError) as exc_info:
        load_checkpoint(path)
    assert_names_file(exc_info, path, "not a tinyddpm checkpoint")


def rewrite(path, **changes):
    with np.load(path, allow_pickle=False) as npz:
        entries = {k: npz[k] for k in npz.files}
    entries.update(changes)
    np.savez(path, **entries)


def test_newer_format_version_is_refused(saved):
    path, _ = saved
    rewrite(path, format_version=np.int64(FORMAT_VERSION + 1))
    with pytest.raises(CheckpointError) as exc_info:
        load_checkpoint(path)
    assert_names_file(exc_info, path, "newer tinyddpm")


def test_pickled_objects_are_refused(saved):
    path, _ = saved
    rewrite(path, extra=np.array([{"run": "code"}], dtype=object))
    with pytest.raises(CheckpointError) as exc_info:
        load_checkpoint(path)
    assert_names_file(exc_info, path, "allow_pickle=False")


def test_invalid_config_is_refused(saved):
    path, _ = saved
    rewrite(path, config=np.array('{"preset": "no-such-preset"}'))
    with pytest.raises(CheckpointError) as exc_info:
        load_checkpoint(path)
    assert_names_file(exc_info, path, "no-such-preset")


def test_weights_of_another_architecture_are_refused(saved):
    path, _ = saved
    other = UNet(**dict(MICRO, ch=16))
    with pytest.raises(CheckpointError) as exc_info:
        load_checkpoint(path).load_into(other)
    assert_names_file(exc_info, path, "does not fit")
