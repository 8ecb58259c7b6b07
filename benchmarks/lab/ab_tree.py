"""Before/after of the whole code: an older commit's `autograd` and `tinyddpm` against the
working tree's, both loaded in one process, their steps alternating round by round.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/lab/ab_tree.py \\
        --commit 7da4138 [--preset mnist-tiny] [--step train] [--rounds 15] [--threads 2]

A maintainer's tool: it compares everything that changed between two
commits, one process's steps (no split over processes). Why in one process:
two runs of the same benchmark minutes apart can differ by more than the
change, while two versions alternating in one process see the same spells
of the machine.

How: `git worktree add` puts the older commit in a temporary folder (removed
at the end); its packages are imported first (its benchmarks/bench_step.py
builds its model and steps), then taken out of `sys.modules` under their
names, so the working tree's import afresh beside them. Each version's
modules keep their own references, so each step runs only its own code,
with its own kernel thread pool. Both pools get `--threads`; the BLAS is
held as set_threads holds it.

Prints one JSON line and a readable line: each version's median, their
ratio, and the median and quartiles of the per-round ratios after/before.
"""
import argparse
import importlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from common import ab_arguments, emit_json, machine_header, quartiles  # noqa: E402
PACKAGES = ("autograd", "tinyddpm", "bench_step", "common")


def load_steps(root, preset, batch, step, threads):
    """The `step` function (train or sample) of the code under `root`, with its pool at `threads`."""
    for name in [n for n in sys.modules if n.split(".")[0] in PACKAGES]:
        del sys.modules[name]            # the other version's modules live on in their references
    saved = list(sys.path)
    sys.path[:0] = [root, os.path.join(root, "benchmarks")]
    try:
        common = importlib.import_module("common")
        bench_step = importlib.import_module("bench_step")
        if not (hasattr(common, "set_threads") and hasattr(bench_step, "tinyddpm_steps")):
            sys.exit(f"ab_tree: {root} predates benchmarks/common.set_threads and "
                     "bench_step.tinyddpm_steps; pick a newer --commit")
        common.set_threads(threads)
        train, sample, _, _ = bench_step.tinyddpm_steps(preset, batch, "cpu")
    finally:
        sys.path[:] = saved              # bench_step put its own folder first too
    for name in PACKAGES:
        where = os.path.realpath(sys.modules[name].__file__)
        if not where.startswith(os.path.realpath(root) + os.sep):
            sys.exit(f"ab_tree: {name} was imported from {where}, not from {root}")
    return train if step == "train" else sample


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--commit", required=True, help="the older commit (anything `git worktree add` takes)")
    ab_arguments(p)
    a = p.parse_args()

    folder = before = None
    try:
        folder = tempfile.mkdtemp(prefix="ab_tree_")
        before = os.path.join(folder, "before")
        try:
            subprocess.run(["git", "worktree", "add", "--detach", "-q", before, a.commit], cwd=ROOT,
                           check=True, capture_output=True, text=True)
        except subprocess.CalledProcessError as exc:
            sys.exit(f"--commit: git worktree add {a.commit} failed: {exc.stderr.strip()}")
        if not os.path.exists(os.path.join(before, "benchmarks", "bench_step.py")):
            sys.exit(f"--commit {a.commit}: it has no benchmarks/bench_step.py to build its steps")
        steps = {"before": load_steps(before, a.preset, a.batch, a.step, a.threads),
                 "after": load_steps(ROOT, a.preset, a.batch, a.step, a.threads)}

        times = {name: [] for name in steps}
        for fn in steps.values():             # warm-up, untimed
            fn()
            fn()
        for r in range(a.rounds):
            for name in (("before", "after") if r % 2 == 0 else ("after", "before")):
                time.sleep(0.05)
                t0 = time.perf_counter()
                steps[name]()
                times[name].append(time.perf_counter() - t0)
    finally:
        if before and os.path.exists(before):
            done = subprocess.run(["git", "worktree", "remove", "--force", before], cwd=ROOT,
                                  capture_output=True, text=True)
            if done.returncode:
                print(f"ab_tree: could not remove the worktree {before} ({done.stderr.strip()}); "
                      "`git worktree prune` cleans up after it", file=sys.stderr)
        if folder:
            shutil.rmtree(folder, ignore_errors=True)

    ratios = [n / o for n, o in zip(times["after"], times["before"])]
    q1, med, q3 = quartiles(ratios)
    old_s, new_s = statistics.median(times["before"]), statistics.median(times["after"])
    emit_json({"bench": "ab_tree", "machine": machine_header(), "commit": a.commit, "preset": a.preset,
               "batch": a.batch, "step": a.step, "threads": a.threads, "rounds": a.rounds,
               "before_s": old_s, "after_s": new_s, "ratio": new_s / old_s,
               "round_ratio_median": med, "round_ratio_q1": q1, "round_ratio_q3": q3})
    print(f"{a.preset} {a.step} step, batch {a.batch}, {a.threads} threads, {a.rounds} rounds: "
          f"before ({a.commit}) {old_s:.3f} s, after {new_s:.3f} s, after/before {new_s / old_s:.3f}; "
          f"per-round after/before median {med:.3f} (quartiles {q1:.3f}-{q3:.3f})")


if __name__ == "__main__":
    main()
