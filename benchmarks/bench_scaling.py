"""How much a second thread buys: each step at 1 and at N threads, inside one process.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_scaling.py \\
        [--preset mnist-tiny] [--batch 64] [--threads 2] [--rounds 9] [--step sample] [--chunks]

A ratio measured at 2 threads folds together two things: how fast the code
is on one core, and how well it uses the second. This benchmark separates
them. The training (or sampling) step of tinyddpm, and of the PyTorch twin
when torch is importable, runs at 1 thread and at N threads, the four
(implementation, threads) pairs alternating round by round in one process,
so that a slow spell of a shared machine falls on all of them. It prints
each median, each implementation's speed-up from 1 to N threads, and the
ratio tinyddpm / PyTorch at each thread count.

With --chunks it then says where tinyddpm's second thread goes: for each
kernel that splits its work into chunks (autograd/parallel.py), the time
inside its chunk bodies, as wall time and as the threads' CPU time, at 1
and at N threads (alternating round by round again). Work that runs as fast on two threads as on one costs the
same CPU time either way; a rise in CPU time is the chunks themselves
running slower side by side, and wall minus CPU is time they spent waiting
(for the GIL, mostly). A last table splits the step itself: time inside
parallel loops, how much of the loops' threads x time the chunks fill, and
time outside any loop (one thread, whatever the count).
"""
import argparse
import collections
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import emit_json, machine_header, print_table, set_threads, torch_or_none  # noqa: E402


def time_thread_counts(steps, counts, rounds, set_count, pause=0.05):
    """{(name, threads): median seconds} over `rounds` rounds, every pair once a round."""
    pairs = [(name, n) for name in steps for n in counts]
    for name, n in pairs:                               # warm-up, untimed
        set_count(name, n)
        steps[name]()
    times = {pair: [] for pair in pairs}
    for r in range(rounds):
        for name, n in (pairs if r % 2 == 0 else pairs[::-1]):
            set_count(name, n)
            time.sleep(pause)
            t0 = time.perf_counter()
            steps[name]()
            times[(name, n)].append(time.perf_counter() - t0)
    return {pair: statistics.median(ts) for pair, ts in times.items()}


def chunk_times(step, counts, rounds):
    """Per thread count: ({kernel: (wall s, cpu s, chunks)}, (step s, loops s)) per step.

    The first, inside the chunk bodies of each kernel (summed over threads);
    the second, the step's wall time and how much of it the caller spent in
    parallel loops at all (the rest runs on one thread whatever the count).
    The thread counts alternate round by round, as the steps do above.
    """
    from autograd import parallel
    from autograd.kernels import attention, conv, norm
    modules = (attention, conv, norm)

    def fresh():
        return collections.defaultdict(lambda: [0.0, 0.0, 0]), [0.0, 0.0]

    totals = {n: fresh() for n in counts}
    current = [None]                                   # the totals of the round being run
    original = parallel.parallel_for

    def timed_parallel_for(n, body, device="cpu"):
        kernels, whole = current[0]
        entry = kernels[sys._getframe(1).f_code.co_name]    # the kernel that asked

        def timed(i, worker):
            w0, c0 = time.perf_counter(), time.thread_time()
            body(i, worker)
            entry[0] += time.perf_counter() - w0        # each thread adds its own chunks: the GIL
            entry[1] += time.thread_time() - c0         # makes these updates whole
            entry[2] += 1
        t0 = time.perf_counter()
        try:
            return original(n, timed, device)
        finally:
            whole[1] += time.perf_counter() - t0

    for m in modules:
        m.parallel_for = timed_parallel_for
    try:
        for r in range(rounds + 1):                     # round 0: warm-up, not kept
            for n in (counts if r % 2 == 0 else counts[::-1]):
                parallel.set_num_threads(n)
                current[0] = totals[n] if r else fresh()
                time.sleep(0.05)
                t0 = time.perf_counter()
                step()
                current[0][1][0] += time.perf_counter() - t0
    finally:
        for m in modules:
            m.parallel_for = original
    return {n: ({k: (w / rounds, c / rounds, c_n / rounds) for k, (w, c, c_n) in kernels.items()},
                (whole[0] / rounds, whole[1] / rounds))
            for n, (kernels, whole) in totals.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="mnist-tiny")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="the thread count compared with 1")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--step", default="sample", choices=("train", "sample"))
    p.add_argument("--no-torch", action="store_true", help="time tinyddpm only")
    p.add_argument("--chunks", action="store_true", help="also time tinyddpm's chunk bodies per kernel")
    a = p.parse_args()
    if a.threads < 2:
        sys.exit("--threads: give the count to compare with 1 (2 or more)")
    set_threads(a.threads)
    torch = None if a.no_torch else torch_or_none(a.threads)

    from autograd import parallel
    from bench_step import PRESETS, tinyddpm_steps, torch_steps
    if a.preset not in PRESETS:
        sys.exit(f"--preset: unknown {a.preset!r}; choose from {', '.join(sorted(PRESETS))}")
    index = 0 if a.step == "train" else 1
    steps = {"tinyddpm": tinyddpm_steps(a.preset, a.batch, "cpu")[index]}
    if torch:
        steps["torch"] = torch_steps(torch, a.preset, a.batch, "cpu")[index]

    def set_count(name, n):
        # tinyddpm: its kernel pool (the BLAS stays held at one thread); torch: intra-op threads.
        parallel.set_num_threads(n)
        if torch:
            torch.set_num_threads(n)

    header = machine_header()
    header["torch"] = torch.__version__ if torch else None
    emit_json({"bench": "scaling", "machine": header})
    med = time_thread_counts(steps, (1, a.threads), a.rounds, set_count)
    rows = []
    for name in steps:
        one, many = med[(name, 1)], med[(name, a.threads)]
        row = {"bench": "scaling", "preset": a.preset, "batch": a.batch, "step": a.step, "impl": name,
               "threads": a.threads, "rounds": a.rounds, "s_1": one, f"s_{a.threads}": many,
               "speedup": one / many}
        if torch:
            row["ratio_1"] = one / med[("torch", 1)]
            row[f"ratio_{a.threads}"] = many / med[("torch", a.threads)]
        emit_json(row)
        rows.append(row)
    print()
    print(f"{a.preset} {a.step} step, batch {a.batch}, median of {a.rounds}, 1 and {a.threads} threads "
          f"alternating; BLAS: {header['blas']}; torch: {header['torch']}")
    cols = [("impl", "implementation", "{}"), ("s_1", "1 thread s", "{:.3f}"),
            (f"s_{a.threads}", f"{a.threads} threads s", "{:.3f}"), ("speedup", "speed-up", "{:.2f}")]
    if torch:
        cols += [("ratio_1", "ratio at 1", "{:.2f}"), (f"ratio_{a.threads}", f"ratio at {a.threads}", "{:.2f}")]
    print_table(rows, cols)

    if a.chunks:
        by_count = chunk_times(steps["tinyddpm"], (1, a.threads), a.rounds)
        (k1, _), (kn, _) = by_count[1], by_count[a.threads]
        rows = []
        for kernel in sorted(k1, key=lambda k: -k1[k][0]):
            (w1, c1, n1), (wn, cn, _) = k1[kernel], kn.get(kernel, (0, 0, 0))
            rows.append({"bench": "scaling-chunks", "kernel": kernel, "chunks": n1, "wall_1_ms": 1e3 * w1,
                         "cpu_1_ms": 1e3 * c1, "wall_n_ms": 1e3 * wn, "cpu_n_ms": 1e3 * cn,
                         "cpu_rise": cn / c1 if c1 else None})
            emit_json(rows[-1])
        print(f"\ntinyddpm's chunk bodies per {a.step} step (summed over threads), 1 and {a.threads} threads:")
        print_table(rows, [("kernel", "kernel", "{}"), ("chunks", "chunks", "{:.0f}"),
                           ("wall_1_ms", "wall ms @1", "{:.1f}"), ("cpu_1_ms", "CPU ms @1", "{:.1f}"),
                           ("wall_n_ms", f"wall ms @{a.threads}", "{:.1f}"),
                           ("cpu_n_ms", f"CPU ms @{a.threads}", "{:.1f}"), ("cpu_rise", "CPU rise", "{:.2f}")])
        rows = []
        for n in (1, a.threads):
            kernels, (step_s, loops_s) = by_count[n]
            work = sum(w for w, _, _ in kernels.values())
            rows.append({"bench": "scaling-whole", "threads": n, "step_ms": 1e3 * step_s,
                         "loops_ms": 1e3 * loops_s, "outside_ms": 1e3 * (step_s - loops_s),
                         "chunk_work_ms": 1e3 * work, "loop_use": work / (n * loops_s) if loops_s else None})
            emit_json(rows[-1])
        print(f"\nthe {a.step} step split: time in parallel loops (their chunks' work summed over "
              f"threads, and how much of the loops' threads x time it fills) and outside them:")
        print_table(rows, [("threads", "threads", "{}"), ("step_ms", "step ms", "{:.0f}"),
                           ("loops_ms", "in loops ms", "{:.0f}"), ("chunk_work_ms", "chunk work ms", "{:.0f}"),
                           ("loop_use", "loop use", "{:.2f}"), ("outside_ms", "outside ms", "{:.0f}")])


if __name__ == "__main__":
    main()
