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
the old checkpoint in one step. A crash or Ctrl-C during the write leaves
the previous checkpoint intact (and at worst a `.checkpoint.npz.*.tmp`
file that no loader mistakes for a checkpoint).

Anything wrong with a file to load (missing, truncated, not an .npz, an
.npz of something else, a newer format, pickled objects) raises
`CheckpointError` with one line naming the file and the problem.
"""
from __future__ import annotations

import json
import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from autograd import backend
from tinyddpm.config import ConfigError, TrainConfig

FORMAT_VERSION = 1

REQUIRED = ("format_version", "step", "config", "rng")


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
    _write_atomically(path, arrays)


def _write_atomically(path, arrays):
    path.parent.mkdir(parents=True, exist_ok=True)
    # The temporary file must be on the same file system as `path` for the
    # rename to be atomic, hence the same directory. Its name does not end
    # in .npz, so nothing takes a half-written file for a checkpoint.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # Also on KeyboardInterrupt: the old checkpoint is untouched; drop the partial one.
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory):
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
    entries = _read_npz(path)

    missing = [key for key in REQUIRED if key not in entries]
    if missing:
        raise CheckpointError(f"{path}: not a tinyddpm checkpoint (no {', '.join(missing)} entry)")
    version = _scalar(path, entries, "format_version", int)
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: written by a newer tinyddpm (format version {version}; "
                              f"this one reads up to {FORMAT_VERSION})")
    try:
        config = TrainConfig.from_json(_scalar(path, entries, "config", str)).validate()
    except ConfigError as exc:
        raise CheckpointError(f"{path}: invalid configuration: {exc}") from None
    try:
        rng_state = json.loads(_scalar(path, entries, "rng", str))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: invalid random-generator state: {exc}") from None

    def group(prefix):
        return {key[len(prefix):]: value for key, value in entries.items() if key.startswith(prefix)}

    checkpoint = Checkpoint(path=path, step=_scalar(path, entries, "step", int), config=config,
                            rng_state=rng_state, model=group("model/"), ema=group("ema/"),
                            optimizer=group("optimizer/"), format_version=version)
    if not checkpoint.model:
        raise CheckpointError(f"{path}: holds no model weights")
    if set(checkpoint.ema) != set(checkpoint.model):
        raise CheckpointError(f"{path}: EMA weights do not match the model weights")
    if "step" in checkpoint.optimizer:
        checkpoint.optimizer["step"] = int(checkpoint.optimizer["step"])
    return checkpoint


def _read_npz(path):
    """Every entry of the .npz as a NumPy array, read now, so a damaged file fails here."""
    try:
        npz = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable .npz file (truncated or foreign?): "
                              f"{_one_line(exc)}") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise CheckpointError(f"{path}: not a tinyddpm checkpoint (an .npy array, not an .npz archive)")
    entries = {}
    with npz:
        for name in npz.files:
            try:
                entries[name] = npz[name]
            except ValueError as exc:
                if "allow_pickle" in str(exc):
                    raise CheckpointError(f"{path}: entry {name!r} holds pickled Python objects, "
                                          "which are refused (allow_pickle=False)") from None
                raise CheckpointError(f"{path}: entry {name!r} is damaged: {_one_line(exc)}") from None
            except (zipfile.BadZipFile, EOFError, OSError) as exc:
                raise CheckpointError(f"{path}: entry {name!r} is damaged (truncated file?): "
                                      f"{_one_line(exc)}") from None
    return entries


def _scalar(path, entries, key, kind):
    value = entries[key]
    if value.shape != ():
        raise CheckpointError(f"{path}: entry {key!r} should be a scalar, has shape {value.shape}")
    try:
        return kind(value[()])
    except (TypeError, ValueError):
        raise CheckpointError(f"{path}: entry {key!r} is not a {kind.__name__}") from None


def _one_line(exc, limit=300):
    """The first line of an exception's message, cut short: a shape mismatch can list every key."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= limit else text[:limit] + " ..."
