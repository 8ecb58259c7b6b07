"""Threads for the fast CPU kernels' chunk loops.

The CPU kernels (convolution, group norm) already go through a batch a few
images at a time, so that each chunk's buffers stay in a core's cache. The
chunks are independent, so they can also run on several cores at once:
NumPy releases the GIL inside its copies, ufuncs and matrix products, so
plain Python threads run them in parallel.

Why not leave the cores to the BLAS, as NumPy does by default? A multi-threaded
matrix product splits one product over the cores, but everything between the
products (im2col copies, layout changes, the normalization passes) runs on one
core, so a second BLAS thread gains little. Running whole chunks (copy +
product + write-back) side by side keeps both cores busy more of the time.
The BLAS itself must then keep to one thread, for as long as the kernels run,
not only inside the loops: OpenBLAS's threads spin for a while after each
product, waiting for the next one, and take the core that a chunk's thread
needs. One BLAS thread per product also makes the
numbers the same for any number of pool threads: a multi-threaded OpenBLAS
product is not always bit for bit the single-threaded one. So the first
kernel loop sets NumPy's BLAS to one thread for the rest of the process;
`release_blas()` gives it its threads back (until the next kernel loop), and
`autograd.fast.disable()` calls it.

    parallel_for(n, body)   calls body(i, worker) for i in range(n)

Chunks are handed out one at a time to whichever thread is free (a busy
core elsewhere on the machine then slows one thread, not the whole loop). So
that the result does not depend on which thread ran what, every body writes
only its own slice of the output; sums across chunks are left to the caller,
in chunk order, after the loop. `worker` (0 .. threads-1) lets a body pick
per-thread scratch buffers.

How many threads: `set_num_threads(n)`, by default as many as NumPy's BLAS is
set to use when first asked (so OMP_NUM_THREADS / OPENBLAS_NUM_THREADS set
both). Holding the BLAS at one thread needs threadpoolctl; without it (or
with a BLAS it does not know), loops run on one thread and the BLAS keeps its
own. On a GPU loops always run in order: the device is already parallel, and
CuPy queues every kernel on one stream.
"""
import itertools
import os
import threading
from concurrent.futures import ThreadPoolExecutor

from . import memory

try:
    import threadpoolctl
except ImportError:  # pragma: no cover - it is a dependency; kept optional for odd installs
    threadpoolctl = None

_threads = None            # None until first asked: then the BLAS's own thread count
_pool = None               # ThreadPoolExecutor with _threads - 1 workers (the caller is one more)
_controller = None         # threadpoolctl's view of the BLAS libraries NumPy loaded
_busy = threading.Lock()   # one parallel loop at a time; a nested or concurrent one runs in order
_blas_threads = None       # the BLAS's own thread count while we hold it at one thread
_hold_lock = threading.Lock()


def _forget_pool_after_fork():
    """A forked child has none of the parent's threads: it makes its own pool when it needs one."""
    global _pool, _busy
    _pool, _busy = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_after_fork)


def _blas():
    """threadpoolctl's controller restricted to the BLAS, or None when it cannot be steered."""
    global _controller
    if _controller is None and threadpoolctl is not None:
        import numpy  # noqa: F401  (loads the BLAS, so that threadpoolctl finds it)
        c = threadpoolctl.ThreadpoolController().select(user_api="blas")
        _controller = c if c.lib_controllers else False
    return _controller or None


def num_threads():
    """Threads the CPU kernels use (1 when the BLAS cannot be capped: see the module doc)."""
    global _threads
    if _threads is None:
        blas = _blas()
        if blas is None:
            _threads = 1
        else:
            # OpenBLAS counts the CPUs of the affinity mask; never more than those.
            cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
            _threads = max(1, min([cpus or 1] + [c.num_threads for c in blas.lib_controllers]))
    return _threads


def set_num_threads(n):
    """Use n threads in the CPU kernels (n >= 1); 1 runs every loop in order."""
    global _threads, _pool
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"number of threads must be an integer >= 1, got {n!r}")
    if n > 1 and _blas() is None:
        raise RuntimeError("cannot use more than one thread: threadpoolctl is not installed or "
                           "does not recognize NumPy's BLAS (pip install threadpoolctl)")
    if not _busy.acquire(blocking=False):
        raise RuntimeError("cannot change the number of threads while a parallel loop runs")
    try:
        if _pool is not None:
            _pool.shutdown(wait=True)
            _pool = None
        _threads = n
    finally:
        _busy.release()


def _hold_blas():
    """Keep NumPy's BLAS at one thread from now on (the pool's threads do the sharing)."""
    global _blas_threads
    if _blas_threads is not None or _blas() is None:
        return
    with _hold_lock:
        if _blas_threads is None:
            num_threads()              # fix the default from the BLAS's count before capping it
            _blas_threads = max(c.num_threads for c in _blas().lib_controllers)
            for lib in _blas().lib_controllers:
                lib.set_num_threads(1)


_host_memory_asked = False


def _keep_host_memory():
    """Once: glibc's malloc keeps freed memory (memory.keep_freed_host_memory says why)."""
    global _host_memory_asked
    _host_memory_asked = True
    memory.keep_freed_host_memory()


def release_blas():
    """Give NumPy's BLAS back the threads it had before the first kernel loop held it."""
    global _blas_threads
    with _hold_lock:
        if _blas_threads is not None:
            for lib in _blas().lib_controllers:
                lib.set_num_threads(_blas_threads)
            _blas_threads = None


def parallel_for(n, body, device="cpu"):
    """Call body(i, worker) for every i in range(n), on up to num_threads() threads.

    Each i runs exactly once; bodies must write disjoint outputs. An exception in
    any body is raised here once every chunk that had started has stopped.
    """
    if device == "cpu":
        if not _host_memory_asked:
            _keep_host_memory()
        _hold_blas()
        if min(n, num_threads()) > 1 and _busy.acquire(blocking=False):
            try:
                # Read again under the lock: set_num_threads (which takes it too)
                # may have changed the count since the line above.
                threads = min(n, num_threads())
                if threads > 1:
                    return _run_on_pool(n, body, threads)
            finally:
                _busy.release()
    # One thread, another device, or a loop inside a loop (the lock is taken): in order.
    for i in range(n):
        body(i, 0)


def _run_on_pool(n, body, threads):
    """parallel_for on `threads` threads: the caller and threads - 1 of the pool's.
    The caller holds _busy."""
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=num_threads() - 1, thread_name_prefix="autograd")
    loop = _Loop(n, body)
    try:
        for w in range(1, threads):
            try:
                _pool.submit(loop.run, w)
            except RuntimeError:       # the interpreter is shutting down: no new threads
                break
        loop.work(0)                   # the caller: not counted (finish() follows it anyway)
    finally:
        loop.finish()                  # no chunk starts after this; those running end first
    if loop.errors:
        raise loop.errors[0]


class _Loop:
    """The chunks of one parallel_for, handed out one at a time to whichever thread asks.

    The caller waits for the threads that came to work on the loop, not for
    every thread it asked: a pool thread that wakes up once the caller has
    finished (waking a sleeping thread can take longer than a small loop)
    finds the loop closed and leaves without touching it; waiting for every
    asked thread to come and go would cost each loop a wake-up, and a step
    runs dozens of loops. Taking a chunk needs no lock: next() on an itertools.count is atomic
    under the GIL; the lock guards only each thread's arrival and departure.
    """

    def __init__(self, n, body):
        self.n, self.body = n, body
        self.taken = itertools.count()     # next(taken): the chunk to run
        self.errors = []
        self.lock = threading.Lock()
        self.closed = False                # set by the caller when it is done: no thread joins after
        self.working = 0                   # threads inside run()
        self.left = threading.Event()      # the last of them has left a closed loop

    def run(self, worker):
        with self.lock:
            if self.closed:
                return
            self.working += 1
        try:
            self.work(worker)
        finally:
            with self.lock:
                self.working -= 1
                if self.closed and not self.working:
                    self.left.set()

    def work(self, worker):
        while not (self.errors or self.closed):
            i = next(self.taken)
            if i >= self.n:
                return
            try:
                self.body(i, worker)
            except BaseException as e:
                self.errors.append(e)

    def finish(self):
        """Let no thread start a chunk from now on; return once none is running one."""
        with self.lock:
            self.closed = True
            busy = self.working
        if busy:
            self.left.wait()
        self.body = None                   # a stale queued run() then keeps no kernel buffers alive


class Scratch:
    """Scratch buffers, one per worker thread, each made by make() on first use."""

    def __init__(self, make):
        self._make, self._buffers = make, {}

    def __getitem__(self, worker):
        if worker not in self._buffers:   # only thread `worker` ever asks for this key
            self._buffers[worker] = self._make()
        return self._buffers[worker]
