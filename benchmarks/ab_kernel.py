"""Before/after of one kernel module, kernel by kernel: an older commit's convolution
(or group norm) beside the working tree's, at every shape of a UNet preset, alternating.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/ab_kernel.py \\
        --commit 96d11d8 [--kernel conv|norm] [--preset mnist-tiny] [--rounds 25] [--threads 2]

Why beside ab_step.py and ab_tree.py: a change to one kernel that saves 10%
of that kernel moves a whole step by a few percent, about what two steps
minutes apart differ by on a shared machine. Timed alone, shape by shape,
the same change shows clearly (the tenth round's convolution and group norm
changes were measured this way, then confirmed on the steps).

How: the older `autograd/kernels/<kernel>.py` is loaded beside today's (as
ab_step.py does: `git show`, its relative imports resolve to today's
package, so both share today's thread pool). For each distinct shape the
preset's UNet runs in one forward pass (counted, as bench_conv.py does), the
forward and then the backward of both versions run on the same float32
arrays, alternating `--rounds` times (the order flips every round). Both
versions' outputs are compared first; a difference beyond float32 rounding
stops the run.

Prints one JSON line per (shape, direction) and a table: each version's
median, and the median and quartiles of the per-round ratios new/old; a last
row weights the medians by how often each shape occurs in a forward pass.
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from ab_step import load_old_module  # noqa: E402
from bench_conv import make_case, preset_configs  # noqa: E402
from common import emit_json, machine_header, print_table, quartiles, set_threads  # noqa: E402

import autograd  # noqa: E402
from autograd import functional as F  # noqa: E402
from tinyddpm.unet import PRESETS, UNet  # noqa: E402


def shapes(preset, kernel):
    """{shape: count} of the preset's convolutions (C_in, C_out, size, k, stride),
    as bench_conv.py finds them, or group norms (C, size, groups, silu), in one
    forward pass, in order of first use."""
    if kernel == "conv":
        return {config[1:6]: config[6] for config in preset_configs(preset)}
    model = UNet(**PRESETS[preset], rng=np.random.default_rng(0))
    seen = {}
    originals = {n: getattr(F, n) for n in ("group_norm", "group_norm_silu")}

    def recorder(name):
        def record(x, num_groups, *args, **kwargs):
            key = (x.shape[1], x.shape[2], num_groups, name == "group_norm_silu")
            seen[key] = seen.get(key, 0) + 1
            return originals[name](x, num_groups, *args, **kwargs)
        return record

    for n in originals:
        setattr(F, n, recorder(n))
    try:
        with autograd.no_grad():
            model(autograd.Tensor(np.zeros((1, 1, 28, 28), np.float32)), np.array([0]))
    finally:
        for n, f in originals.items():
            setattr(F, n, f)
    return seen


def conv_calls(module, key, batch, rng):
    """(forward, backward) of `module`'s convolution at `key`, on bench_conv.py's
    float32 arrays (its own seed: `rng` is for norm_calls' sake)."""
    cin, cout, size, k, stride = key
    x, w, b, dy, pad = make_case(batch, cin, cout, size, k, stride, seed=1)
    return (lambda: (module.conv2d_forward(x, w, stride, pad, b),),
            lambda: module.conv2d_backward(dy, x, w, stride, pad, need_x=True, need_w=True, need_b=True))


def norm_calls(module, key, batch, rng):
    c, size, groups, silu = key
    x = rng.standard_normal((batch, c, size, size), dtype=np.float32)
    w = rng.standard_normal(c, dtype=np.float32)
    b = rng.standard_normal(c, dtype=np.float32)
    g = rng.standard_normal(x.shape, dtype=np.float32)
    y, mean, rstd, u = module.group_norm_fused_forward(x, groups, w, b, 1e-5, silu=silu)
    return (lambda: module.group_norm_fused_forward(x, groups, w, b, 1e-5, silu=silu)[:1],
            lambda: module.group_norm_fused_backward(g, x, mean, rstd, groups, w, y, u))


def agree(old, new):
    for a, b in zip(old, new):
        if a is None or b is None:
            if (a is None) != (b is None):
                return False
            continue
        scale = float(np.abs(a).max()) or 1.0
        if a.shape != b.shape or float(np.abs(a - b).max()) > 1e-4 * scale:
            return False
    return True


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--commit", required=True, help="the 'old' commit, e.g. HEAD~1")
    p.add_argument("--kernel", default="conv", choices=("conv", "norm"))
    p.add_argument("--preset", default="mnist-tiny", choices=sorted(PRESETS))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=25)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    set_threads(a.threads)
    path = f"autograd/kernels/{a.kernel}.py"
    current = __import__(f"autograd.kernels.{a.kernel}", fromlist=["_"])
    old = load_old_module(a.commit, path)
    calls = conv_calls if a.kernel == "conv" else norm_calls
    emit_json({"bench": "ab_kernel", "machine": machine_header(), "commit": a.commit, "kernel": a.kernel,
               "preset": a.preset, "batch": a.batch, "threads": a.threads, "rounds": a.rounds})
    rows, weighted = [], {"forward": [0.0, 0.0], "backward": [0.0, 0.0]}
    for key, count in shapes(a.preset, a.kernel).items():
        fns = {"old": calls(old, key, a.batch, np.random.default_rng(1)),      # the same arrays
               "new": calls(current, key, a.batch, np.random.default_rng(1))}
        for d, direction in enumerate(("forward", "backward")):
            run_old, run_new = fns["old"][d], fns["new"][d]
            if not agree(run_old(), run_new()):
                sys.exit(f"ab_kernel: old and new {direction} of {a.kernel} {key} give different results")
            for _ in range(2):                 # warm-up: each version's buffers, caches
                run_old()
                run_new()
            times = {"old": [], "new": []}
            for r in range(a.rounds):
                for name in (("old", "new") if r % 2 == 0 else ("new", "old")):
                    f = run_old if name == "old" else run_new
                    t0 = time.perf_counter()
                    f()
                    times[name].append(time.perf_counter() - t0)
            old_s, new_s = statistics.median(times["old"]), statistics.median(times["new"])
            q1, per_round, q3 = quartiles([n / o for n, o in zip(times["new"], times["old"])])
            weighted[direction][0] += count * old_s
            weighted[direction][1] += count * new_s
            record = {"shape": str(key), "count": count, "direction": direction, "old_ms": old_s * 1e3,
                      "new_ms": new_s * 1e3, "ratio": new_s / old_s, "round_ratio_median": per_round,
                      "round_ratio_q1": q1, "round_ratio_q3": q3}
            emit_json({"bench": "ab_kernel", **record})
            rows.append({**record, "quartiles": f"{q1:.3f}-{q3:.3f}", "count": str(count)})
    for direction, (old_s, new_s) in weighted.items():
        rows.append({"shape": "all, weighted by count", "direction": direction,
                     "old_ms": old_s * 1e3, "new_ms": new_s * 1e3, "ratio": new_s / old_s})
    fields = ("C_in, C_out, size, k, stride" if a.kernel == "conv" else "C, size, groups, silu")
    print(f"\n{a.kernel} ({fields}), {a.preset}, batch {a.batch}, {a.threads} threads, {a.rounds} rounds; "
          f"old = {a.commit}, new = working tree")
    print_table(rows, [("shape", "shape", "{}"), ("count", "count", "{}"), ("direction", "direction", "{}"),
                       ("old_ms", "old ms", "{:.2f}"), ("new_ms", "new ms", "{:.2f}"),
                       ("ratio", "new/old", "{:.3f}"), ("round_ratio_median", "per round", "{:.3f}"),
                       ("quartiles", "quartiles", "{}")])


if __name__ == "__main__":
    main()
