"""Checkpoints: everything a run needs to continue exactly, in one .npz file.

An .npz is a zip of .npy arrays that NumPy reads without pickle, so a
checkpoint can be opened with `allow_pickle=False` and loading a file from
a stranger cannot run code. The entries, all host (NumPy) arrays:

    format_version          int64 scalar; FORMAT_VERSION when written
    step                    int64 scalar; optimizer steps taken so far
    config                  str scalar; the run's TrainConfig as JSON
    rng                     str scalar; the random generators' states as JSON
    model/<name>            the weights, by dotted parameter name ("conv_in.weight")
    ema/<name>              the exponential moving average of the weights
    optimizer/step          int64 scalar; Adam's step count (its bias correction needs it)
    optimizer/<slot>/<name> Adam's moments, slot "m" and "v", per parameter

Writing is atomic: the arrays go to a temporary file in the same directory,
which is flushed and fsynced to disk before `os.replace` renames it over
the old checkpoint in one step (tinyddpm/arrayfile.py). A crash or Ctrl-C
during the write leaves the previous checkpoint intact, and at worst a
`.checkpoint.npz.<pid>@<host>.<random>.tmp` file that no loader mistakes for a
checkpoint and that the next successful save removes once its writer is dead.

Reading trusts nothing the file declares. The headers of all entries come
first, without their data; the configuration is read and validated next, and
it says which network the weights belong to, so every weight entry's dtype
and shape is checked against that network before a byte of weights is read.
Unknown entries are refused unread, so a small file cannot make the loader
inflate gigabytes. Anything wrong with a file (missing, truncated, not an
.npz, an .npz of something else, a newer format, pickled objects, sizes,
dtypes or values that do not fit) raises `CheckpointError` with one line
naming the file and the problem.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from autograd import backend
from tinyddpm.arrayfile import ArrayFile, ArrayFileError, write_atomically
from tinyddpm.config import ConfigError, TrainConfig
from tinyddpm.data import MAX_IDX_ITEMS
from tinyddpm.unet import UNet

FORMAT_VERSION = 1

REQUIRED = ("format_version", "step", "config", "rng")
OPTIMIZER_SLOTS = ("m", "v")

# The longest JSON text read from the `config` and `rng` entries, in
# characters: tinyddpm writes under a thousand; the bound keeps a hostile
# file from making the loader parse megabytes.
MAX_TEXT = 65_536


class CheckpointError(Exception):
    """A checkpoint that cannot be written, read or used; the message names the file."""


@dataclass
class Checkpoint:
    """The contents of a checkpoint file, as host arrays and plain Python values."""

    path: Path
    step: int
    config: TrainConfig
    rng_state: dict
    model: dict                                      # {parameter name: array}
    ema: dict                                        # {parameter name: array}
    optimizer: dict = field(default_factory=dict)    # {"step": int, "m/<name>": array, ...}
    format_version: int = FORMAT_VERSION

    def load_into(self, model, ema=None, optimizer=None, ema_weights=False):
        """Copy the stored weights (and EMA and optimizer state, when given) into live objects.

        `model` is the network the optimizer and EMA were built on; its
        parameter order maps the names stored here to their positions.
        ema_weights=True puts the EMA weights into `model` instead (for sampling).
        """
        names = [name for name, _ in model.named_parameters()]
        try:
            model.load_state_dict(self.ema if ema_weights else self.model)
            if ema is not None:
                ema.load_state_dict({f"shadow.{i}": self.ema[name] for i, name in enumerate(names)})
            if optimizer is not None:
                state = {"step": self.optimizer["step"]}
                for key, value in self.optimizer.items():
                    if key != "step":
                        slot, name = key.split("/", 1)
                        state[f"{slot}.{names.index(name)}"] = value
                optimizer.load_state_dict(state)
        except (KeyError, ValueError) as exc:
            raise CheckpointError(f"{self.path}: does not fit the model of preset "
                                  f"{self.config.preset!r}: {_one_line(exc)}") from None


# =============================================================================
# Writing
# =============================================================================

def save_checkpoint(path, model, ema, optimizer, step, rng_state, config):
    """Write one checkpoint file atomically (see the module docstring for the layout).

    model: an autograd Module; ema: autograd.optim.EMA over the model's
    parameters; optimizer: an autograd.optim optimizer over them; step: int;
    rng_state: a JSON-serializable dict; config: a TrainConfig (or a dict).
    A write that fails (a full disk) raises CheckpointError, which names the
    file and says what is left of the previous checkpoint.
    """
    path = Path(path)
    names = [name for name, _ in model.named_parameters()]
    arrays = {
        "format_version": np.int64(FORMAT_VERSION),
        "step": np.int64(step),
        "config": np.array(json.dumps(config.to_dict() if hasattr(config, "to_dict") else config,
                                      sort_keys=True)),
        "rng": np.array(json.dumps(rng_state, sort_keys=True)),
    }
    for name, value in model.state_dict().items():
        arrays[f"model/{name}"] = backend.to_numpy(value)
    for i, value in enumerate(ema.shadow):
        arrays[f"ema/{names[i]}"] = backend.to_numpy(value)
    for key, value in optimizer.state_dict().items():
        slot, _, index = key.rpartition(".")
        if slot and index.isdigit():                 # "m.3" -> "optimizer/m/<name of parameter 3>"
            arrays[f"optimizer/{slot}/{names[int(index)]}"] = backend.to_numpy(value)
        else:
            arrays[f"optimizer/{key}"] = np.asarray(value)
    try:
        write_atomically(path, lambda f: np.savez(f, **arrays))
    except OSError as exc:
        # A full disk shows as "[Errno 28] No space left on device" and nothing else; say
        # which file, and what the user still has.
        raise CheckpointError(f"{path}: could not save the checkpoint of step {step} "
                              f"({exc.strerror or exc}); {_what_is_left(path)}") from None


def _what_is_left(path):
    """After a failed save: what is at `path`, which the atomic write never touched."""
    if not path.exists():
        return "no checkpoint had been saved there before"
    try:
        with ArrayFile(path) as archive:
            return f"the previous checkpoint there (step {_read_int(path, archive, 'step')}) is intact"
    except (ArrayFileError, CheckpointError):
        return "the file already there is left as it was"


# =============================================================================
# Reading
# =============================================================================

def load_checkpoint(path):
    """Read a checkpoint written by save_checkpoint into a `Checkpoint` (host arrays).

    Raises CheckpointError, naming the file, for anything that is not a
    complete checkpoint this version of tinyddpm can read.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
    try:
        with ArrayFile(path) as archive:
            return _read_checkpoint(path, archive)
    except ArrayFileError as exc:
        raise CheckpointError(f"{path}: not a tinyddpm checkpoint, or a corrupt one "
                              f"(not a readable .npz file: {exc})") from None


def _read_checkpoint(path, archive):
    entries = archive.entries
    missing = [key for key in REQUIRED if key not in entries]
    if missing:
        raise CheckpointError(f"{path}: not a tinyddpm checkpoint (no {', '.join(missing)} entry)")
    version = _read_int(path, archive, "format_version")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: written by a newer tinyddpm (format version {version}; "
                              f"this one reads up to {FORMAT_VERSION})")
    if version < 1:
        raise CheckpointError(f"{path}: unknown format version {version}")
    try:
        # Only the fields that define the run: a resumed run may set the others anew (see validate).
        config = TrainConfig.from_json(_read_text(path, archive, "config")).validate(resumable=False)
    except ConfigError as exc:
        raise CheckpointError(f"{path}: invalid configuration: {_one_line(exc)}") from None
    step = _read_int(path, archive, "step")
    if step < 0:
        raise CheckpointError(f"{path}: entry 'step' is {step}, a negative number of steps")
    try:
        rng_state = json.loads(_read_text(path, archive, "rng"))
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path}: invalid random-generator state: {_one_line(exc)}") from None
    _check_rng_state(path, rng_state, config, step)

    groups = _check_weight_entries(path, entries, config)
    checkpoint = Checkpoint(path=path, step=step, config=config, rng_state=rng_state,
                            model=_read_weights(path, archive, "model/", groups["model"]),
                            ema=_read_weights(path, archive, "ema/", groups["ema"]),
                            format_version=version)
    if groups["optimizer"]:
        optimizer_step = _read_int(path, archive, "optimizer/step")
        if not 0 <= optimizer_step <= step:
            raise CheckpointError(f"{path}: entry 'optimizer/step' is {optimizer_step}, "
                                  f"not a step count between 0 and the checkpoint's {step}")
        checkpoint.optimizer = {"step": optimizer_step}
        for slot in OPTIMIZER_SLOTS:
            moments = _read_weights(path, archive, f"optimizer/{slot}/", groups["optimizer"])
            checkpoint.optimizer.update({f"{slot}/{name}": value for name, value in moments.items()})
        negative = [name for name in groups["optimizer"] if checkpoint.optimizer[f"v/{name}"].min() < 0]
        if negative:
            raise CheckpointError(f"{path}: entry 'optimizer/v/{negative[0]}' holds negative values "
                                  "(Adam's second moments are squares)")
    return checkpoint


@functools.lru_cache(maxsize=None)
def _parameter_shapes(preset_kwargs):
    """{parameter name: shape} of the UNet built from these keyword arguments, in definition order."""
    model = UNet(**dict(preset_kwargs))
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def _check_weight_entries(path, entries, config):
    """Check every entry other than REQUIRED against the config's network, from the headers alone.

    Returns {"model": names, "ema": names, "optimizer": names or []}; the
    optimizer's state is all there or absent.
    """
    shapes = _parameter_shapes(tuple(sorted(config.unet_kwargs().items())))
    expected = {f"{group}/{name}": shape for group in ("model", "ema", "optimizer/m", "optimizer/v")
                for name, shape in shapes.items()}
    unknown = [key for key in entries if key not in expected and key not in REQUIRED
               and key != "optimizer/step"]
    if unknown:
        shown = ", ".join(repr(key) for key in unknown[:3]) + (", ..." if len(unknown) > 3 else "")
        raise CheckpointError(f"{path}: holds {len(unknown)} entries that no {config.preset!r} "
                              f"checkpoint has ({shown}); refused unread")
    for key, shape in expected.items():
        info = entries.get(key)
        if info is not None and (info.dtype != np.float32 or info.shape != shape):
            raise CheckpointError(f"{path}: entry {key!r} is {info.dtype} {info.shape}; the "
                                  f"{config.preset!r} network needs float32 {shape}")
    groups = {}
    for group in ("model", "ema", "optimizer/m", "optimizer/v"):
        absent = [name for name in shapes if f"{group}/{name}" not in entries]
        if absent and not (group.startswith("optimizer") and len(absent) == len(shapes)):
            raise CheckpointError(f"{path}: {len(absent)} {group} entries are missing "
                                  f"(the first: {group}/{absent[0]})")
        groups[group] = [] if absent else list(shapes)
    has_step = "optimizer/step" in entries
    if not (bool(groups["optimizer/m"]) == bool(groups["optimizer/v"]) == has_step):
        raise CheckpointError(f"{path}: the optimizer's state is incomplete (its step, m and v go together)")
    return {"model": groups["model"], "ema": groups["ema"], "optimizer": groups["optimizer/m"]}


def _read_weights(path, archive, prefix, names):
    """{name: float32 array} of the entries prefix + name, each checked to be finite."""
    weights = {}
    for name in names:
        value = archive.read(prefix + name)
        if not np.isfinite(value).all():
            raise CheckpointError(f"{path}: entry {prefix + name!r} holds NaN or infinite values")
        weights[name] = value
    return weights


def _read_int(path, archive, key):
    """The integer scalar entry `key`, checked from its header before it is read."""
    info = archive.entries[key]
    if info.shape != () or info.dtype.kind not in "iu":
        raise CheckpointError(f"{path}: entry {key!r} should be an integer scalar, "
                              f"is {info.dtype} {info.shape}")
    return int(archive.read(key)[()])


def _read_text(path, archive, key):
    """The string scalar entry `key` (JSON text), checked from its header before it is read."""
    info = archive.entries[key]
    if info.shape != () or info.dtype.kind != "U":
        raise CheckpointError(f"{path}: entry {key!r} should be a text scalar, is {info.dtype} {info.shape}")
    if info.dtype.itemsize // 4 > MAX_TEXT:
        raise CheckpointError(f"{path}: entry {key!r} is {info.dtype.itemsize // 4:,} characters long; "
                              f"tinyddpm reads at most {MAX_TEXT:,}")
    try:
        return str(archive.read(key)[()])
    except (ValueError, UnicodeError):     # code points that are not characters
        raise CheckpointError(f"{path}: entry {key!r} is not valid text") from None


def _check_rng_state(path, state, config, step):
    """The generators' states as train.py saves them, checked before anything uses them.

    {"data": {"epoch_start": state, "batches_taken": int}, "noise": state,
    "dropout": state, "processes": int (optional), "note": text (optional)},
    each state that of a NumPy PCG64. A run on the GPU stores None for noise
    and dropout: CuPy's generators cannot be read out. "processes" is how
    many processes each step was split over (train.py notes a change).
    """
    def fail(problem):
        raise CheckpointError(f"{path}: invalid random-generator state: {problem}")

    if not isinstance(state, dict):
        fail("not a JSON object")
    unknown = sorted(set(state) - {"data", "noise", "dropout", "processes", "note"})
    if unknown:
        fail(f"unknown key(s) {', '.join(repr(key[:40]) for key in unknown[:3])}")
    processes = state.get("processes", 1)
    if type(processes) is not int or not 1 <= processes <= 4096:
        fail(f"'processes' must be an integer in 1..4096, got {str(processes)[:50]}")
    data = state.get("data")
    if not isinstance(data, dict) or set(data) != {"epoch_start", "batches_taken"}:
        fail("'data' must hold 'epoch_start' and 'batches_taken'")
    _check_generator_state(fail, "data.epoch_start", data["epoch_start"])
    # Batches taken in the current epoch: never more than the steps taken, nor
    # than an epoch of the largest data set the loader accepts has batches.
    taken, most = data["batches_taken"], min(step, MAX_IDX_ITEMS // config.batch_size)
    if type(taken) is not int or not 0 <= taken <= most:
        fail(f"data.batches_taken must be an integer in 0..{most}, got {str(taken)[:50]}")
    for key in ("noise", "dropout"):
        if config.device == "cuda" and state.get(key) is None:
            continue
        _check_generator_state(fail, key, state.get(key))


def _check_generator_state(fail, what, value):
    try:
        np.random.PCG64().state = value     # the generator's own check of a state
    except (TypeError, ValueError, KeyError, OverflowError) as exc:
        fail(f"{what} is not the state of a PCG64 generator ({_one_line(exc, 100)})")


def _one_line(exc, limit=300):
    """The first line of an exception's message, cut short: a shape mismatch can list every key."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= limit else text[:limit] + " ..."
