"""Sampling digits from a checkpoint: Algorithm 2 of Ho et al. 2020, or DDIM.

    x_T ~ N(0, I);  for t = T..1:  x_{t-1} = mu_theta(x_t, t) + sigma_t z

The network comes from a checkpoint written by `tinyddpm train`: its
configuration says which UNet and which noise schedule, and by default the
EMA weights are used, as in the paper (they give visibly cleaner digits
than the raw weights of the last step). `steps=K` runs a respaced chain of
K steps instead of all T (Nichol & Dhariwal 2021); `sampler="ddim"` runs
DDIM (Song et al. 2021), deterministic for eta = 0.

The network is called through `nn.batch_parallel(model)`: the model
itself, unless autograd's fast layer splits each call's batch over
processes on a CPU with several cores (the images are then those of one
process to float32 rounding).

    from tinyddpm.sample import sample_checkpoint
    images = sample_checkpoint("runs/x/checkpoint.npz", n=64, steps=100)   # (64, 1, 28, 28) in [-1, 1]
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from autograd import backend, nn
from tinyddpm.checkpoint import load_checkpoint
from tinyddpm.guidance import NULL_LABEL, NUM_DIGITS, Guided, balanced_labels
from tinyddpm.train import build_diffusion, build_model

SAMPLERS = ("ancestral", "ddim")
DEFAULT_BATCH_SIZE = 256       # bounds the activations' memory when thousands of samples are asked for
DDIM_DEFAULT_STEPS = 50        # DDIM's point is few steps; 50 is where its samples settle (Song et al., Table 1)
TRAJECTORY_SAMPLES = 8         # rows of a trajectory picture
TRAJECTORY_SNAPSHOTS = {"strip": 10, "gif": 50}


class SampleError(ValueError):
    """Sampling arguments that cannot work with this checkpoint (e.g. more steps than T)."""


@dataclass
class Sampled:
    images: np.ndarray             # (N, 1, 28, 28) float32 in [-1, 1], on the host
    trajectory: list | None        # [(t, x_t (k, 1, 28, 28) host array)], x_T first, when asked for
    step: int                      # the training step of the checkpoint
    steps: int                     # reverse steps taken per sample
    labels: np.ndarray | None = None   # (N,) the digit asked for each sample, when one was
    frames: dict | None = None     # every reverse step of the first batch, for a viewer (see `Frames`)


class Frames:
    """A model wrapper that keeps, at every call of a sampler, x_t and the prediction made.

    After the chain, `frames(diffusion, chain, sampler, eta, final)` turns them into what
    tinyddpm/viewer.py shows: for each reverse step x_t, the predicted x_0 (eq. 15,
    clipped to [-1, 1] as the sampler clips it), the paper's t and sigma_t, with the
    final samples as the last frame (t = 0).
    """

    def __init__(self, model):
        self.model, self.xt, self.eps, self.t = model, [], [], []

    def __call__(self, x, t):
        eps = self.model(x, t)
        self.xt.append(backend.to_numpy(x.data)[:, 0].astype(np.float32))
        self.eps.append(backend.to_numpy(eps.data)[:, 0].astype(np.float32))
        self.t.append(int(backend.to_numpy(t)[0]))              # the original chain's 0-based t
        return eps

    def frames(self, diffusion, chain, sampler, eta, final):
        xt, eps = np.stack(self.xt), np.stack(self.eps)                          # (S, N, H, W)
        x0 = np.stack([diffusion.predict_x0_from_eps(x, np.full(len(x), t), e).clip(-1, 1)
                       for x, t, e in zip(xt, self.t, eps)])                     # eq. 15, step by step
        abar = diffusion.alphas_cumprod[self.t]
        if sampler == "ancestral":      # sigma_t of each respaced step; z = 0 at the last one
            sigma = np.sqrt(chain.model_variance[::-1]) * (np.arange(chain.T)[::-1] > 0)
        else:
            sigma = eta * np.sqrt(chain.posterior_variance[::-1])
        final = backend.to_numpy(final)[:, 0].astype(np.float32)
        return {"xt": np.concatenate([xt, final[None]]), "x0": np.concatenate([x0, final[None]]),
                "t": np.array([t + 1 for t in self.t] + [0]), "sigma": np.append(sigma, 0.0),
                "alpha_bar": np.append(abar, 1.0)}


def load_model(checkpoint_path, use_ema=True, device="cpu", variance=None):
    """The network of a checkpoint, in evaluation mode on `device`, and its diffusion.

    variance: sigma_t^2 of the reverse steps, "beta" or "posterior"; by default
    the one the checkpoint's configuration names.
    Returns (model, diffusion, checkpoint). Raises CheckpointError for a bad file.
    """
    checkpoint = load_checkpoint(checkpoint_path)
    model = build_model(checkpoint.config)
    checkpoint.load_into(model, ema_weights=use_ema)
    config = checkpoint.config if variance is None else dataclasses.replace(checkpoint.config, variance=variance)
    return model.to(device).eval(), build_diffusion(config), checkpoint


def sample_checkpoint(checkpoint_path, n, steps=None, sampler="ancestral", eta=0.0, seed=0,
                      batch_size=None, use_ema=True, device="cpu", progress=None, trajectory=None,
                      variance=None, label=None, guidance=0.0, frames=False):
    """Draw n samples from a checkpoint; returns a `Sampled`.

    steps: reverse steps (respaced); default all T for ancestral, 50 for DDIM.
    batch_size: samples per network call (default DEFAULT_BATCH_SIZE); the
        samples of a seed depend on it, since each batch draws in turn.
    progress: None, or a callable called once per reverse step of each batch.
    trajectory: None, "strip" or "gif": also keep x_t of the first few samples
        at evenly spaced times (10 for a strip, 50 for a GIF).
    variance: the ancestral steps' sigma_t^2, "beta" or "posterior" (default:
        the checkpoint's).
    label: for a class-conditional checkpoint, the digit to draw (0..9), or
        "all" for the ten digits as evenly as n allows, sorted; None draws
        from the unconditional model (the null label). guidance: w of
        classifier-free guidance (tinyddpm/guidance.py), with a label.
    frames: also keep every reverse step of the first batch (x_t, predicted
        x_0, t, alpha_bar_t, sigma_t), for tinyddpm/viewer.py.
    The result depends only on the checkpoint, the arguments and `seed` (and,
    to float32 rounding, on how many processes share each network call: see
    the module doc).
    """
    if sampler not in SAMPLERS:
        raise SampleError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if n < 1:
        raise SampleError(f"n must be >= 1, got {n}")
    if variance not in (None, "beta", "posterior"):
        raise SampleError(f"unknown variance {variance!r}; choose beta or posterior")
    labels = _labels(label, n)
    if not (isinstance(guidance, (int, float)) and math.isfinite(guidance) and guidance >= 0):
        raise SampleError(f"guidance must be a finite number >= 0, got {guidance}")
    model, diffusion, checkpoint = load_model(checkpoint_path, use_ema, device, variance)
    if labels is not None and not checkpoint.config.class_cond:
        raise SampleError(f"{checkpoint_path} holds an unconditional model: it cannot be asked for "
                          "a label (train one with tinyddpm train --class-cond)")
    if checkpoint.config.class_cond and labels is None:
        labels = np.full(n, NULL_LABEL)          # no label asked for: the unconditional model
    if steps is None:
        steps = diffusion.T if sampler == "ancestral" else min(DDIM_DEFAULT_STEPS, diffusion.T)
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= diffusion.T:
        raise SampleError(f"steps must be an integer between 1 and T = {diffusion.T}, got {steps!r}")
    try:
        diffusion.respace(steps)
    except ValueError as exc:          # a long chain cut to very few steps: a beta reaches 1
        raise SampleError(f"{steps} respaced steps of this chain do not work ({exc}); take more") from None
    batch_size = min(n, DEFAULT_BATCH_SIZE) if batch_size is None else batch_size
    if batch_size < 1:
        raise SampleError(f"batch size must be >= 1, got {batch_size}")

    rng = backend.default_rng(seed, device)
    size = checkpoint.config.image_size
    chunks, kept, kept_frames = [], None, None
    with nn.batch_parallel(model) as net:
        for start in range(0, n, batch_size):
            shape = (min(batch_size, n - start), 1, size, size)
            eps_model = net
            if labels is not None:
                eps_model = Guided(net, backend.to_device(labels[start:start + shape[0]], device),
                                   guidance if label is not None else 0.0)
            snapshots = TRAJECTORY_SNAPSHOTS[trajectory] if trajectory and start == 0 else False
            recorder = Frames(eps_model) if frames and start == 0 else None
            if recorder is not None:
                eps_model = recorder
            if sampler == "ancestral":
                out = diffusion.sample(eps_model, shape, rng, steps=steps, progress=progress,
                                       return_trajectory=snapshots)
            else:
                out = diffusion.ddim_sample(eps_model, shape, rng, steps=steps, eta=eta, progress=progress,
                                            return_trajectory=snapshots)
            if snapshots:
                out, path = out
                kept = [(t, backend.to_numpy(x[:TRAJECTORY_SAMPLES])) for t, x in path]
            if recorder is not None:
                kept_frames = recorder.frames(diffusion, diffusion.respace(steps), sampler, eta, out)
            chunks.append(backend.to_numpy(out).astype(np.float32))
    asked = None if label is None else labels
    return Sampled(np.concatenate(chunks), kept, checkpoint.step, steps, asked, kept_frames)


def _labels(label, n):
    """The label of each of n samples (int array), or None for no label."""
    if label is None:
        return None
    if label == "all":
        return balanced_labels(n)
    if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or not 0 <= label < NUM_DIGITS:
        raise SampleError(f"label must be a digit 0..9 or 'all', got {label!r}")
    return np.full(n, int(label))
