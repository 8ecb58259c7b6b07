"""What every benchmark here shares: the machine line, timing, alternating rounds, output.

Method: each function is run a few times untimed (warm-up: first-call
allocations, BLAS thread start-up, torch's one-off dispatch), then timed
`rounds` times; the median is reported, since a single slow round (another
process, a page fault storm) moves it least. When two implementations are
compared they alternate round by round, so a slow spell of the machine hits
both alike instead of whichever happened to run then.

Run benchmarks with the BLAS the library would pick by itself:

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_conv.py

(this machine pins OpenBLAS to its Haswell kernel, which halves matmul speed
on these AVX-512 cores). The header line says which kernel actually ran.
"""
import json
import os
import platform
import statistics
import sys
import time


def blas_info():
    """'openblas SkylakeX x2 threads' or similar, from threadpoolctl when it is installed."""
    try:
        import threadpoolctl
    except ImportError:
        return "unknown (pip install threadpoolctl to see which BLAS kernel runs)"
    import numpy  # noqa: F401  (loads the BLAS so that threadpoolctl can see it)
    found = [f"{i.get('internal_api')} {i.get('architecture', '?')} x{i.get('num_threads')}"
             for i in threadpoolctl.threadpool_info() if i.get("user_api") == "blas"]
    return ", ".join(found) or "none found"


def machine_header():
    """One dict describing where the figures come from."""
    import numpy as np
    pinned = {k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE",
                                         "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")
              if k in os.environ}
    return {"python": platform.python_version(), "numpy": np.__version__,
            "cpu": _cpu_name(), "cores": os.cpu_count(), "blas": blas_info(),
            "blas_env": pinned}


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def set_threads(threads):
    """Give tinyddpm `threads` threads: its fast kernels' pool (autograd/fast/threads.py) and
    NumPy's BLAS.

    With more than one, the pool holds the BLAS at one thread while the fast
    kernels run (threads.py says why). Needs threadpoolctl for the BLAS;
    returns False without it (then everything runs on the BLAS's defaults).
    """
    try:
        import threadpoolctl
    except ImportError:
        return False
    import numpy  # noqa: F401  (loads the BLAS first)
    from autograd.fast import threads as pool
    # Kept referenced for the life of the process: the limit lasts as long as the object.
    set_threads.keep = threadpoolctl.threadpool_limits(threads, user_api="blas")
    pool.set_num_threads(threads)
    return True


def torch_or_none(threads):
    """PyTorch set to `threads` CPU threads, or None when it is not importable."""
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(threads)
    return torch


def time_alternating(fns, rounds, warmup=2, sync=None, pause=0.05):
    """Median seconds of each function in `fns` (a dict name -> callable).

    Every round runs each function once, in turn, so that drifts of the
    machine's speed fall on all of them alike; every other round in the
    reverse order, so that none always runs right after the same one. `sync`
    (optional) is called before each clock read, for asynchronous devices. A
    short untimed `pause` before each call lets the thread pool of the
    previous one (OpenMP's, OpenBLAS's) stop spinning, so it does not steal
    cores from the next. `time_rounds` gives every round's times instead.
    """
    times = time_rounds(fns, rounds, warmup, sync, pause)
    return {name: statistics.median(ts) for name, ts in times.items()}


def time_rounds(fns, rounds, warmup=2, sync=None, pause=0.05):
    """{name: [seconds of round 0, 1, ...]}, timed as time_alternating says."""
    sync = sync or (lambda: None)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync()
    times = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            time.sleep(pause)
            t0 = time.perf_counter()
            fns[name]()
            sync()
            times[name].append(time.perf_counter() - t0)
    return times


def quartiles(values):
    """(first quartile, median, third quartile) of a list (the median alone for one value)."""
    if len(values) < 2:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=4)
    return q[0], statistics.median(values), q[2]


def ab_arguments(parser):
    """The options of lab/ab_tree.py: which step, how many rounds, on how many threads."""
    parser.add_argument("--preset", default="mnist-tiny")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--step", default="train", choices=("train", "sample"))
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)


def emit_json(record):
    print(json.dumps(record), flush=True)


def print_table(rows, columns, file=sys.stdout):
    """A plain, aligned text table; `columns` is a list of (key, header, format)."""
    cells = [[h for _, h, _ in columns]]
    for row in rows:
        cells.append([("-" if row.get(k) is None else fmt.format(row[k])) for k, _, fmt in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    for n, r in enumerate(cells):
        print("  ".join(c.ljust(w) if i == 0 or n == 0 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(r, widths))), file=file)
        if n == 0:
            print("  ".join("-" * w for w in widths), file=file)
