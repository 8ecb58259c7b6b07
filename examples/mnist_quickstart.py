"""Train the small MNIST UNet for a few minutes, then look at what it draws.

This is `tinyddpm train` in miniature, through the same code
(`tinyddpm.train.prepare_run` and `tinyddpm.train.train`): the `mnist-tiny`
UNet (1.1M parameters), T = 1000 betas on the cosine schedule, Adam with
warm-up, gradient clipping and an EMA of the weights. At the end the trainer
samples a grid from the EMA weights with a respaced chain of 50 steps
instead of 1000 (Nichol & Dhariwal 2021: the same model, every 20th
timestep).

A few minutes on a CPU is a few hundred steps: expect blobs and strokes that
are starting to look like digits, not clean digits. The real run is
`tinyddpm train` (about half an hour on a 2-core CPU); this script is for
seeing every stage once, quickly.

    python examples/mnist_quickstart.py                  # ~5 minutes of training
    python examples/mnist_quickstart.py --minutes 15
    python examples/mnist_quickstart.py --steps 300 --out /tmp/quick
    python examples/mnist_quickstart.py --quick          # 2 steps, 4 images: the smoke test

The run (checkpoint.npz, metrics.csv, config.json, the grid) goes to
`OUT/mnist-quickstart/`. Sample more from it afterwards with
`tinyddpm sample OUT/mnist-quickstart/checkpoint.npz --n 64 --steps 50 --out grid.png`.
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # runs from a checkout, installed or not
from tinyddpm.config import TrainConfig  # noqa: E402
from tinyddpm.train import Reporter, RunError, build_diffusion, build_model, prepare_run, train  # noqa: E402


def seconds_per_step(batch_size, seed=0):
    """Time two training steps (loss, backward) of mnist-tiny at this batch size, on random data."""
    config = TrainConfig(batch_size=batch_size)
    model, diffusion = build_model(config, seed), build_diffusion(config)
    rng = np.random.default_rng(seed)
    x0 = rng.uniform(-1, 1, (batch_size, 1, 28, 28)).astype(np.float32)
    diffusion.loss(model, x0, rng).backward()                 # the first step warms caches up
    start = time.perf_counter()
    loss = diffusion.loss(model, x0, rng)
    loss.backward()
    return time.perf_counter() - start


def fresh_run_dir(out):
    """OUT/mnist-quickstart, or -2, -3, ... when an earlier run is already there."""
    run = Path(out) / "mnist-quickstart"
    n = 2
    while (run / "checkpoint.npz").exists():
        run = Path(out) / f"mnist-quickstart-{n}"
        n += 1
    return run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.0,
                        help="training time to aim for (default 5; the step count is set from a timing)")
    parser.add_argument("--steps", type=int, default=None, help="train exactly this many steps instead")
    parser.add_argument("--batch-size", type=int, default=64, help="images per step (default 64)")
    parser.add_argument("--sample-steps", type=int, default=50, help="respaced reverse steps (default 50)")
    parser.add_argument("--n", type=int, default=64, help="images in the grid (default 64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="out", help="parent folder of the run (default out/)")
    parser.add_argument("--data-dir", default=None, help="a folder of MNIST IDX files (default: as tinyddpm train)")
    parser.add_argument("--no-cache", action="store_true", help="do not read or write the decoded-MNIST cache")
    parser.add_argument("--quick", action="store_true", help="2 steps, batch 4, 4 images of 5 steps")
    args = parser.parse_args(argv)

    if args.quick:
        steps, batch, sample_steps, n = 2, 4, 5, 4
    else:
        batch, sample_steps, n = args.batch_size, args.sample_steps, args.n
        if args.steps is not None:
            steps = args.steps
        else:
            per_step = seconds_per_step(batch, args.seed)
            steps = max(1, int(args.minutes * 60 / per_step))
            print(f"one step of batch {batch} takes {per_step:.2f} s here: "
                  f"{steps} steps fill about {args.minutes:g} minutes")

    options = dict(
        preset="mnist-tiny", steps=steps, batch_size=batch, seed=args.seed,
        # A short run: warm the learning rate up over its first tenth (at most 500 steps),
        # and let the EMA average over about the last fifth of the run (at most ~1000 steps,
        # decay 0.999): an average with a longer memory than the run would still be mostly
        # the random initialization.
        warmup=min(500, max(1, steps // 10)),
        ema_decay=min(0.999, max(0.0, 1 - 5 / steps)),
        # One grid at the end (sample_every=0), drawn with a respaced chain.
        sample_every=0, sample_n=n, sample_steps=sample_steps,
        log_every=max(1, steps // 20), data_dir=args.data_dir, cache=not args.no_cache)
    run_dir = fresh_run_dir(args.out)
    try:
        plan = prepare_run(options, run_dir)
    except (RunError, ValueError, RuntimeError) as err:      # bad option, no MNIST: one line, no traceback
        print(f"mnist_quickstart: {str(err).splitlines()[0]}", file=sys.stderr)
        return 1
    result = train(plan, Reporter(sys.stdout))
    print(result.message)
    if result.exit_code != 0:
        return result.exit_code
    grid = run_dir / f"samples-{result.step:06d}.png"
    print(f"\nthe grid ({n} samples, {sample_steps} reverse steps, EMA weights): {grid}")
    print(f"more samples: tinyddpm sample {run_dir / 'checkpoint.npz'} --n 64 --steps 50 --out grid.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
