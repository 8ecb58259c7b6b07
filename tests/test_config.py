"""TrainConfig.validate: every value that cannot work is refused before any work, in one line."""
import json
import math

import numpy as np
import pytest

from autograd import Tensor
from tinyddpm.config import MAX_SAMPLE_N, MAX_T, ConfigError, TrainConfig
from tinyddpm.diffusion import GaussianDiffusion
from tinyddpm.schedule import linear_betas


def refused(field, words="", **values):
    with pytest.raises(ConfigError) as exc_info:
        TrainConfig(**values).validate()
    assert exc_info.value.field == field and words in exc_info.value.message, str(exc_info.value)
    assert "\n" not in str(exc_info.value)


def test_the_defaults_and_the_device_defaults_are_valid():
    TrainConfig().validate()
    TrainConfig.for_device("cuda").validate()


@pytest.mark.parametrize("field", ["lr", "grad_clip", "ema_decay", "beta_start", "beta_end"])
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, "0.1", None, True])
def test_every_float_must_be_a_finite_number(field, value):
    refused(field, "must be a finite number", **{field: value})


@pytest.mark.parametrize("field, value, words", [
    ("log_every", 0, "must be >= 1, got 0"),
    ("sample_n", MAX_SAMPLE_N + 1, f"must be at most {MAX_SAMPLE_N:,}"),
    ("sample_n", 100_000_000, "got 100,000,000"),
    ("T", MAX_T + 1, f"must be at most {MAX_T:,}"),
    ("T", 10**9, "must be at most"),
    ("steps", 2.5, "must be an integer"),
    ("seed", -1, "must be >= 0"),
    ("image_size", 4096, "must be 28"),
    ("image_size", 28.0, "must be 28"),
    ("preset", ["mnist"], "must be a string"),
    ("schedule", {"linear": 1}, "must be a string"),
    ("cache", "yes", "true or false"),
    ("data_dir", 3, "folder name"),
])
def test_out_of_range_and_mistyped_values_are_refused(field, value, words):
    refused(field, words, **{field: value})


def test_a_chain_too_long_for_the_samplers_float32_is_refused_naming_the_limit():
    """The limit is where 1 / alpha_bar_T leaves float32's range, recomputed here from the betas."""
    largest = float(np.finfo(np.float32).max)
    usable = [T for T in (8000, 8768, 8769, 8770, 9000) if np.prod(1 - linear_betas(T)) >= 1 / largest]
    assert usable == [8000, 8768, 8769]
    TrainConfig(T=8769, schedule="linear").validate()
    for T in (8770, 17_700, 75_000):
        refused("T", "at most T = 8769 for these betas", T=T, schedule="linear")
    # A smaller beta_end allows a longer chain, and the cosine schedule any T up to MAX_T.
    TrainConfig(T=20_000, schedule="linear", beta_end=0.005).validate()
    TrainConfig(T=MAX_T, schedule="cosine").validate()


class HalfOfX:
    """A stand-in for the network: eps_theta(x, t) = x / 2, in the dtype it is given."""

    def __call__(self, x, t):
        return Tensor(0.5 * x.data)


def test_past_the_limit_float32_sampling_really_breaks():
    """Why the limit exists: at T = 17,700 the paper's betas make every float32 sample NaN."""
    with np.errstate(all="ignore"):
        for T, finite in ((8769, True), (17_700, False)):
            x = GaussianDiffusion(linear_betas(T)).sample(HalfOfX(), (4, 1, 2, 2), np.random.default_rng(0))
            assert bool(np.isfinite(x).all()) is finite, T


def test_too_few_preview_steps_for_a_long_chain_are_refused():
    # One respaced step would jump from alpha_bar = 1 to 6e-36: a beta of 1 in float64.
    refused("sample_steps", "respaced steps", T=8000, schedule="linear", sample_steps=1)
    TrainConfig(T=8000, schedule="linear", sample_steps=100).validate()


def test_fields_a_resume_may_change_are_left_to_the_resumed_run():
    config = TrainConfig(log_every=0, sample_n=10**8, steps=0)
    assert config.validate(resumable=False) is config
    with pytest.raises(ConfigError, match="steps"):
        config.validate()


@pytest.mark.parametrize("text, words", [
    ("[" * 30_000 + "]" * 30_000, "not valid JSON"),
    ('{"seed": 1' + "0" * 5000 + "}", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"lr": 1, "learning_rate": 2}', "unknown configuration key(s): learning_rate"),
])
def test_bad_json_is_one_config_error(text, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        TrainConfig.from_json(text)


def test_json_round_trip():
    config = TrainConfig(T=500, lr=3e-4, schedule="cosine")
    assert TrainConfig.from_json(config.to_json()) == config
    assert json.loads(config.to_json())["T"] == 500
