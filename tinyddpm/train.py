"""Training a DDPM on MNIST: Algorithm 1 of Ho et al. 2020, with the paper's recipe.

    repeat: x_0 ~ data, t ~ U{1..T}, eps ~ N(0, I)
            take a gradient step on || eps - eps_theta(sqrt(a_bar_t) x_0 + sqrt(1 - a_bar_t) eps, t) ||^2

around which a real run needs: Adam with a linear learning-rate warm-up,
global gradient-norm clipping, an exponential moving average (EMA) of the
weights that the samples come from, checkpoints, metrics and preview grids.
A run directory holds

    config.json          the TrainConfig of the run
    checkpoint.npz       the latest checkpoint (see tinyddpm/checkpoint.py)
    metrics.csv          step, loss, lr, grad_norm, images_per_s, elapsed_s
    samples-NNNNNN.png   grids sampled from the EMA weights along the way

Reproducibility. Every random draw comes from a generator seeded by
`config.seed`, one per purpose so that none disturbs another: the weights'
initialization, the order of the data, the t and eps of the loss, the
dropout masks (the engine's global generator, `autograd.manual_seed`), and
the previews (seeded afresh from the step, so previews never shift
training). On the CPU a checkpoint stores the exact state of each, and N
steps in one go or N/2 + `--resume` N/2 give bit-identical checkpoints.
On the GPU the noise and dropout generators are CuPy's, whose state cannot
be read out (cuRAND keeps it in device memory), so a resumed CUDA run
reseeds them from (seed, step): the data order is still restored exactly
and the continuation is reproducible, but not identical to an
uninterrupted run.

Cores. The loop calls the model through `nn.batch_parallel(model)`, which
is the model itself unless autograd's fast layer splits each batch over
processes on a CPU with several cores (autograd/fast/processes.py). Split,
the result depends on the number of processes in its rounding and, with
dropout, in its masks (each process draws its own, seeded from the engine's
global generator, whose state a checkpoint stores): resuming with as many
processes gives the same bit-identical checkpoints as above
(TINYDDPM_PROCESSES sets the number).

Stopping. A non-finite loss or gradient stops the run at once without
saving (the last good checkpoint stays). Ctrl-C or SIGTERM finish the
current step, save a checkpoint and return; a second Ctrl-C stops at once.
"""
from __future__ import annotations

import csv
import dataclasses
import math
import os
import shlex
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import autograd
from autograd import backend, nn
from autograd.optim import EMA, Adam, clip_grad_norm
from tinyddpm import schedule
from tinyddpm.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from tinyddpm.config import ConfigError, TrainConfig
from tinyddpm.data import load_mnist
from tinyddpm.guidance import Guided, balanced_labels, drop_labels
from tinyddpm.diffusion import GaussianDiffusion
from tinyddpm.images import save_grid
from tinyddpm.progress import duration
from tinyddpm.unet import UNet

CHECKPOINT = "checkpoint.npz"
CONFIG = "config.json"
METRICS = "metrics.csv"
METRICS_FIELDS = ("step", "loss", "lr", "grad_norm", "images_per_s", "elapsed_s")

# A class-conditional run's previews: the plain conditional model (no guidance).
PREVIEW_GUIDANCE = 0.0

# One independent random stream per purpose, all derived from the run's seed.
INIT_STREAM, DATA_STREAM, NOISE_STREAM, PREVIEW_STREAM, DROPOUT_STREAM = range(5)


class RunError(Exception):
    """A run that cannot start or continue as asked; the message is for the user."""


# =============================================================================
# Pieces shared with sampling
# =============================================================================

def build_model(config, seed=0):
    """The UNet of `config.preset` (class-conditional with config.class_cond), initialized
    from `seed`, on the host."""
    return UNet(**config.unet_kwargs(), rng=np.random.default_rng([seed, INIT_STREAM]))


def build_diffusion(config):
    """The forward process and samplers for the config's schedule."""
    if config.schedule == "linear":
        betas = schedule.linear_betas(config.T, config.beta_start, config.beta_end)
    else:
        betas = schedule.cosine_betas(config.T)
    return GaussianDiffusion(betas, variance=config.variance)


def learning_rate(config, step):
    """The learning rate of step `step` (1-based: the step about to be taken).

    A linear warm-up from lr / warmup to lr over the first `warmup` steps, as
    DDPM's: Adam's first updates, based on barely-estimated moments, are
    otherwise too large. Then, with lr_schedule "constant", lr to the end, as
    the paper; with "cosine" or "linear", lr decays to zero at the last step,
    along half a cosine or a straight line (a short run then ends on small
    steps, which averages out the noise of the last gradients). The end is
    `steps`: a run extended with --resume --steps decays to its new end.
    """
    if config.warmup and step <= config.warmup:
        return config.lr * step / config.warmup
    if config.lr_schedule == "constant":
        return config.lr
    done = (step - config.warmup) / max(1, config.steps - config.warmup)     # 0 after warm-up, 1 at the end
    done = min(1.0, max(0.0, done))
    if config.lr_schedule == "cosine":
        return config.lr * 0.5 * (1 + math.cos(math.pi * done))
    return config.lr * (1 - done)


def ema_decay(config, step):
    """The EMA's decay at step `step` (1-based).

    "fixed": ema_decay throughout, as the paper. "warmup": min(ema_decay,
    (1 + step) / (10 + step)), which averages over roughly the steps taken so
    far early in the run (0.18 at step 1, 0.9 at step 80) instead of
    remembering the random initialization for ~1 / (1 - decay) steps.
    """
    if config.ema_schedule == "fixed":
        return config.ema_decay
    return min(config.ema_decay, (1 + step) / (10 + step))


def loss_weighting(config):
    """The keyword arguments of GaussianDiffusion.loss for the config's loss weighting."""
    return {"min_snr_gamma": config.min_snr_gamma} if config.loss_weight == "min-snr" else {}


# =============================================================================
# Checking a run before any work starts
# =============================================================================

@dataclass
class Plan:
    """A run that has passed every check: what to train, where, from what."""

    config: TrainConfig
    out_dir: Path
    images: np.ndarray                  # the training set, (N, 1, 28, 28) in [-1, 1]
    labels: np.ndarray                  # its digits, (N,) int
    checkpoint: Checkpoint | None       # what --resume continues from

    @property
    def start_step(self):
        return 0 if self.checkpoint is None else self.checkpoint.step


def prepare_run(options, out_dir, resume=False):
    """Check everything that can be checked, then load the data; no file is written.

    options: {TrainConfig field: value} for the options the user gave. A new
    run starts from the device's defaults; a resumed run from the
    checkpoint's configuration, and may change only RESUMABLE_CHANGES.
    Raises RunError, ConfigError, CheckpointError or the data module's
    errors, each with a message for the user.
    """
    out_dir = Path(out_dir)
    checkpoint_path = out_dir / CHECKPOINT
    checkpoint = None
    if resume:
        if not checkpoint_path.is_file():
            raise RunError(f"--resume: no checkpoint at {checkpoint_path} (start the run without --resume)")
        checkpoint = load_checkpoint(checkpoint_path)
        stored = checkpoint.config
        config = dataclasses.replace(stored, **options)
        for name in config.conflicts_with(stored):
            raise RunError(f"--resume: {checkpoint_path} was trained with {name}={getattr(stored, name)!r}, "
                           f"not {getattr(config, name)!r}; drop that option to continue the run, "
                           "or start a new one in another --out")
    else:
        if checkpoint_path.exists():
            raise RunError(f"{out_dir} already holds a run ({CHECKPOINT}); add --resume to continue it, "
                           "or choose another --out")
        config = TrainConfig.for_device(**options)
    try:
        config.validate()
    except ConfigError as exc:
        if resume and exc.field not in options:
            raise ConfigError(exc.field, f"{exc.message} (the checkpoint's value; pass "
                                         f"--{exc.field.replace('_', '-')} to continue with another)") from None
        raise
    if checkpoint is not None and config.steps < checkpoint.step:
        raise RunError(f"--steps {config.steps} is below the {checkpoint.step} steps the checkpoint has "
                       "already taken; ask for more steps to extend the run")
    if config.device == "cuda":
        reason = backend.cuda_unavailable_reason()
        if reason is not None:
            raise RunError(f"--device cuda: {reason}")
    images, labels = load_mnist("train", data_dir=config.data_dir, cache=config.cache)
    if config.batch_size > len(images):
        raise RunError(f"--batch-size {config.batch_size} is larger than the {len(images)} training images")
    return Plan(config, out_dir, images, labels, checkpoint)


# =============================================================================
# Random streams
# =============================================================================

class BatchStream:
    """Training batches (images, labels) in a seeded random order, resumable.

    Each epoch is a permutation drawn from `rng`, cut into batches of
    `batch_size` (the last partial batch dropped), as
    tinyddpm.data.iterate_batches does. A checkpoint stores the generator's
    state at the start of the current epoch and how many batches of the
    epoch were handed out; from these two, `seek` draws the same permutation
    again and goes on from the next batch.
    """

    def __init__(self, images, labels, batch_size, rng):
        self.images, self.labels, self.batch_size, self.rng = images, labels, batch_size, rng
        self.per_epoch = len(images) // batch_size
        self.seek({"epoch_start": rng.bit_generator.state, "batches_taken": 0})

    def state(self):
        return {"epoch_start": self.epoch_start, "batches_taken": self.taken}

    def seek(self, state):
        taken = state.get("batches_taken") if isinstance(state, dict) else None
        if isinstance(taken, bool) or not isinstance(taken, int) or not 0 <= taken <= self.per_epoch:
            raise RunError(f"the data order's state is damaged: {taken!r} batches taken of an epoch "
                           f"of {self.per_epoch}")
        try:
            self.rng.bit_generator.state = state["epoch_start"]
        except (KeyError, TypeError, ValueError) as exc:
            raise RunError(f"the data order's state is damaged ({exc})") from None
        self.epoch_start, self.taken = state["epoch_start"], taken
        self.order = self.rng.permutation(len(self.images))

    def next(self):
        if self.taken == self.per_epoch:
            self.epoch_start, self.taken = self.rng.bit_generator.state, 0
            self.order = self.rng.permutation(len(self.images))
        batch = self.order[self.taken * self.batch_size:(self.taken + 1) * self.batch_size]
        self.taken += 1
        return self.images[batch], self.labels[batch]


def _derived_seed(seed, stream, step):
    """One integer seed for (seed, stream, step), for generators that take a single int."""
    return int(np.random.SeedSequence([seed, stream, step]).generate_state(1)[0])


def _noise_and_dropout_rngs(config, rng_state, step):
    """The generator of the loss's t and eps, with the dropout generator set up alongside.

    Returns the noise generator; the dropout masks come from the engine's
    global generator of the device (autograd.manual_seed).
    """
    device, seed = config.device, config.seed
    if device == "cpu":
        autograd.manual_seed(seed)
        noise_rng = backend.default_rng([seed, NOISE_STREAM], device)
        if rng_state is not None:
            noise_rng.bit_generator.state = rng_state["noise"]
            backend.global_rng(device).bit_generator.state = rng_state["dropout"]
        return noise_rng
    # CuPy generators cannot be saved (see the module docstring): derive them
    # from the step instead, which makes a resumed run reproducible.
    autograd.manual_seed(_derived_seed(seed, DROPOUT_STREAM, step))
    return backend.default_rng([seed, NOISE_STREAM, step], device)


def _rng_state(batches, noise_rng, device, processes=1):
    """The random state a checkpoint stores, with the number of processes each step was split
    over: the rounding of a run (and its dropout masks) depend on it."""
    if device == "cpu":
        return {"data": batches.state(), "noise": noise_rng.bit_generator.state,
                "dropout": backend.global_rng(device).bit_generator.state, "processes": processes}
    return {"data": batches.state(), "noise": None, "dropout": None, "processes": processes,
            "note": "CuPy generators cannot be saved; a resumed run reseeds them from (seed, step)"}


def _processes_note(stored_rng, processes):
    """A line for a run resumed on another number of processes than it was trained on, else None."""
    before = (stored_rng or {}).get("processes")
    if before is None or before == processes:
        return None
    return (f"note: the checkpoint was trained with each step split over {before} process(es), this run "
            f"over {processes}; the continuation matches an uninterrupted run only to float32 rounding "
            "(TINYDDPM_PROCESSES sets the number)")


# =============================================================================
# Stopping on request
# =============================================================================

class StopRequest:
    """Turns the first SIGINT (Ctrl-C) or SIGTERM into a request to stop after the current step.

    A second Ctrl-C raises KeyboardInterrupt at once, for a user who does not
    want to wait. Signal handlers can only be set from the main thread;
    elsewhere this does nothing and the signals keep their usual effect.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        self.signum = signum
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __bool__(self):
        return self.signum is not None


class _PreviewAborted(Exception):
    pass


# =============================================================================
# Progress: a bar on a terminal, plain lines in a log file
# =============================================================================

class Reporter:
    """Where a run's progress goes. stream=None: nowhere (library use, tests)."""

    def __init__(self, stream=None, bar=None):
        self.stream = stream
        self.use_bar = bar if bar is not None else bool(stream is not None and stream.isatty())
        self._bar = None

    def begin(self, start, total):
        self.total = total
        if self.use_bar:
            from tqdm import tqdm
            self._bar = tqdm(total=total, initial=start, unit="step", file=self.stream, dynamic_ncols=True)

    def step(self, loss, images_per_s):
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{images_per_s:.1f}", refresh=False)
            self._bar.update(1)

    def row(self, row, eta_s):
        if self._bar is None:
            self.note(f"step {row['step']}/{self.total}  loss {row['loss']:.4f}  lr {row['lr']:.2e}  "
                      f"grad {row['grad_norm']:.3f}  {row['images_per_s']:.1f} img/s  "
                      f"elapsed {duration(row['elapsed_s'])}  eta {duration(eta_s)}")

    def note(self, text):
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        elif self.stream is not None:
            self.stream.write(text + "\n")
            self.stream.flush()

    def end(self):
        if self._bar is not None:
            self._bar.close()
            self._bar = None




# =============================================================================
# The metrics file
# =============================================================================

def _open_metrics(path, keep_until):
    """Open metrics.csv for appending rows; returns (file, writer, elapsed seconds so far).

    On resume, rows past the checkpoint's step (written by the part of the
    run that was lost) are dropped, so every step appears once.
    """
    kept = []
    if keep_until is not None and path.exists():
        with open(path, newline="") as f:
            kept = [r for r in csv.DictReader(f) if r.get("step", "").isdigit() and int(r["step"]) <= keep_until]
    f = open(path, "w", newline="")
    writer = csv.DictWriter(f, fieldnames=METRICS_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(kept)
    f.flush()
    elapsed = float(kept[-1]["elapsed_s"]) if kept else 0.0
    return f, writer, elapsed


# =============================================================================
# The loop
# =============================================================================

@dataclass
class TrainResult:
    status: str          # "finished", "interrupted", "diverged" or "failed"
    step: int            # the last step taken (and saved, unless diverged)
    message: str         # one line for the user
    exit_code: int


def train(plan, reporter=None):
    """Run (or continue) the training loop of `plan` (see prepare_run); returns a TrainResult."""
    config, out = plan.config, plan.out_dir
    reporter = reporter if reporter is not None else Reporter()
    device, start = config.device, plan.start_step

    model = build_model(config, config.seed).to(device)
    model.train()
    params = model.parameters()
    optimizer = Adam(params, lr=config.lr)
    ema = EMA(params, decay=config.ema_decay)
    diffusion = build_diffusion(config)
    batches = BatchStream(plan.images, plan.labels, config.batch_size,
                          np.random.default_rng([config.seed, DATA_STREAM]))
    stored_rng = None
    if plan.checkpoint is not None:
        plan.checkpoint.load_into(model, ema, optimizer)
        stored_rng = plan.checkpoint.rng_state
        batches.seek(stored_rng["data"])
    noise_rng = _noise_and_dropout_rngs(config, stored_rng if device == "cpu" else None, start)
    if start == config.steps:
        return TrainResult("finished", start, f"{out / CHECKPOINT} is already at step {start}; "
                                              "nothing to do (pass a larger --steps to train further)", 0)
    with RunLock(out):
        if plan.checkpoint is None and (out / CHECKPOINT).exists():
            raise RunError(f"{out} already holds a run ({CHECKPOINT}), started while this one was "
                           "starting; add --resume to continue it, or choose another --out")
        (out / CONFIG).write_text(config.to_json() + "\n")
        return _train_loop(plan, reporter, model, params, optimizer, ema, diffusion, batches, noise_rng,
                           stored_rng)


def _train_loop(plan, reporter, model, params, optimizer, ema, diffusion, batches, noise_rng, stored_rng):
    config, out, device, start = plan.config, plan.out_dir, plan.config.device, plan.start_step
    saved = {"step": start if plan.checkpoint is not None else None}

    def save(step, rng_state):
        # A step that left a weight infinite or NaN (a learning rate far too large) is not
        # saved over the last good checkpoint: it would only resume into the same state.
        named = list(model.named_parameters()) + [(f"{name} (EMA)", p) for (name, _), p in
                                                  zip(model.named_parameters(), _ema_tensors(ema))]
        bad = next((name for name, p in named if not bool(p.xp.isfinite(p.data).all())), None)
        if bad is not None:
            return _diverged(f"weight {bad}", "not finite", step, out, saved["step"], after=True)
        try:
            save_checkpoint(out / CHECKPOINT, model, ema, optimizer, step, rng_state, config)
        except (CheckpointError, OSError) as exc:
            # The message names the file and the step that is still intact, if any.
            resume = f"; resume with: {resume_command(out)}" if saved["step"] is not None else ""
            return TrainResult("failed", step, f"stopped: {exc}{resume}", 1)
        saved["step"] = step
        return None

    metrics_file, metrics, elapsed = _open_metrics(out / METRICS, keep_until=start if plan.checkpoint else None)
    preview = _Previewer(config, model, ema, diffusion, out, reporter)
    interval = {"loss": 0.0, "grad_norm": 0.0, "steps": 0, "seconds": 0.0}
    step = start
    reporter.note(f"{'resuming' if start else 'training'} {config.preset} ({model.num_parameters():,} "
                  f"parameters) on {device}: steps {start + 1}..{config.steps} at batch {config.batch_size}, "
                  f"writing to {out}")
    reporter.begin(start, config.steps)
    finished = None
    try:
        with StopRequest() as stop, nn.batch_parallel(model) as net:
            processes = getattr(net, "processes", 1)
            note = _processes_note(stored_rng, processes)
            if note:
                reporter.note(note)
            # The random state that goes with the weights of `step`, should a later step fail.
            finished = _rng_state(batches, noise_rng, device, processes)
            while step < config.steps:
                began = time.perf_counter()
                # Algorithm 1: x_0 from the data; the loss draws t and eps and returns
                # || eps - eps_theta(sqrt(a_bar_t) x_0 + sqrt(1 - a_bar_t) eps, t) ||^2.
                images, digits = batches.next()
                x0 = backend.to_device(images, device)                  # the one transfer of the step
                labels = None
                if config.class_cond:       # with probability p_uncond, "no label": the null label
                    labels = drop_labels(backend.to_device(digits, device), config.p_uncond, noise_rng)
                optimizer.lr = learning_rate(config, step + 1)
                optimizer.zero_grad()
                loss = diffusion.loss(net, x0, noise_rng, labels=labels, **loss_weighting(config))
                loss.backward()
                # Reading the loss on the host waits for the GPU. Read only once the backward is
                # queued, so the device never idles while Python queues it; a NaN has then made
                # NaN gradients, and nothing is updated before the checks below. The total norm
                # (clip_grad_norm leaves it on the device), read right after, is the step's only
                # other host sync: both are checked before the optimizer touches a weight.
                loss_value = float(loss.data)
                if not math.isfinite(loss_value):
                    return _diverged("loss", loss_value, step + 1, out, saved["step"])
                grad_norm = float(clip_grad_norm(params, config.grad_clip))
                if not math.isfinite(grad_norm):
                    return _diverged("gradient norm", grad_norm, step + 1, out, saved["step"])
                optimizer.step()
                ema.decay = ema_decay(config, step + 1)
                ema.update()
                step += 1
                finished = _rng_state(batches, noise_rng, device, processes)

                seconds = time.perf_counter() - began
                elapsed += seconds
                for key, value in (("loss", loss_value), ("grad_norm", grad_norm), ("steps", 1),
                                   ("seconds", seconds)):
                    interval[key] += value
                reporter.step(loss_value, config.batch_size / seconds)
                if step % config.log_every == 0 or step == config.steps:
                    row = _metrics_row(step, optimizer.lr, elapsed, interval, config.batch_size)
                    metrics.writerow(row)
                    metrics_file.flush()
                    reporter.row(row, eta_s=(config.steps - step) * interval["seconds"] / interval["steps"])
                    interval = dict.fromkeys(interval, 0.0)

                if stop or step == config.steps or (config.save_every and step % config.save_every == 0):
                    failed = save(step, finished)
                    if failed:
                        return failed
                if stop:
                    return _interrupted(stop.signum, step, out)
                if config.sample_every and step % config.sample_every == 0 and step != config.steps:
                    preview(step, stop)
                    if stop:            # Ctrl-C during the preview: save this step, train no more
                        return save(step, finished) or _interrupted(stop.signum, step, out)
            preview(step, stop)
    except nn.BatchParallelError as exc:
        if finished is None:        # refused before any step (TINYDDPM_PROCESSES=abc): one line
            raise
        # A worker process failed or died. Nothing of the step it was in was applied, so
        # the weights and `finished` are the last finished step, whole: save them.
        failed = save(step, finished) if saved["step"] != step else None
        return failed or _worker_lost(exc, step, out)
    finally:
        reporter.end()
        metrics_file.close()
    if stop:
        return TrainResult("interrupted", step, f"{signal.Signals(stop.signum).name}: all {step} steps are done "
                                                f"and saved in {out / CHECKPOINT}; the final preview was skipped",
                           128 + stop.signum)
    return TrainResult("finished", step, f"done: {step} steps; checkpoint {out / CHECKPOINT}, "
                                         f"samples {preview.last_path}", 0)


def _metrics_row(step, lr, elapsed, interval, batch_size):
    n = interval["steps"]
    return {"step": step, "loss": interval["loss"] / n, "lr": lr, "grad_norm": interval["grad_norm"] / n,
            "images_per_s": batch_size * n / interval["seconds"], "elapsed_s": elapsed}


def _diverged(what, value, step, out, saved_step, after=False):
    kept = ("no checkpoint was written" if saved_step is None
            else f"the last checkpoint ({out / CHECKPOINT}, step {saved_step}) is kept")
    when = "after" if after else "at"
    return TrainResult("diverged", step - 1, f"stopped: the {what} is {value} {when} step {step}; nothing saved, "
                                             f"{kept}. Try a lower --lr or --grad-clip", 1)


def _ema_tensors(ema):
    """The EMA's averaged weights as Tensors, for the checks that take named parameters."""
    return [autograd.Tensor(s) for s in ema.shadow]


def _worker_lost(exc, step, out):
    return TrainResult("failed", step, f"stopped: {exc}; step {step}, the last finished, is saved in "
                                       f"{out / CHECKPOINT}; resume with: {resume_command(out)}", 1)


class RunLock:
    """Holds a run directory for one run at a time: `.lock` in it names the holder's PID.

    A second run on the same directory is refused in one line naming the holder;
    a lock left by a process that no longer runs (killed) is taken over.
    """

    NAME = ".lock"

    def __init__(self, out):
        self.path = Path(out) / self.NAME
        self.held = False

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and _alive(holder):
                    raise RunError(f"{self.path.parent} is in use by another run (process {holder}); "
                                   "wait for it to end, or choose another --out") from None
                self.path.unlink(missing_ok=True)          # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()}\n")
            self.held = True
            return self
        raise RunError(f"{self.path.parent}: could not take the run's lock {self.path}")

    def __exit__(self, *exc):
        if self.held and self._holder() == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False
        return False

    def _holder(self):
        try:
            text = self.path.read_text().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:        # someone else's process: alive
        return True
    return True


def resume_command(out):
    """The command that continues the run in `out` (its configuration comes from the checkpoint)."""
    return f"tinyddpm train --resume --out {shlex.quote(str(out))}"


def _interrupted(signum, step, out):
    name = signal.Signals(signum).name
    return TrainResult("interrupted", step, f"{name}: stopped after step {step}, checkpoint saved to "
                                            f"{out / CHECKPOINT}; resume with: {resume_command(out)}",
                       128 + signum)


class _Previewer:
    """Sample a grid from the EMA weights, in a second UNet so training's weights stay put."""

    def __init__(self, config, model, ema, diffusion, out, reporter):
        self.config, self.ema, self.diffusion, self.out, self.reporter = config, ema, diffusion, out, reporter
        self.model = None
        self.last_path = None

    def __call__(self, step, stop):
        config = self.config
        if self.model is None:
            self.model = build_model(config).to(config.device).eval()
        self.ema.copy_to(self.model)
        rng = backend.default_rng([config.seed, PREVIEW_STREAM, step], config.device)

        def check_stop():
            # Previews take a while on a CPU; a Ctrl-C should not wait for them.
            if stop:
                raise _PreviewAborted

        shape = (config.sample_n, 1, config.image_size, config.image_size)
        try:
            with nn.batch_parallel(self.model) as net:
                if config.class_cond:        # the digits in order, one row after another
                    labels = backend.to_device(balanced_labels(config.sample_n), config.device)
                    net = Guided(net, labels, PREVIEW_GUIDANCE)
                x = self.diffusion.sample(net, shape, rng, steps=config.sample_steps, progress=check_stop)
        except _PreviewAborted:
            self.reporter.note(f"preview at step {step} skipped (stop requested)")
            return
        path = self.out / f"samples-{step:06d}.png"
        save_grid(backend.to_numpy(x), path)
        self.last_path = path
        self.reporter.note(f"step {step}: wrote {path}")
