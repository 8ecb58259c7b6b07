"""What a busy neighbour costs a kernel: the kernel's CPU time per call, alone and
while a second thread (or process) runs something else.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_gil.py \\
        [--kernel conv] [--batch 64] [--rounds 15]

The kernel (a 3x3 convolution 32->32 on 28x28 maps, its backward, or a group
norm + SiLU; batch 64, float32) runs on the main thread with the kernel pool
at one thread, so every chunk runs there, in order. Meanwhile runs one of:

- nothing;
- `matmul`: a thread of 1024x1024 matrix products, ~10 ms each, the GIL
  released all along (compute-bound, as the kernel's own products);
- `copy`: a thread copying a 16 MB array, the GIL released all along
  (memory-bound, as the kernel's im2col);
- `tiny`: a thread of element-wise additions of 2,000 floats, about 1 us
  each: nearly all GIL handovers, next to no memory traffic;
- `same`: a thread running the same kernel on other arrays, taking and giving
  back the GIL around each of its NumPy calls, as the second thread of a
  parallel loop does;
- `process`: the same kernel in another process (no GIL shared).

The kernel and its neighbour each run on a CPU of their own (`--no-pin`:
wherever the scheduler puts them). The neighbours alternate round by round;
each figure is a median over rounds of the round's median over its calls:
the kernel's CPU time per call (`time.thread_time`: time spent waiting for
the GIL is not in it), its wall time per call (which is), and how many
times per call its thread slept (found the GIL taken and waited to be
woken). A neighbour that stops while the kernel is timed ends the run with
an error rather than passing for "none". A parallel loop's chunks take
more CPU time on two threads than on one
(bench_scaling.py --chunks); this separates what the threads share: the GIL
(`tiny`, `same`), the machine's caches, memory and host (`matmul`, `copy`,
`process`). docs/performance.md, "Sixth round", has the figures.

Last, how long a sleeping thread takes to run again once woken, as every
parallel loop wakes the pool's thread and every GIL hand-over to a thread
that slept waiting for it does: from handing a task to an idle
one-thread executor to the task's first line, while the caller computes (a
matrix product, GIL released) or waits for it. On a virtual machine whose
idle vCPU halts (the ninth round's, in docs/performance.md) this is tens of
microseconds; OpenMP's threads (PyTorch's) spin instead of sleeping.
"""
import argparse
import os
import resource
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from common import emit_json, machine_header, print_table, set_threads  # noqa: E402


def make_kernel(kind, batch, seed):
    """A function running the kernel once on its own arrays (made here, seeded)."""
    from autograd.kernels import conv, norm
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 32, 28, 28), dtype=np.float32)
    if kind == "conv":
        w = rng.standard_normal((32, 32, 3, 3), dtype=np.float32)
        b = rng.standard_normal(32, dtype=np.float32)
        return lambda: conv.conv2d_forward(x, w, 1, 1, b)
    if kind == "conv-backward":
        w = rng.standard_normal((32, 32, 3, 3), dtype=np.float32)
        dy = rng.standard_normal(x.shape, dtype=np.float32)
        return lambda: conv.conv2d_backward(dy, x, w, 1, 1, need_b=True)
    if kind == "norm":
        g, b = rng.standard_normal(32, dtype=np.float32), rng.standard_normal(32, dtype=np.float32)
        return lambda: norm.group_norm_fused_forward(x, 8, g, b, 1e-5, silu=True, keep_u=False)
    raise ValueError(f"--kernel: unknown {kind!r}; choose conv, conv-backward or norm")


def make_neighbours(kernel, batch):
    """{name: one unit of a neighbour thread's work}, each on arrays of its own."""
    rng = np.random.default_rng(1)
    a = rng.standard_normal((1024, 1024), dtype=np.float32)
    a_out = np.empty_like(a)
    src = rng.standard_normal(4 << 20, dtype=np.float32)
    dst = np.empty_like(src)
    small = rng.standard_normal(2000, dtype=np.float32)
    small_out = np.empty_like(small)
    return {"matmul": lambda: np.matmul(a, a, out=a_out),
            "copy": lambda: np.copyto(dst, src),
            "tiny": lambda: np.add(small, small, out=small_out),
            "same": make_kernel(kernel, batch, seed=2)}


def per_call(run, calls):
    """(CPU seconds, wall seconds, sleeps) per call of run() on this thread, each
    the median of `calls` calls.

    A sleep is a voluntary context switch: the thread waited, for the GIL
    mostly (getrusage's count for this thread alone). Wall time less CPU time
    is the time spent waiting, for the GIL or for a CPU.
    """
    times, walls, sleeps = [], [], []
    for _ in range(calls):
        s0 = resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw
        w0, t0 = time.perf_counter(), time.thread_time()
        run()
        times.append(time.thread_time() - t0)
        walls.append(time.perf_counter() - w0)
        sleeps.append(resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw - s0)
    return statistics.median(times), statistics.median(walls), statistics.median(sleeps)


def beside(neighbour, run, calls, cpu=None, name="?"):
    """per_call(run, calls) on this thread while `neighbour` (called `name`) loops
    elsewhere (on CPU `cpu` when given): nothing (None), a command line (another
    process) or a function (another thread)."""
    if neighbour is None:
        return per_call(run, calls)
    if isinstance(neighbour, list):
        return beside_process(neighbour, run, calls, cpu, name)
    return beside_thread(neighbour, run, calls, cpu, name)


def beside_process(command, run, calls, cpu, name):
    pin = [] if cpu is None else ["--cpu", str(cpu)]
    child = subprocess.Popen(command + pin, stdout=subprocess.DEVNULL)
    try:
        time.sleep(2.0)                 # started, imported and looping before the first timed call
        if child.poll() is not None:
            sys.exit(f"the neighbour process {name} stopped (exit code {child.returncode})")
        measured = per_call(run, calls)
        if child.poll() is not None:    # it must have run all along, not only at the start
            sys.exit(f"the neighbour process {name} stopped while the kernel was timed "
                     f"(exit code {child.returncode})")
        return measured
    finally:
        child.kill()
        child.wait()


def beside_thread(neighbour, run, calls, cpu, name):
    stop = threading.Event()
    started, finished = [0], [0]       # the neighbour's units of work begun and ended so far
    failed = []

    def loop():
        try:
            if cpu is not None:
                os.sched_setaffinity(0, {cpu})   # Linux: 0 is the calling thread alone
            while not stop.is_set():
                started[0] += 1
                neighbour()
                finished[0] += 1
        except BaseException as e:     # reported by the caller: a silent stop would fake "alone"
            failed.append(e)
    t = threading.Thread(target=loop, daemon=True)
    t.start()
    time.sleep(0.02)                   # the neighbour is running before the first timed call
    try:
        done_before = finished[0]
        measured = per_call(run, calls)
        # Some unit of the neighbour's work must overlap the timed calls: one
        # begun before their end and not ended before their start (a unit may
        # well be longer than all the timed calls together).
        if failed or not t.is_alive() or started[0] <= done_before:
            sys.exit(f"the neighbour thread {name} did no work while the kernel was timed"
                     f"{': ' + repr(failed[0]) if failed else ''}")
        return measured
    finally:
        stop.set()
        t.join()


def wake_latency(tries, cpus, pause=0.002):
    """{"busy": [...], "waiting": [...]}: seconds from submitting a task to an
    idle thread allowed on `cpus` (a set) to the task starting, `tries` each;
    `submit`'s own work (a Future, a queue) is counted in. Between tries the
    thread has `pause` seconds to fall asleep again, as between two kernels'
    loops."""
    from concurrent.futures import ThreadPoolExecutor
    a = np.random.default_rng(3).standard_normal((384, 384), dtype=np.float32)
    found = {"busy": [], "waiting": []}
    # A new thread inherits its creator's CPU affinity (the caller may be
    # pinned): it gets its own, so that the two are not one vCPU taking turns.
    with ThreadPoolExecutor(max_workers=1, initializer=os.sched_setaffinity, initargs=(0, cpus)) as pool:
        pool.submit(time.perf_counter).result()            # the thread exists before the first try
        for i in range(2 * tries):
            case = "busy" if i % 2 == 0 else "waiting"
            time.sleep(pause)
            t0 = time.perf_counter()
            started = pool.submit(time.perf_counter)
            if case == "busy":
                a @ a                                      # about 1 ms with the GIL released
            found[case].append(started.result() - t0)
    return found


def neighbour_process(kernel, batch, cpu):
    """The `process` neighbour (bench_gil.py --loop-forever): the kernel on arrays
    of its own, over and over, pinned only where the parent says, until the
    parent kills it or dies."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    set_threads(1)
    parent = os.getppid()
    other = make_kernel(kernel, batch, seed=2)
    while os.getppid() == parent:      # stop if the parent dies without killing us
        other()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kernel", default="conv", choices=("conv", "conv-backward", "norm"))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--calls", type=int, default=4, help="timed calls per round and neighbour")
    p.add_argument("--wake-tries", type=int, default=300, help="tries of the thread wake-up timing")
    p.add_argument("--wake-only", action="store_true", help="time only the thread wake-up (seconds, not minutes)")
    p.add_argument("--no-pin", action="store_true",
                   help="leave both threads to the scheduler (by default each has a CPU of its own)")
    p.add_argument("--loop-forever", action="store_true", help=argparse.SUPPRESS)   # the `process` neighbour
    p.add_argument("--cpu", type=int, help=argparse.SUPPRESS)                        # ... and its CPU
    a = p.parse_args()
    if a.batch < 1 or a.rounds < 1 or a.calls < 1 or a.wake_tries < 1:
        sys.exit("--batch, --rounds, --calls and --wake-tries must be at least 1")
    if not (hasattr(resource, "RUSAGE_THREAD") and hasattr(os, "sched_setaffinity")):
        sys.exit("bench_gil.py needs Linux: per-thread getrusage and CPU affinity")
    # The kernel pool and the BLAS at one thread (below): every chunk on this one.
    # Pinned, the kernel and its neighbour each keep a CPU: left to the scheduler,
    # a woken neighbour is sometimes placed on the kernel's CPU for a while, and
    # the same run repeated gave 1.0 or 1.35 for the same neighbour.
    if a.loop_forever:
        return neighbour_process(a.kernel, a.batch, a.cpu)
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        sys.exit(f"bench_gil.py needs at least 2 CPUs, this process may use {len(cpus)}: "
                 "a neighbour on the kernel's own CPU measures time-sharing, not the GIL")
    mine, theirs = (None, None) if a.no_pin else (cpus[0], cpus[1])
    if a.cpu is not None:
        sys.exit("--cpu is only for the neighbour process bench_gil.py starts itself")
    if set_threads(1) is False:
        sys.exit("bench_gil.py needs threadpoolctl to hold the BLAS at one thread (pip install threadpoolctl)")
    if mine is not None:
        os.sched_setaffinity(0, {mine})
    if a.wake_only:
        return print_wake(a, cpus, mine, theirs)
    run = make_kernel(a.kernel, a.batch, seed=0)
    neighbours = {"none": None, **make_neighbours(a.kernel, a.batch),
                  "process": [sys.executable, os.path.abspath(__file__), "--kernel", a.kernel,
                              "--batch", str(a.batch), "--loop-forever"]}
    for f in [run] + [f for f in neighbours.values() if callable(f)]:
        f()                            # warm-up: buffers, first-call costs
    times = {name: [] for name in neighbours}
    for r in range(a.rounds):
        order = list(neighbours) if r % 2 == 0 else list(neighbours)[::-1]
        for name in order:
            times[name].append(beside(neighbours[name], run, a.calls, theirs, name))
    emit_json({"bench": "gil", "machine": machine_header()})
    # Each figure: the median over rounds of each round's median over its calls.
    alone = statistics.median(t for t, _, _ in times["none"])
    rows = []
    for name, ts in times.items():
        m = statistics.median(t for t, _, _ in ts)
        rows.append({"bench": "gil", "kernel": a.kernel, "batch": a.batch, "rounds": a.rounds,
                     "neighbour": name, "cpu_ms": 1e3 * m, "vs_alone": m / alone,
                     "wall_ms": 1e3 * statistics.median(w for _, w, _ in ts),
                     "sleeps": statistics.median(n for _, _, n in ts)})
        emit_json(rows[-1])
    placed = "left to the scheduler" if mine is None else f"kernel on CPU {mine}, neighbour on CPU {theirs}"
    print(f"\n{a.kernel}, batch {a.batch}: CPU time per call on one thread, median of {a.rounds} "
          f"rounds x {a.calls} calls, beside each neighbour (alternating; {placed})")
    print_table(rows, [("neighbour", "neighbour", "{}"), ("cpu_ms", "CPU ms per call", "{:.2f}"),
                       ("vs_alone", "vs alone", "{:.3f}"), ("wall_ms", "wall ms per call", "{:.2f}"),
                       ("sleeps", "sleeps per call", "{:.0f}")])
    print_wake(a, cpus, mine, theirs)


def print_wake(a, cpus, mine, theirs):
    wake = []
    for case, seconds in wake_latency(a.wake_tries, set(cpus) if theirs is None else {theirs}).items():
        p10, p50, p90 = np.percentile(np.array(seconds) * 1e6, [10, 50, 90])
        wake.append({"bench": "gil-wake", "caller": case, "tries": a.wake_tries,
                     "median_us": p50, "p10_us": p10, "p90_us": p90})
        emit_json(wake[-1])
    woken = "left to the scheduler" if theirs is None else f"caller on CPU {mine}, woken thread on CPU {theirs}"
    print(f"\nwaking an idle thread: from submitting a task to its first line, {a.wake_tries} tries each "
          f"({woken})")
    print_table(wake, [("caller", "caller meanwhile", "{}"), ("median_us", "median us", "{:.0f}"),
                       ("p10_us", "10th percentile", "{:.0f}"), ("p90_us", "90th percentile", "{:.0f}")])


if __name__ == "__main__":
    main()
