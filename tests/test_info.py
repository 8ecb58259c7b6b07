"""Tests for tinyddpm.info: the facts `tinyddpm info` reports about a checkpoint,
as a dict that JSON takes and as text, and the refusals it shares with the
checkpoint loader (one-line CheckpointError naming the file)."""
import dataclasses
import json

import numpy as np
import pytest

from autograd.optim import EMA, Adam
from tinyddpm.checkpoint import FORMAT_VERSION, CheckpointError, save_checkpoint
from tinyddpm.config import TrainConfig
from tinyddpm.info import checkpoint_info, format_info
from tinyddpm import unet
from tinyddpm.unet import UNet
from test_checkpoint import RNG_STATE

MICRO = dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0, num_groups=4)
CONFIG = TrainConfig(preset="micro", steps=500, batch_size=16, ema_decay=0.99, ema_schedule="fixed",
                     schedule="linear", variance="beta", seed=7)


@pytest.fixture(autouse=True)
def micro_preset(monkeypatch):
    monkeypatch.setitem(unet.PRESETS, "micro", MICRO)


@pytest.fixture
def saved(tmp_path):
    """A checkpoint of a small UNet after 3 Adam steps, written at training step 3."""
    model = UNet(**CONFIG.unet_kwargs(), rng=np.random.default_rng(0))
    params = model.parameters()
    optimizer, ema = Adam(params, lr=1e-2), EMA(params, decay=0.9)
    for _ in range(3):
        for p in params:
            p.grad = np.ones(p.shape, np.float32)
        optimizer.step()
        ema.update()
    path = tmp_path / "checkpoint.npz"
    rng_state = dict(RNG_STATE, data=dict(RNG_STATE["data"], batches_taken=3))     # 3 steps, 3 batches
    save_checkpoint(path, model, ema, optimizer, 3, rng_state, CONFIG)
    return path, sum(p.data.size for p in params)


def test_info_reports_what_the_checkpoint_holds(saved):
    path, parameters = saved
    info = checkpoint_info(path)
    assert info["path"] == str(path) and info["file_bytes"] == path.stat().st_size
    assert info["format_version"] == FORMAT_VERSION
    assert info["preset"] == CONFIG.preset
    assert info["parameters"] == parameters
    assert info["dtype"] == "float32"
    assert info["step"] == 3
    assert info["ema"] is True and info["optimizer"] is True and info["optimizer_step"] == 3
    assert info["class_cond"] is False                   # configs without the field are unconditional
    assert info["config"] == CONFIG.to_dict()
    assert json.loads(json.dumps(info)) == info          # what --json prints reads back the same


def test_text_names_each_fact_and_every_config_field(saved):
    path, parameters = saved
    text = format_info(checkpoint_info(path))
    assert f"{parameters:,} parameters" in text and CONFIG.preset in text
    assert "3 steps of 500 asked for" in text
    assert "raw and EMA (decay 0.99)" in text
    assert "Adam moments at step 3" in text
    assert "conditional  no" in text
    assert "T = 1000, linear betas 0.0001..0.02, sigma_t^2 = beta_t" in text
    config_lines = text.split("\nconfig\n")[1].splitlines()
    assert [line.split()[0] for line in config_lines] == sorted(CONFIG.to_dict())
    assert "  data_dir" in text and "null" in text       # JSON's spelling, as a config file has it


def test_a_checkpoint_without_optimizer_state_says_so(saved):
    path, _ = saved
    with np.load(path, allow_pickle=False) as npz:
        kept = {k: npz[k] for k in npz.files if not k.startswith("optimizer/")}
    np.savez(path, **kept)
    info = checkpoint_info(path)
    assert info["optimizer"] is False and info["optimizer_step"] is None
    assert "none (weights only)" in format_info(info)


def test_the_bare_jobs_recipe_is_named_as_it_is(tmp_path):
    config = dataclasses.replace(CONFIG, ema_decay=0.999, ema_schedule="warmup", variance="posterior")
    model = UNet(**config.unet_kwargs(), rng=np.random.default_rng(0))
    params = model.parameters()
    rng_state = dict(RNG_STATE, data=dict(RNG_STATE["data"], batches_taken=0))
    path = tmp_path / "recipe.npz"
    save_checkpoint(path, model, EMA(params), Adam(params, lr=1e-3), 0, rng_state, config)
    text = format_info(checkpoint_info(path))
    assert "raw and EMA (decay min(0.999, (1 + t) / (10 + t)))" in text
    assert "sigma_t^2 = the posterior variance (beta tilde_t, eq. 7)" in text


def test_a_conditional_checkpoint_is_reported_as_one(tmp_path):
    config = dataclasses.replace(CONFIG, class_cond=True, p_uncond=0.2)
    model = UNet(**config.unet_kwargs(), rng=np.random.default_rng(0))
    params = model.parameters()
    rng_state = dict(RNG_STATE, data=dict(RNG_STATE["data"], batches_taken=0))
    path = tmp_path / "conditional.npz"
    save_checkpoint(path, model, EMA(params), Adam(params, lr=1e-3), 0, rng_state, config)
    info = checkpoint_info(path)
    assert info["class_cond"] is True and info["parameters"] == model.num_parameters()
    assert "conditional  yes, on the digit label (dropped with p = 0.2" in format_info(info)


# =============================================================================
# Refusals: what the checkpoint loader refuses, in one line naming the file
# =============================================================================

def refused(path, words):
    with pytest.raises(CheckpointError) as exc_info:
        checkpoint_info(path)
    message = str(exc_info.value)
    assert str(path) in message and words in message and "\n" not in message


def test_missing_file_is_refused(tmp_path):
    refused(tmp_path / "nope.npz", "no such file")


def test_directory_is_refused(tmp_path):
    refused(tmp_path, "is a directory")


def test_garbage_file_is_refused(tmp_path):
    path = tmp_path / "garbage.npz"
    path.write_bytes(np.random.default_rng(0).bytes(1000))
    refused(path, "not a readable .npz")


def test_truncated_checkpoint_is_refused(saved):
    path, _ = saved
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    refused(path, str(path))


def test_npz_that_is_not_a_checkpoint_is_refused(tmp_path):
    path = tmp_path / "samples.npz"
    np.savez(path, samples=np.zeros((2, 1, 28, 28), np.float32))
    refused(path, "not a tinyddpm checkpoint")
