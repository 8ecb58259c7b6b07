"""Before/after of one kernel module, inside one process: the training (or sampling) step
with a module's functions taken from an older commit, alternating round by round with
the working tree's.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/ab_step.py \\
        --commit b510d79~1 --module autograd/kernels/conv.py --names conv2d_backward \\
        [--preset mnist-tiny] [--step train] [--rounds 15] [--threads 2]

Why in one process: on a shared machine two benchmark runs minutes apart can
differ by more than the change being measured (PyTorch's own mnist-tiny step
ranged 0.50-0.94 s on one afternoon). Here both versions run on the same model,
the same arrays and the same thread pool, the order alternating every round,
so a slow spell falls on both. The older module is read with `git show` and
loaded as a sibling of the current one (its relative imports then resolve to
today's package); before each round the named functions of the current module
are pointed at the old or the new ones, as are the names other modules
imported them under (`from ..parallel import parallel_for`). So only what
those functions do differs.

Prints one JSON line and a readable line: each version's median, their ratio,
and the median and quartiles of the per-round ratios new/old.
"""
import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common import ab_arguments, emit_json, machine_header, quartiles, set_threads  # noqa: E402


def load_old_module(commit, path):
    """The module at `path` as it was at `commit`, loaded beside today's."""
    try:
        source = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=ROOT, check=True,
                                capture_output=True, text=True).stdout
    except subprocess.CalledProcessError as exc:
        sys.exit(f"--commit/--module: git show {commit}:{path} failed: {exc.stderr.strip()}")
    package = os.path.dirname(path).replace("/", ".")
    name = f"{package}._ab_old_{os.path.basename(path)[:-3]}"
    spec = importlib.util.spec_from_loader(name, loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = package
    module.__file__ = f"<{commit}:{path}>"
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    return module


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--commit", required=True, help="the 'old' commit, e.g. HEAD~1")
    p.add_argument("--module", required=True, help="file of the module to switch, e.g. autograd/kernels/conv.py")
    p.add_argument("--names", required=True, nargs="+", help="functions of that module to switch")
    ab_arguments(p)
    a = p.parse_args()
    set_threads(a.threads)

    from bench_step import tinyddpm_steps   # after set_threads: it builds the model
    current = importlib.import_module(a.module[:-3].replace("/", "."))
    old = load_old_module(a.commit, a.module)
    if a.module == "autograd/parallel.py":
        old.set_num_threads(a.threads)     # its own pool and thread count, as set_threads gave today's
    missing = [n for n in a.names if not hasattr(current, n) or not hasattr(old, n)]
    if missing:
        sys.exit(f"--names: {', '.join(missing)} not in both versions of {a.module}")
    versions = {"old": {n: getattr(old, n) for n in a.names},
                "new": {n: getattr(current, n) for n in a.names}}

    train, sample, _, _ = tinyddpm_steps(a.preset, a.batch, "cpu")
    step = train if a.step == "train" else sample

    # Modules that imported a switched function by name (`from ..parallel import
    # parallel_for`) hold their own reference to it: those are switched too.
    holders = [(m, n) for m in list(sys.modules.values()) for n in a.names
               if m is not current and getattr(m, n, None) is versions["new"][n]]

    def use(version):
        for n, fn in versions[version].items():
            setattr(current, n, fn)
        for m, n in holders:
            setattr(m, n, versions[version][n])

    times = {"old": [], "new": []}
    try:
        for version in times:                 # warm-up, untimed
            use(version)
            step()
        for r in range(a.rounds):
            for version in (("old", "new") if r % 2 == 0 else ("new", "old")):
                use(version)
                time.sleep(0.05)
                t0 = time.perf_counter()
                step()
                times[version].append(time.perf_counter() - t0)
    finally:
        use("new")

    ratios = [n / o for n, o in zip(times["new"], times["old"])]
    q1, med, q3 = quartiles(ratios)
    old_s, new_s = statistics.median(times["old"]), statistics.median(times["new"])
    emit_json({"bench": "ab_step", "machine": machine_header(), "commit": a.commit, "module": a.module,
               "names": a.names, "preset": a.preset, "batch": a.batch, "step": a.step,
               "threads": a.threads, "rounds": a.rounds, "old_s": old_s, "new_s": new_s,
               "ratio": new_s / old_s, "round_ratio_median": med, "round_ratio_q1": q1,
               "round_ratio_q3": q3})
    print(f"{a.preset} {a.step} step, batch {a.batch}, {a.threads} threads, {a.rounds} rounds: "
          f"old ({a.commit}) {old_s:.3f} s, new {new_s:.3f} s, new/old {new_s / old_s:.3f}; "
          f"per-round new/old median {med:.3f} (quartiles {q1:.3f}-{q3:.3f})")


if __name__ == "__main__":
    main()
