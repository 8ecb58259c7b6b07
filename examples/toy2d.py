"""DDPM on a 2-D toy distribution: the whole method in well under a minute on a CPU.

The data are points in the plane drawn from a ring of 8 small Gaussians. The
denoiser eps_theta(x_t, t) is a small MLP that sees the point and a sinusoidal
embedding of t. Everything else is the project's own diffusion code, the same
that trains the MNIST UNet:

- `tinyddpm.schedule.linear_betas` with T = 100 steps instead of 1000, the
  betas scaled up by 1000 / T so that alpha_bar_T is still tiny (x_T is noise);
- `GaussianDiffusion.loss`: Algorithm 1, the eps-prediction loss (eq. 14);
- `GaussianDiffusion.sample`: Algorithm 2, ancestral sampling from x_T ~ N(0, I).

The ring has radius 0.8, inside [-1, 1]: DDPM's data live in [-1, 1] (images
are scaled there) and the sampler clips its predictions and its output to it.

    python examples/toy2d.py                 # 4000 steps, PNGs in out/
    python examples/toy2d.py --steps 8000 --out /tmp/toy
    python examples/toy2d.py --quick         # tiny sizes, a few seconds (the smoke test)

Writes `toy2d_samples.png` (data next to samples), `toy2d_reverse.png` (x_t
at several t of the reverse process, from noise to the ring) and
`toy2d_stats.json` (how many samples landed on a mode).
"""
import argparse
import os
import sys
import time
from pathlib import Path

if __name__ == "__main__":
    # The matrices here are small (1024 x 64): one BLAS thread is as fast as several,
    # and many times faster when other programs share the cores. It must be set before
    # NumPy loads, and only for this script (not for a program that imports it).
    for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # runs from a checkout, installed or not
import autograd.functional as F  # noqa: E402
from autograd import nn, optim  # noqa: E402
from tinyddpm.diffusion import GaussianDiffusion  # noqa: E402
from tinyddpm.schedule import linear_betas  # noqa: E402

import json  # noqa: E402

import _draw  # noqa: E402

# =============================================================================
# The data: 8 Gaussians on a ring
# =============================================================================

N_MODES = 8
RADIUS = 0.8          # ring radius; the data must stay inside [-1, 1]
STD = 0.05            # spread of each Gaussian
MODES = RADIUS * np.stack([np.cos(2 * np.pi * np.arange(N_MODES) / N_MODES),
                           np.sin(2 * np.pi * np.arange(N_MODES) / N_MODES)], axis=1)   # (8, 2)


def make_data(n, rng):
    """n points (n, 2) float32: a random mode each, plus N(0, STD^2 I)."""
    which = rng.integers(0, N_MODES, size=n)
    return (MODES[which] + STD * rng.standard_normal((n, 2))).astype(np.float32)


def mode_stats(samples, radius=4 * STD):
    """How well samples reproduce the modes.

    Returns {"near": fraction of samples within `radius` of their nearest mode,
    "counts": samples near each mode (8,), "modes_hit": modes with at least one}.
    """
    dist = np.linalg.norm(samples[:, None, :] - MODES[None, :, :], axis=2)     # (N, 8)
    nearest, near = dist.argmin(axis=1), dist.min(axis=1) <= radius
    counts = np.bincount(nearest[near], minlength=N_MODES)
    return {"near": float(near.mean()), "counts": counts, "modes_hit": int((counts > 0).sum())}


# =============================================================================
# The denoiser: an MLP of (x_t, embedding of t)
# =============================================================================

class ToyDenoiser(nn.Module):
    """eps_theta(x_t, t) for 2-D points: [x_t, emb(t)] -> hidden layers with SiLU -> 2.

    Called as the UNet is, `model(x, t)` with x a Tensor (B, 2) and t an int
    array (B,), and returns the predicted noise as a Tensor (B, 2).
    """

    def __init__(self, hidden=64, layers=3, emb_dim=32, rng=None):
        self.embed = nn.SinusoidalEmbedding(emb_dim)       # fixed, no parameters
        widths = [2 + emb_dim] + [hidden] * layers
        self.layers = nn.ModuleList(nn.Linear(a, b, rng=rng) for a, b in zip(widths, widths[1:]))
        self.out = nn.Linear(hidden, 2, rng=rng)

    def forward(self, x, t):
        h = F.concat([x, self.embed(t)], axis=1)           # (B, 2 + emb_dim)
        for layer in self.layers:
            h = F.silu(layer(h))                           # (B, hidden)
        return self.out(h)                                 # (B, 2)


def make_diffusion(T=100):
    """The paper's linear schedule on T steps, betas scaled by 1000 / T.

    With the betas 1000 / T times larger, alpha_bar_T = prod(1 - beta_t) stays
    tiny (2e-5 at T = 100; 4e-5 for the paper's T = 1000), so x_T is still noise.

    The reverse variance is the posterior's, beta~_t, not the paper's default
    beta_t. Section 3.2 of the paper gives the reason: beta~_t is the right
    choice when x_0 is (nearly) a single point, beta_t when x_0 is spread like
    N(0, I). Our modes are tight, and with only 100 steps beta_t adds more noise
    at the last steps (sqrt(beta_2) = 0.055) than a mode is wide (0.05).
    """
    scale = 1000 / T
    return GaussianDiffusion(linear_betas(T, 1e-4 * scale, 0.02 * scale), variance="posterior")


# =============================================================================
# Algorithm 1 and Algorithm 2
# =============================================================================

def train(model, diffusion, steps, rng, batch_size=1024, lr=3e-2, log_every=0):
    """Algorithm 1: repeat {x_0 ~ data, t ~ U, eps ~ N(0, I); step on |eps - eps_theta|^2}.

    rng draws the data, t and eps. The learning rate decays linearly to zero
    over the run, which settles the small network more reliably than a
    constant rate. The batch is large because each batch spreads over all T
    timesteps, and the last few (the sharpest part of the task: pulling points
    into modes 0.05 wide) each get only 1/T of it. Returns the losses.
    """
    opt = optim.Adam(model.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        opt.lr = lr * (1 - step / steps)
        loss = diffusion.loss(model, make_data(batch_size, rng), rng)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.item()))
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1:5d}  loss {np.mean(losses[-log_every:]):.4f}")
    return losses


def sample(model, diffusion, n, rng, snapshots=()):
    """Algorithm 2 from x_T ~ N(0, I): n points (n, 2) float32.

    snapshots: paper-numbered t (T is pure noise, 0 the final samples) at
    which to keep x_t; when given, returns (samples, [(t, x_t), ...]).
    """
    model.eval()
    if not snapshots:
        return diffusion.sample(model, (n, 2), rng)
    # Keep every step (T is small), then pick the requested ones.
    samples, trajectory = diffusion.sample(model, (n, 2), rng, return_trajectory=diffusion.T)
    kept = dict(trajectory)
    return samples, [(t, kept[t]) for t in snapshots]


# =============================================================================
# Pictures
# =============================================================================

def save_pictures(data, samples, trajectory, out):
    """Write toy2d_samples.png and toy2d_reverse.png into `out`; return their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = out / "toy2d_samples.png", out / "toy2d_reverse.png"
    plt = _draw.pyplot()
    if plt is None:
        print("matplotlib is not installed: drawing with Pillow (pip install -e '.[plot]' for nicer plots)")
        _draw.save_png(_draw.scatter_panels(
            [("data", data, (40, 90, 200)), ("samples", samples, (220, 90, 30))], lim=1.1), paths[0])
        _draw.save_png(_draw.scatter_panels(
            [(f"t = {t}", x, (60, 60, 60)) for t, x in trajectory], lim=2.5, size=150), paths[1])
        return paths

    fig, axes = plt.subplots(1, 2, figsize=(6.4, 3.3))
    for ax, (title, pts, color) in zip(axes, [("data", data, "tab:blue"), ("DDPM samples", samples, "tab:orange")]):
        ax.scatter(pts[:, 0], pts[:, 1], s=2, c=color, alpha=0.5, linewidths=0)
        ax.set(title=title, xlim=(-1.1, 1.1), ylim=(-1.1, 1.1), aspect="equal", xticks=[], yticks=[])
    fig.tight_layout()
    fig.savefig(paths[0], dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(trajectory), figsize=(1.6 * len(trajectory), 1.9))
    for ax, (t, x) in zip(axes, trajectory):
        ax.scatter(x[:, 0], x[:, 1], s=1, c="0.2", alpha=0.4, linewidths=0)
        ax.set(title=f"t = {t}", xlim=(-2.5, 2.5), ylim=(-2.5, 2.5), aspect="equal", xticks=[], yticks=[])
    fig.suptitle("reverse process: x_T ~ N(0, I) to x_0", fontsize=9)
    fig.tight_layout()
    fig.savefig(paths[1], dpi=90)
    plt.close(fig)
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4000, help="training steps (default 4000)")
    parser.add_argument("--hidden", type=int, default=64, help="width of the MLP's hidden layers (default 64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="out", help="folder for the PNGs (default out/)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a smoke test")
    args = parser.parse_args(argv)

    hidden, n_samples, steps, batch = (16, 256, 20, 128) if args.quick else (args.hidden, 2000, args.steps, 1024)
    rng = np.random.default_rng(args.seed)
    model = ToyDenoiser(hidden=hidden, rng=np.random.default_rng([args.seed, 1]))
    diffusion = make_diffusion()
    print(f"ToyDenoiser: {model.num_parameters():,} parameters; T = {diffusion.T}, "
          f"alpha_bar_T = {diffusion.alphas_cumprod[-1]:.1e}")

    start = time.perf_counter()
    losses = train(model, diffusion, steps, rng, batch_size=batch, log_every=max(steps // 10, 1))
    train_seconds = time.perf_counter() - start
    print(f"trained {steps} steps in {train_seconds:.1f} s")

    T = diffusion.T
    snapshots = (T, T * 3 // 10, T * 15 // 100, T * 8 // 100, T * 4 // 100, T * 2 // 100, 0)
    samples, trajectory = sample(model, diffusion, n_samples, rng, snapshots)
    stats = mode_stats(samples)
    print(f"{stats['near']:.1%} of {n_samples} samples lie within {4 * STD:.2f} of a mode; "
          f"modes hit: {stats['modes_hit']} of {N_MODES} (samples per mode: {stats['counts'].tolist()})")
    out = Path(args.out)
    for path in save_pictures(make_data(n_samples, rng), samples, trajectory, out):
        print(f"wrote {path}")
    summary = dict(steps=steps, hidden=hidden, seed=args.seed, train_seconds=round(train_seconds, 2),
                   final_loss=float(np.mean(losses[-100:])), near=stats["near"], radius=4 * STD,
                   modes_hit=stats["modes_hit"], counts=stats["counts"].tolist())
    (out / "toy2d_stats.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {out / 'toy2d_stats.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
