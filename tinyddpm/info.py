"""What a checkpoint holds, for `tinyddpm info CKPT [--json]`.

The file is read by tinyddpm.checkpoint.load_checkpoint, so `info` accepts
exactly the files that `sample` and `train --resume` accept, and refuses
the others with the same one-line CheckpointError naming the file.

    from tinyddpm.info import checkpoint_info, format_info
    info = checkpoint_info("runs/x/checkpoint.npz")      # a dict that json.dumps takes as is
    print(format_info(info))
"""
from __future__ import annotations

import json
from pathlib import Path

from tinyddpm.checkpoint import load_checkpoint

VARIANCE_NAMES = {
    "beta": "sigma_t^2 = beta_t",
    "posterior": "sigma_t^2 = the posterior variance (beta tilde_t, eq. 7)",
}


def checkpoint_info(path):
    """The facts about a checkpoint, as a dict of JSON values.

    Keys: path, file_bytes, format_version, preset, parameters (the number
    of weights), dtype (of the weights), step (optimizer steps taken), ema
    and optimizer (whether EMA weights and optimizer state are stored),
    optimizer_step, class_cond (False for configs older than conditional
    training), config (the run's configuration, as in its config.json).
    Raises CheckpointError for anything load_checkpoint refuses.
    """
    path = Path(path)
    checkpoint = load_checkpoint(path)
    config = checkpoint.config.to_dict()
    weights = list(checkpoint.model.values())
    return {
        "path": str(path),
        "file_bytes": path.stat().st_size,
        "format_version": checkpoint.format_version,
        "preset": checkpoint.config.preset,
        "parameters": int(sum(w.size for w in weights)),
        "dtype": str(weights[0].dtype),
        "step": checkpoint.step,
        "ema": bool(checkpoint.ema),
        "optimizer": any(key != "step" for key in checkpoint.optimizer),
        "optimizer_step": checkpoint.optimizer.get("step"),
        "class_cond": bool(config.get("class_cond", False)),
        "config": config,
    }


def _ema_decay(config):
    # Configurations written before ema_schedule existed had a fixed decay.
    if config.get("ema_schedule", "fixed") == "warmup":
        return f"min({config['ema_decay']}, (1 + t) / (10 + t))"
    return f"{config['ema_decay']}"


def format_info(info):
    """The dict of checkpoint_info as a few aligned lines of text, the configuration last."""
    config = info["config"]
    conditional = "no"
    if info["class_cond"]:
        conditional = "yes, on the digit label"
        if "p_uncond" in config:
            conditional += f" (dropped with p = {config['p_uncond']}, for guidance)"
    rows = [
        ("checkpoint", f"{info['path']} ({info['file_bytes'] / 1e6:.1f} MB, "
                       f"format version {info['format_version']})"),
        ("model", f"UNet preset {info['preset']}, {info['parameters']:,} parameters, {info['dtype']}"),
        ("trained", f"{info['step']:,} steps of {config['steps']:,} asked for"),
        ("weights", f"raw and EMA (decay {_ema_decay(config)})" if info["ema"] else "raw only"),
        ("optimizer", f"Adam moments at step {info['optimizer_step']}" if info["optimizer"]
                      else "none (weights only)"),
        ("conditional", conditional),
        ("diffusion", f"T = {config['T']}, {config['schedule']} betas "
                      f"{config['beta_start']:g}..{config['beta_end']:g}, "
                      f"{VARIANCE_NAMES.get(config['variance'], config['variance'])}"),
    ]
    width = max(len(label) for label, _ in rows) + 2
    lines = [f"{label:<{width}}{value}" for label, value in rows]
    # The configuration in JSON's spelling (null, true, "linear"): what a config file would hold.
    key_width = max(len(key) for key in config) + 2
    lines.append("config")
    lines += [f"  {key:<{key_width}}{json.dumps(value)}" for key, value in sorted(config.items())]
    return "\n".join(lines)
