"""The forward process, seen: one MNIST digit drowning in noise, and alpha_bar_t.

DDPM never adds noise step by step during training: eq. 4 of the paper gives
x_t for any t in one line,

    x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps,    eps ~ N(0, I),

with alpha_bar_t = prod_{s <= t} (1 - beta_s). This script applies
`GaussianDiffusion.q_sample` to one real digit at t = 0, 50, 100, 250, 500, 999
(0-based, as in the code: t = 0 is the paper's t = 1, the first and lightest
step) and plots alpha_bar_t for the paper's linear schedule next to the cosine
schedule of Nichol & Dhariwal (2021), which destroys the image more gradually.

    python examples/forward_noising.py            # PNGs in out/
    python examples/forward_noising.py --index 7 --out /tmp/noise

Writes `forward_noising.png` (the strip of x_t) and `alpha_bar.png`. The plot
uses matplotlib when it is installed; otherwise Pillow draws it, and the
table printed below says the same in numbers.
"""
import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # runs from a checkout, installed or not
from tinyddpm.data import MNISTNotFoundError, load_mnist  # noqa: E402
from tinyddpm.diffusion import GaussianDiffusion  # noqa: E402
from tinyddpm.schedule import cosine_betas, linear_betas  # noqa: E402

import _draw  # noqa: E402

TIMESTEPS = (0, 50, 100, 250, 500, 999)


def one_digit(index=0, quick=False):
    """One MNIST test image (28, 28) in [-1, 1], and a word on where it came from.

    Without MNIST on this machine (or with --quick), a ring drawn by hand stands
    in for a zero, so the script still runs.
    """
    if not quick:
        try:
            images, labels = load_mnist("test")
            return images[index, 0], f"MNIST test image {index} (a {labels[index]})"
        except MNISTNotFoundError as err:
            print(f"MNIST is not available ({str(err).splitlines()[0]}); using a drawn 0 instead")
    yy, xx = np.mgrid[:28, :28]
    r = np.hypot((yy - 13.5) / 1.3, xx - 13.5)
    return np.where(np.abs(r - 6.5) < 2.0, 1.0, -1.0).astype(np.float32), "a drawn 0"


def noised(x0, diffusion, timesteps, seed=0):
    """q_sample of the same x0 and the same eps at each t: (len(timesteps), 28, 28)."""
    eps = np.random.default_rng(seed).standard_normal(x0.shape).astype(np.float32)
    batch = np.broadcast_to(x0, (len(timesteps), 1) + x0.shape)           # (n, 1, 28, 28)
    noise = np.broadcast_to(eps, batch.shape)
    return diffusion.q_sample(batch, np.asarray(timesteps), noise)[:, 0]


def alpha_bar_table(schedules, rows=(0, 50, 100, 250, 500, 750, 999)):
    lines = [f"{'t':>5}" + "".join(f"{name:>12}" for name in schedules)]
    for t in rows:
        lines.append(f"{t:5d}" + "".join(f"{np.cumprod(1 - b)[t]:12.5f}" for b in schedules.values()))
    return "\n".join(lines)


def save_pictures(strip, alpha_bars, out):
    """Write forward_noising.png and alpha_bar.png into `out`; return their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    strip_path, plot_path = out / "forward_noising.png", out / "alpha_bar.png"
    _draw.save_png(_draw.image_row(list(strip), [f"t = {t}" for t in TIMESTEPS]), strip_path)

    plt = _draw.pyplot()
    t = np.arange(len(next(iter(alpha_bars.values()))))
    if plt is None:
        print("matplotlib is not installed: alpha_bar.png drawn with Pillow "
              "(pip install -e '.[plot]' for a nicer plot)")
        colors = [(31, 119, 180), (255, 127, 14)]
        series = [(name, ab, c) for (name, ab), c in zip(alpha_bars.items(), colors)]
        _draw.save_png(_draw.line_plot(t, series, "alpha_bar_t, T = 1000", "t", "alpha_bar"), plot_path)
    else:
        print("alpha_bar.png drawn with matplotlib")
        fig, ax = plt.subplots(figsize=(5.2, 3.2))
        for name, ab in alpha_bars.items():
            ax.plot(t, ab, label=name)
        for step in TIMESTEPS[1:]:
            ax.axvline(step, color="0.85", lw=0.8, zorder=0)
        ax.set(xlabel="t (0-based)", ylabel=r"$\bar\alpha_t$", ylim=(0, 1.02), xlim=(0, t[-1]),
               title=r"$\bar\alpha_t$: how much of $x_0$ is left in $x_t$")
        ax.legend()
        fig.tight_layout()
        fig.savefig(plot_path, dpi=100)
        plt.close(fig)
    return strip_path, plot_path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=int, default=0, help="which MNIST test image (default 0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise eps")
    parser.add_argument("--out", default="out", help="folder for the PNGs (default out/)")
    parser.add_argument("--quick", action="store_true", help="skip loading MNIST (a drawn digit instead)")
    args = parser.parse_args(argv)

    schedules = {"linear": linear_betas(1000), "cosine": cosine_betas(1000)}
    x0, source = one_digit(args.index, args.quick)
    diffusion = GaussianDiffusion(schedules["linear"])
    strip = noised(x0, diffusion, TIMESTEPS, args.seed)
    print(f"x_0: {source}; x_t = q_sample(x_0, t, eps) with the linear schedule, one eps for all t")
    for t, x in zip(TIMESTEPS, strip):
        ab = diffusion.alphas_cumprod[t]
        print(f"  t = {t:3d}: sqrt(alpha_bar) = {np.sqrt(ab):.3f} (signal), "
              f"sqrt(1 - alpha_bar) = {np.sqrt(1 - ab):.3f} (noise), std of x_t = {x.std():.2f}")
    print("\nalpha_bar_t = prod(1 - beta_s), s <= t:")
    print(alpha_bar_table(schedules))
    alpha_bars = {name: np.cumprod(1 - b) for name, b in schedules.items()}
    for path in save_pictures(strip, alpha_bars, args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
