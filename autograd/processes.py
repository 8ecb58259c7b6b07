"""A forward pass split over processes: each one runs a slice of the batch.

    with BatchSplit(model, processes=2) as net:
        with no_grad():
            y = net(x, t)          # == model(x, t), half of it computed in a forked child

Why processes, when the kernels already have threads (parallel.py)? Python
threads share one interpreter lock. NumPy lets go of it inside each call,
but every call must take it back, and two threads that each make thousands
of calls a step keep waiting for each other: a thread that finds the lock
taken sleeps, and on these virtual machines it runs again only tens of
microseconds after it is woken. Two processes share nothing of the kind.
On the project's 2-core machine the sampling step of mnist-tiny (batch 64)
took 0.68 of the time of the same step on two threads when each of two
processes ran half the batch on one thread (docs/performance.md, eleventh
round).

That works because nothing in a UNet's forward mixes the images of a batch
(group norm, attention and convolution all work image by image), so the
batch can be cut anywhere. The result equals the whole batch's to rounding:
bit for bit at mnist-tiny's shapes (batches of 1 to 64 tried), but not
always, since OpenBLAS multiplies small matrices with other kernels than
large ones and the choice depends on the product's width, i.e. on how many
images a process gets. It is for inference only: a child's part of the
graph cannot send gradients back, so calls must run under no_grad().

How it works: entering the block forks processes - 1 children (Linux only;
elsewhere, or on a GPU, or with one process, calls go straight to fn). Each
child holds the copy of fn (the model and its weights) that existed at the
fork, so the weights must not change inside the block. A call cuts every
argument along axis 0 into `processes` nearly equal slices, sends slices
1.. to the children through pipes (raw bytes and a small JSON header:
nothing is pickled), runs slice 0 itself, and puts the results back
together in order. Each process runs its kernels on one thread, so the
parent's thread count is set to 1 inside the block and restored after it.
The children ignore Ctrl-C (the parent stops them when its block ends) and
exit when their pipe closes, so a parent that dies takes them with it.
"""
import json
import multiprocessing
import signal
import sys

import numpy as np

from . import parallel
from .tensor import Tensor, is_grad_enabled, no_grad


class BatchSplit:
    """Call fn(*args) with the batch (axis 0 of every argument) split over processes.

    fn: takes Tensors or arrays with the batch on axis 0 (e.g. a model called
        as model(x, t)) and returns a Tensor or array with the batch on axis 0.
    processes: how many processes share the work, this one included (default:
        parallel.num_threads(), the CPU kernels' thread count).
    device: only "cpu" splits; on "cuda" (a GPU is already parallel, and a
        forked child cannot use the parent's CUDA context) calls go to fn.
    """

    def __init__(self, fn, processes=None, device="cpu"):
        if processes is not None and (not isinstance(processes, int) or isinstance(processes, bool)
                                      or processes < 1):
            raise ValueError(f"processes must be an integer >= 1, got {processes!r}")
        self.fn = fn
        self.processes = parallel.num_threads() if processes is None else processes
        self.device = device
        self.children = []          # (process, connection) per child
        self.threads_before = None

    # --- the block -------------------------------------------------------------

    def __enter__(self):
        if self.children:
            raise RuntimeError("BatchSplit: this block is already open")
        if self.processes > 1 and self.device == "cpu" and _can_fork():
            self.threads_before = parallel.num_threads()
            parallel.set_num_threads(1)
            context = multiprocessing.get_context("fork")
            try:
                for _ in range(self.processes - 1):
                    here, there = context.Pipe()
                    child = context.Process(target=_serve, args=(self.fn, there), daemon=True)
                    child.start()
                    there.close()               # the child's end: only the child keeps it open
                    self.children.append((child, here))
            except BaseException:
                self.__exit__(None, None, None)
                raise
        return self

    def __exit__(self, *exc):
        for child, conn in self.children:
            try:
                conn.send_bytes(b"{}")          # an empty request: stop
            except OSError:
                pass                            # already gone
            conn.close()
        for child, conn in self.children:
            child.join(timeout=5)
            if child.is_alive():
                child.terminate()
                child.join()
        self.children = []
        if self.threads_before is not None:
            parallel.set_num_threads(self.threads_before)
            self.threads_before = None
        return False

    # --- a call ----------------------------------------------------------------

    def __call__(self, *args):
        if is_grad_enabled():
            raise RuntimeError("BatchSplit runs a forward pass without gradients: "
                               "call it under autograd.no_grad()")
        arrays = [a.data if isinstance(a, Tensor) else a for a in args]
        if not arrays:
            raise ValueError("BatchSplit: fn needs at least one argument with a batch axis")
        for a in arrays:
            if not isinstance(a, np.ndarray) or a.ndim == 0:
                # CuPy arrays, scalars, or anything without a batch axis: no split.
                return self.fn(*args)
        batch = arrays[0].shape[0]
        for a in arrays[1:]:
            if a.shape[0] != batch:
                raise ValueError(f"BatchSplit: every argument needs the same batch size on axis 0, "
                                 f"got {[a.shape for a in arrays]}")
        parts = min(len(self.children) + 1, batch)
        if parts < 2:
            return self.fn(*args)
        # Slice i of every argument: rows bounds[i]:bounds[i+1], as np.array_split cuts.
        bounds = [batch * i // parts for i in range(parts + 1)]
        tensors = [isinstance(a, Tensor) for a in args]
        replies, asked = {}, []
        for k, (_, conn) in enumerate(self.children[:parts - 1], start=1):
            try:
                _send(conn, [a[bounds[k]:bounds[k + 1]] for a in arrays], tensors)
                asked.append((k, conn))
            except OSError:
                replies[k] = f"it exited (worker {k} of this BatchSplit)"
        try:
            own = self.fn(*(_like(arg, a[:bounds[1]]) for arg, a in zip(args, arrays)))
        finally:
            # Always collect what the children sent, so that the next call's
            # replies are not read as this one's.
            for k, conn in asked:
                replies[k] = _receive_reply(conn, k)
        replies = [replies[k] for k in range(1, parts)]
        own_array = own.data if isinstance(own, Tensor) else own
        out = np.empty((batch,) + own_array.shape[1:], dtype=own_array.dtype)
        out[:bounds[1]] = own_array
        for k, reply in enumerate(replies, start=1):
            if isinstance(reply, str):
                raise RuntimeError(f"BatchSplit: the worker process for slice {k} failed: {reply}")
            if reply.shape[1:] != own_array.shape[1:] or reply.shape[0] != bounds[k + 1] - bounds[k]:
                raise RuntimeError(f"BatchSplit: slice {k} came back with shape {reply.shape}, "
                                   f"expected ({bounds[k + 1] - bounds[k]},) + {own_array.shape[1:]}")
            out[bounds[k]:bounds[k + 1]] = reply
        return Tensor(out) if isinstance(own, Tensor) else out


def _can_fork():
    # Forking a process that runs other libraries' threads is only dependable
    # on Linux (macOS's system libraries are not fork-safe, Windows cannot fork).
    return sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()


def _like(arg, array):
    """array as the kind of thing arg was (a Tensor, or the array itself)."""
    return Tensor(array) if isinstance(arg, Tensor) else array


# =============================================================================
# The pipe: a JSON header, then each array's raw bytes (no pickle either way)
# =============================================================================

def _send(conn, arrays, tensors=None):
    """arrays down the pipe; tensors: which of them the receiver should wrap in a Tensor."""
    arrays = [np.ascontiguousarray(a) for a in arrays]
    header = {"arrays": [[a.dtype.str, list(a.shape)] for a in arrays],
              "tensors": tensors or [False] * len(arrays)}
    conn.send_bytes(json.dumps(header).encode())
    for a in arrays:
        conn.send_bytes(a)


def _receive_arrays(conn, described):
    arrays = []
    for dtype, shape in described:
        data = conn.recv_bytes()
        # A copy: frombuffer over bytes is read-only, and the receiver may write.
        arrays.append(np.frombuffer(data, dtype=np.dtype(dtype)).reshape(shape).copy())
    return arrays


def _receive_reply(conn, k):
    """A child's result array, or its error message (a str)."""
    try:
        header = json.loads(conn.recv_bytes())
    except (EOFError, OSError):
        return f"it exited (worker {k} of this BatchSplit)"
    if "error" in header:
        return header["error"]
    return _receive_arrays(conn, header["arrays"])[0]


def _serve(fn, conn):
    """A child's loop: receive a slice, run fn on it, send the result back, until told to stop."""
    # Ctrl-C reaches the whole process group: the parent handles it and ends the
    # block, which stops this process. SIGTERM back to its default (the parent's
    # own handler, inherited through the fork, would not end this loop).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    parallel.set_num_threads(1)
    while True:
        try:
            header = json.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return                              # the parent is gone
        if "arrays" not in header:
            return                              # asked to stop
        args = _receive_arrays(conn, header["arrays"])
        try:
            with no_grad():
                result = fn(*(Tensor(a) if t else a for a, t in zip(args, header["tensors"])))
            result = result.data if isinstance(result, Tensor) else result
            _send(conn, [np.asarray(result)])
        except Exception as e:                  # reported to the parent, which raises it
            conn.send_bytes(json.dumps({"error": f"{type(e).__name__}: {e}"}).encode())
