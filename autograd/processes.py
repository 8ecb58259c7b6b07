"""Work on a batch split over processes: each one takes a slice of the batch.

    with BatchSplit(model) as net:                  # sampling: a forward pass
        with no_grad():
            y = net(x, t)                           # == model(x, t), a slice of it in a forked child

    with GradientSplit(params, loss_fn) as step:    # training: loss and gradients
        loss = step(x_t, t, noise)                  # == loss_fn(x_t, t, noise), its backward() done:
                                                    # p.grad holds the whole batch's gradients

Why processes, when the kernels already have threads (parallel.py)? Python
threads share one interpreter lock. NumPy lets go of it inside each call,
but every call must take it back, and two threads that each make thousands
of calls a step keep waiting for each other: a thread that finds the lock
taken sleeps, and on these virtual machines it runs again only tens of
microseconds after it is woken. Two processes share nothing of the kind.
On the project's 2-core machine, two processes with half the batch each on
one thread took 0.68 of the time of mnist-tiny's sampling step on two
threads, and 0.84 of its training step (docs/performance.md, eleventh round).

It works because nothing in a UNet mixes the images of a batch (group norm,
attention and convolution all work image by image), so the batch can be
cut anywhere: the forward of a slice is that slice of the forward, and the
loss (a mean) and its gradients are the slices' losses and gradients
weighted by their share of the batch, n_k / B, and summed. The result equals
the whole batch's to rounding: the forward bit for bit at mnist-tiny's
shapes (batches of 1 to 64 tried), but not always, since OpenBLAS multiplies
small matrices with other kernels than large ones and the choice depends on
the product's width, i.e. on how many images a process gets; sums over the
batch (the gradients) are added in another order. Random draws inside fn
differ too: each process has generators of its own (dropout's masks).

How: entering the block forks processes - 1 children (Linux only; elsewhere,
on a GPU, or with one process, everything runs here, unsplit). How many
processes: as many as the kernels have threads, or TINYDDPM_PROCESSES from
the environment (1 turns the split off and leaves the threads as they
were). A call cuts every argument along axis 0 into `processes` nearly
equal slices, sends slices 1.. to the children through pipes (raw bytes and
a small JSON header: nothing is pickled), works on slice 0 itself, and then
puts the results together in order. Each process runs its kernels on one
thread, so the parent's thread count is 1 inside the block and restored
after it. The children leave the parent's process group, so that Ctrl-C or
a SIGTERM to the group reaches the parent alone (which ends the block and
with it the children), and exit when their pipe closes, so a parent that
dies takes them with it.

What the children know of the model is what the fork gave them: its
weights, and its mode (train or eval) and any other state. BatchSplit is
for fixed weights (sampling): they must not change inside its block.
GradientSplit moves the parameters into memory shared with the children
when the block opens, so an optimizer step in the parent is what the
children compute with next; each child writes its gradients into shared
memory too, and the parent adds them into its own `.grad`.
"""
import atexit
import json
import mmap
import multiprocessing
import multiprocessing.util  # noqa: F401  (registers its exit handler before ours: see below)
import os
import signal
import sys

import numpy as np

from . import backend, parallel
from .tensor import Tensor, is_grad_enabled, no_grad

# The kernels' thread count before the outermost open block set it to 1: the
# default number of processes of a block opened inside another (a training
# run's preview samples), which would otherwise read 1. Blocks nest: one
# opened inside another closes before it (as `with` statements do).
_cores = None
# This process's ends of every open block's pipes. Any forked process
# inherits copies of them all and closes them at once (_close_parent_ends): a
# pipe reaches its end (and the child waiting on it exits) only once no
# process holds the parent's end open, so a parent that dies takes its
# children with it.
_parent_ends = set()
# Signals for the parent to handle, held back while forking (see _start).
_PARENTS_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _close_parent_ends():
    for end in _parent_ends:
        end.close()
    _parent_ends.clear()


if hasattr(os, "register_at_fork"):                 # not on Windows, which cannot fork
    os.register_at_fork(after_in_child=_close_parent_ends)
# At exit, before multiprocessing ends its daemon children (its handler was
# registered at its import, above, and atexit runs the last registered
# first): a block left open then ends with its children's pipes.
atexit.register(_close_parent_ends)


class _Workers:
    """Forked children and the pipes to them: what both kinds of split share."""

    def __init__(self, processes, device):
        if processes is not None and (not isinstance(processes, int) or isinstance(processes, bool)
                                      or processes < 1):
            raise ValueError(f"processes must be an integer >= 1, got {processes!r}")
        self.processes = processes if processes is not None else _default_processes()
        self.device = device
        self.children = []          # (process, connection) per child
        self.threads_before = None  # the kernels' thread count before the block (when it forked)
        self.set_cores = False      # whether this block set _cores (the outermost one does)

    def _will_fork(self):
        return self.processes > 1 and self.device == "cpu" and _can_fork()

    def _start(self, serve):
        """Fork processes - 1 children, child k running serve(request, k) on each request."""
        global _cores
        if self.children:
            raise RuntimeError(f"{type(self).__name__}: this block is already open")
        self.threads_before = parallel.num_threads()
        self.set_cores = _cores is None
        if self.set_cores:
            _cores = self.threads_before
        # set_num_threads(1) ends the kernel pool's threads; OpenBLAS may keep one of
        # its own, idle: the children run only NumPy and our kernels, whose locks
        # (parallel.py's, through os.register_at_fork) start free after a fork.
        parallel.set_num_threads(1)
        # Each block's children draw from streams of their own (backend.fork_global_rngs),
        # seeded from the parent's generator: a second block does not replay the first's.
        entropy = int(backend.global_rng(self.device).integers(2 ** 63))
        context = multiprocessing.get_context("fork")
        try:
            # Ctrl-C and SIGTERM held back while forking: a child leaves its parent's
            # process group (so that a signal to the group, from the terminal or from
            # `timeout`, reaches the parent alone) before it lets them through. One
            # that came meanwhile is raised here when the mask is restored, and the
            # children forked so far are stopped below.
            mask = signal.pthread_sigmask(signal.SIG_BLOCK, _PARENTS_SIGNALS)
            try:
                for k in range(1, self.processes):
                    here, there = context.Pipe()
                    child = context.Process(target=_child_main, args=(serve, there, k, entropy),
                                            daemon=True)
                    # Listed before it starts, so that whatever interrupts from here on
                    # (a Ctrl-C that another thread of this process took is raised at
                    # any line) finds it in the list that _stop ends; its pipe end is
                    # registered before the fork, for the child to close its copy.
                    self.children.append((child, here))
                    _parent_ends.add(here)
                    try:
                        child.start()
                    finally:
                        there.close()           # the child's end: only the child keeps it open
                    try:                        # out of this process group by the time
                        os.setpgid(child.pid, child.pid)    # __enter__ returns
                    except OSError:
                        pass                    # it moved itself already (or died: seen later)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        except BaseException:
            self._stop()
            raise

    def _stop(self):
        """Ask every child to stop and wait for it; then the threads as before the block."""
        try:
            for child, conn in self.children:
                try:
                    conn.send_bytes(b"{}")      # an empty request: stop
                except OSError:
                    pass                        # already gone
            self._close(wait=5)
        finally:
            self._restore_threads()

    def _restore_threads(self):
        global _cores
        if self.threads_before is not None:
            parallel.set_num_threads(self.threads_before)
            if self.set_cores:
                _cores = None
            self.threads_before = None

    def _close(self, wait):
        """Close the pipes (a child waiting on one exits), give each child `wait` seconds, then kill it."""
        for child, conn in self.children:
            _parent_ends.discard(conn)
            conn.close()
        for child, conn in self.children:
            if child.pid is None:
                continue                        # never started (or cut short inside start():
                                                # then it sees its pipe end and exits)
            child.join(timeout=wait)
            if child.is_alive():
                child.kill()
                child.join()
        self.children = []

    def _slices(self, args):
        """(arrays, bounds) for a call, or None when it runs here unsplit."""
        arrays = [a.data if isinstance(a, Tensor) else a for a in args]
        if not arrays:
            raise ValueError(f"{type(self).__name__}: needs at least one argument with a batch axis")
        if any(not isinstance(a, np.ndarray) or a.ndim == 0 for a in arrays):
            return None                         # CuPy arrays, or no batch axis: not split
        batch = arrays[0].shape[0]
        if any(a.shape[0] != batch for a in arrays):
            raise ValueError(f"{type(self).__name__}: every argument needs the same batch size on "
                             f"axis 0, got {[a.shape for a in arrays]}")
        parts = min(len(self.children) + 1, batch)
        if parts < 2:
            return None
        # Slice k of every argument: rows bounds[k]:bounds[k+1], sizes differing by at most one.
        return arrays, [batch * k // parts for k in range(parts + 1)]

    def _exchange(self, args, arrays, bounds, fields, own_work):
        """Send slice k (k >= 1) with fields(k) to child k, run own_work() on slice 0
        here meanwhile, and collect the children's replies: (own result, {k: reply}).

        If own_work raises, the replies are still read before the error goes on, so
        that the next call does not read this one's. If the exchange itself is cut
        short (Ctrl-C while waiting, a broken pipe mid-message), replies may be left
        in the pipes: the children are stopped then, and later calls of the block
        run here, unsplit.
        """
        tensors = [isinstance(a, Tensor) for a in args]
        replies, asked, drained = {}, [], False
        try:
            for k, (_, conn) in enumerate(self.children[:len(bounds) - 2], start=1):
                try:
                    _send(conn, [a[bounds[k]:bounds[k + 1]] for a in arrays], tensors, fields(k))
                    asked.append((k, conn))
                except OSError:
                    replies[k] = _EXITED
            try:
                own = own_work()
            finally:
                for k, conn in asked:
                    replies[k] = _receive(conn)
                drained = True
        except BaseException:
            if not drained:                     # the rest of the block runs here, unsplit
                self._close(wait=0)
                self._restore_threads()
            raise
        for k in sorted(replies):
            if "error" in replies[k]:
                raise RuntimeError(f"the worker process for slice {k} failed: {replies[k]['error']}")
        return own, replies


_EXITED = {"error": "it exited"}


class BatchSplit(_Workers):
    """Call fn(*args) with the batch (axis 0 of every argument) split over processes.

    fn: takes Tensors or arrays with the batch on axis 0 (e.g. a model called
        as model(x, t)) and returns a Tensor or array with the batch on axis 0.
        Its weights must not change inside the block (the children hold the
        copy the fork gave them).
    processes: how many processes share the work, this one included (default:
        parallel.num_threads(), the CPU kernels' thread count).
    device: only "cpu" splits; on "cuda" (a GPU is already parallel, and a
        forked child cannot use the parent's CUDA context) calls go to fn.
    Calls must run under no_grad(): a child's part of the graph cannot send
    gradients back.
    """

    def __init__(self, fn, processes=None, device="cpu"):
        super().__init__(processes, device)
        self.fn = fn

    def __enter__(self):
        if self._will_fork():
            self._start(self._serve)
        return self

    def __exit__(self, *exc):
        self._stop()
        return False

    def __call__(self, *args):
        if is_grad_enabled():
            raise RuntimeError("BatchSplit runs a forward pass without gradients: "
                               "call it under autograd.no_grad()")
        split = self._slices(args)
        if split is None:
            return self.fn(*args)
        arrays, bounds = split
        own, replies = self._exchange(
            args, arrays, bounds, lambda k: {},
            lambda: self.fn(*(_like(arg, a[:bounds[1]]) for arg, a in zip(args, arrays))))
        own_array = own.data if isinstance(own, Tensor) else own
        out = np.empty((bounds[-1],) + own_array.shape[1:], dtype=own_array.dtype)
        out[:bounds[1]] = own_array
        for k in range(1, len(bounds) - 1):
            part = replies[k]["arrays"][0]
            if part.shape != (bounds[k + 1] - bounds[k],) + own_array.shape[1:]:
                raise RuntimeError(f"BatchSplit: slice {k} came back with shape {part.shape}, expected "
                                   f"{(bounds[k + 1] - bounds[k],) + own_array.shape[1:]}")
            out[bounds[k]:bounds[k + 1]] = part
        return Tensor(out) if isinstance(own, Tensor) else out

    def _serve(self, request, k):
        with no_grad():
            result = self.fn(*request["args"])
        return {}, [np.asarray(result.data if isinstance(result, Tensor) else result)]


class GradientSplit(_Workers):
    """loss_fn(*args) and its backward, with the batch (axis 0 of every argument) split over processes.

    params: the Tensors the gradients are for (model.parameters()), all of one
        dtype. Inside the block their `.data` lives in memory shared with the
        children: update it in place (as the optimizers do), never replace it.
    loss_fn: takes the arguments' slices (as given: arrays or Tensors) and
        returns a scalar Tensor, the mean loss over its slice.
    A call returns the loss of the whole batch as a 0-d array, and leaves the
    whole batch's gradients added into each parameter's `.grad` (zero them
    before, as for backward()). rng_seed (a list of ints, optional): before
    its slice each process k seeds the device's global generator (dropout)
    with rng_seed + [k], so that a step's masks depend on it alone (a training
    run passes its seed and step, and a resumed run draws the same masks).
    Without it each child draws from a stream of its own, derived at the fork
    from the seed given to autograd.manual_seed.
    """

    def __init__(self, params, loss_fn, processes=None, device="cpu"):
        super().__init__(processes, device)
        self.params, self.loss_fn = list(params), loss_fn
        self.shared = None            # the parameters' shared views while the block is open
        self.child_grads = None       # (children, n) shared array: child k's gradients in row k - 1

    def __enter__(self):
        if self._will_fork():
            self._share_parameters()
            try:
                self._start(self._serve)
            except BaseException:
                self._unshare_parameters()
                raise
        return self

    def __exit__(self, *exc):
        self._stop()
        self._unshare_parameters()
        return False

    def _share_parameters(self):
        dtypes = {p.dtype for p in self.params}
        if len(dtypes) != 1:
            raise ValueError(f"GradientSplit: the parameters must share one dtype, got {sorted(map(str, dtypes))}")
        dtype = np.dtype(dtypes.pop())
        n = sum(p.data.size for p in self.params)
        values = _shared_array(n, dtype)
        self.child_grads = _shared_array((self.processes - 1) * n, dtype).reshape(self.processes - 1, n)
        self.shared, offset = [], 0
        for p in self.params:
            view = values[offset:offset + p.data.size].reshape(p.shape)
            view[...] = p.data
            p.data = view
            self.shared.append((offset, view))
            offset += view.size

    def _unshare_parameters(self):
        if self.shared is not None:
            for p, (_, view) in zip(self.params, self.shared):
                if p.data is view:
                    p.data = view.copy()    # private again: the shared mapping can go
            self.shared = self.child_grads = None

    def __call__(self, *args, rng_seed=None):
        if not is_grad_enabled():
            raise RuntimeError("GradientSplit computes gradients: do not call it under no_grad()")
        split = self._slices(args)
        if split is None:
            if rng_seed is not None:
                backend.seed_global_rng(list(rng_seed) + [0], self.device)
            loss = self.loss_fn(*args)
            loss.backward()
            return loss.data
        if self.shared is not None:
            for i, (p, (_, view)) in enumerate(zip(self.params, self.shared)):
                if p.data is not view:
                    raise RuntimeError(f"GradientSplit: parameter {i} {tuple(p.shape)} was replaced inside the "
                                       "block; update it in place, the worker processes read the shared copy")
        arrays, bounds = split
        batch = bounds[-1]

        def extra(k):
            return {"scale": (bounds[k + 1] - bounds[k]) / batch, "rng_seed": rng_seed}

        def own_work():
            if rng_seed is not None:
                backend.seed_global_rng(list(rng_seed) + [0], self.device)
            loss = self.loss_fn(*(_like(arg, a[:bounds[1]]) for arg, a in zip(args, arrays)))
            loss = loss * loss.dtype.type(bounds[1] / batch)    # this slice's share of the mean
            loss.backward()
            return loss

        own, replies = self._exchange(args, arrays, bounds, extra, own_work)
        total = own.data.copy()
        for k in range(1, len(bounds) - 1):                     # in order: the same sums every time
            total += total.dtype.type(replies[k]["loss"])
            row = self.child_grads[k - 1]
            for p, has_grad, (offset, view) in zip(self.params, replies[k]["has_grad"], self.shared):
                if not has_grad:
                    continue
                g = row[offset:offset + view.size].reshape(view.shape)
                if p.grad is None:
                    p.grad = g.copy()
                else:
                    p.grad += g
        return total

    def _serve(self, request, k):
        if request["rng_seed"] is not None:
            backend.seed_global_rng(list(request["rng_seed"]) + [k], self.device)
        for p in self.params:
            p.grad = None
        loss = self.loss_fn(*request["args"])
        loss = loss * loss.dtype.type(request["scale"])
        loss.backward()
        row = self.child_grads[k - 1]
        for p, (offset, view) in zip(self.params, self.shared):
            if p.grad is not None:
                row[offset:offset + view.size] = p.grad.ravel()
        return {"loss": float(loss.data), "has_grad": [p.grad is not None for p in self.params]}, []


def _default_processes():
    """TINYDDPM_PROCESSES from the environment (1: no split, threads as before),
    else as many processes as the kernels have threads."""
    value = os.environ.get("TINYDDPM_PROCESSES")
    if value is not None:
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"TINYDDPM_PROCESSES must be an integer >= 1, got {value!r}")
        return int(value)
    return _cores or parallel.num_threads()


def _can_fork():
    # Forking a process that runs other libraries' threads is only dependable
    # on Linux (macOS's system libraries are not fork-safe, Windows cannot fork).
    return sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()


def _like(arg, array):
    """array as the kind of thing arg was (a Tensor, or the array itself)."""
    return Tensor(array) if isinstance(arg, Tensor) else array


def _shared_array(n, dtype):
    """n values in anonymous memory that forked children share (MAP_SHARED), zeroed."""
    size = max(1, n * dtype.itemsize)
    return np.frombuffer(mmap.mmap(-1, size), dtype=dtype, count=n)


# =============================================================================
# The pipe: a JSON header, then each array's raw bytes (no pickle either way)
# =============================================================================

def _send(conn, arrays, tensors=None, fields=None):
    """A header (fields, and each array's dtype and shape) and then the arrays.
    tensors: which arrays the receiver should wrap in a Tensor."""
    arrays = [np.ascontiguousarray(a) for a in arrays]
    header = dict(fields or {}, arrays=[[a.dtype.str, list(a.shape)] for a in arrays],
                  tensors=tensors or [False] * len(arrays))
    conn.send_bytes(json.dumps(header).encode())
    for a in arrays:
        conn.send_bytes(a)


def _receive(conn):
    """The header (a dict) with its arrays under "arrays" (and as "args", Tensors where
    sent as such), {} for a request to stop, or {"error": ...} for a child gone."""
    try:
        header = json.loads(conn.recv_bytes())
        arrays = []
        for dtype, shape in header.get("arrays", []):
            data = conn.recv_bytes()
            # A copy: frombuffer over bytes is read-only, and the receiver may write.
            arrays.append(np.frombuffer(data, dtype=np.dtype(dtype)).reshape(shape).copy())
    except (EOFError, OSError):
        return dict(_EXITED)
    if "arrays" in header:
        header["arrays"] = arrays
        header["args"] = [Tensor(a) if t else a for a, t in zip(arrays, header["tensors"])]
    return header


def _child_main(serve, conn, k, entropy):
    """Child k's loop: receive a slice, serve(request, k) -> (fields, arrays) to send
    back, until told to stop or the parent is gone."""
    # Out of the parent's process group: Ctrl-C in a terminal and a SIGTERM to the
    # group (`timeout`, a batch scheduler) reach the parent alone, which handles
    # them (tinyddpm train finishes its step and saves) and ends the block, which
    # stops this process. SIGTERM sent to this process itself still ends it
    # (multiprocessing ends daemon children so at exit); SIGINT is ignored.
    os.setpgid(0, 0)                            # (the parent does it too: whichever is first)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)   # not the parent's handler, inherited
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _PARENTS_SIGNALS)    # held back by _start
    parallel.set_num_threads(1)
    backend.fork_global_rngs(k, entropy)
    while True:
        request = _receive(conn)
        if "arrays" not in request:
            return                              # asked to stop, or the parent is gone
        try:
            fields, arrays = serve(request, k)
            _send(conn, arrays, fields=fields)
        except Exception as e:                  # reported to the parent, which raises it
            try:
                conn.send_bytes(json.dumps({"error": f"{type(e).__name__}: {e}"}).encode())
            except OSError:
                return
