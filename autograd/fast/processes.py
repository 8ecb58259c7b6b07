"""nn.batch_parallel's twin: a model whose every call splits its batch over forked processes.

    with nn.batch_parallel(model) as net:
        loss = mse_loss(net(x, t), eps)     # forward: each process takes a slice of the batch
        loss.backward()                     # backward: each slice's gradients, summed into p.grad

Why processes, when the kernels already have threads (threads.py)? Python
threads share one interpreter lock. NumPy lets go of it inside each call,
but every call must take it back, and two threads that each make thousands
of calls a step keep waiting for each other. Two processes share nothing of
the kind.

It works because nothing in a UNet mixes the images of a batch (group norm,
attention and convolution all work image by image), so the batch can be cut
anywhere: the forward of a slice is that slice of the forward, and since
dL/dy of the whole output is known once the loss is, each slice's backward
gives that slice's part of every parameter's gradient, and the parts add up
to the whole batch's. The results equal one process's to float32 rounding
(OpenBLAS may pick other kernels for narrower products, and the sums over
the batch are added in another order). Random draws inside the model differ:
each process has generators of its own for dropout's masks, seeded at each
call from this process's global generator, so a run that saves that
generator's state repeats them.

To the graph the split call is one op (`_SplitCall`) whose inputs are the
model's input and its parameters: its forward runs slice 0 here, with a
graph of its own, while the children run theirs and keep their graphs; its
backward sends each child its slice of dL/dy, runs slice 0's backward here,
and returns the parameters' gradients, the sum of all slices'. Under
no_grad() a call is only the forward.

How: entering the block moves the parameters into memory shared with the
children (an optimizer step here is what the children compute with next;
update them in place, never replace them), then forks processes - 1
children (Linux only; elsewhere, on a GPU, or with one process, `net` is the
model itself). How many processes: as many as the fast kernels have threads,
or AUTOGRAD_PROCESSES from the environment (1 turns the split off; the
tinyddpm commands' name for it, TINYDDPM_PROCESSES, works too). A call
cuts every argument along axis 0 into nearly equal slices and sends slices
1.. to the children through pipes (raw bytes and a small JSON header:
nothing is pickled). Each process runs its kernels on one thread, so the
parent's thread count is 1 inside the block and restored after it. The
children leave the parent's process group, so that Ctrl-C or a SIGTERM to
the group reaches the parent alone (which ends the block and with it the
children), and exit when their pipe closes, so a parent that dies takes
them with it. A child that fails or dies ends the call with WorkerError,
after which the block runs unsplit.
"""
import atexit
import contextlib
import json
import mmap
import multiprocessing
import multiprocessing.util  # noqa: F401  (registers its exit handler before ours: see below)
import os
import signal
import sys
import weakref

import numpy as np

from .. import backend, nn
from ..tensor import Function, Tensor, is_grad_enabled, no_grad
from . import threads

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
    """Forked children and the pipes to them."""

    def __init__(self, processes):
        if processes is not None and (not isinstance(processes, int) or isinstance(processes, bool)
                                      or processes < 1):
            raise ValueError(f"processes must be an integer >= 1, got {processes!r}")
        self.processes = processes if processes is not None else default_processes()
        self.device = "cpu"
        self.children = []          # (process, connection) per child
        self.threads_before = None  # the kernels' thread count before the block (when it forked)
        self.set_cores = False      # whether this block set _cores (the outermost one does)

    def _start(self, serve):
        """Fork processes - 1 children, child k running serve(request, k) on each request."""
        global _cores
        if self.children:
            raise RuntimeError(f"{type(self).__name__}: this block is already open")
        self.threads_before = threads.num_threads()
        self.set_cores = _cores is None
        if self.set_cores:
            _cores = self.threads_before
        # set_num_threads(1) ends the kernel pool's threads; OpenBLAS may keep one of
        # its own, idle: the children run only NumPy and our kernels, whose locks
        # (threads.py's, through os.register_at_fork) start free after a fork.
        threads.set_num_threads(1)
        # Children start with generators of their own (_fork_global_rngs), not copies of
        # this one's; a call that records a graph reseeds them (see _forward).
        entropy = int(np.random.SeedSequence().entropy)
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
            threads.set_num_threads(self.threads_before)
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
            raise ValueError("a split model needs at least one argument with a batch axis")
        if any(not isinstance(a, np.ndarray) or a.ndim == 0 for a in arrays):
            return None                         # CuPy arrays, or no batch axis: not split
        batch = arrays[0].shape[0]
        if any(a.shape[0] != batch for a in arrays):
            raise ValueError(f"a split model needs the same batch size on axis 0 of every "
                             f"argument, got {[a.shape for a in arrays]}")
        parts = min(len(self.children) + 1, batch)
        if parts < 2:
            return None
        # Slice k of every argument: rows bounds[k]:bounds[k+1], sizes differing by at most one.
        return arrays, [batch * k // parts for k in range(parts + 1)]

    def _exchange(self, requests, own_work):
        """Send child k its request (arrays, fields) for each k in `requests`, run own_work()
        here meanwhile, and collect the children's replies: (own result, {k: reply}).

        If own_work raises, the replies are still read before the error goes on, so
        that the next call does not read this one's. If the exchange is cut short
        (Ctrl-C while waiting, a broken pipe mid-message) or a child failed, the
        children are stopped and later calls run here, unsplit.
        """
        replies, asked, drained = {}, [], False
        try:
            for k, (arrays, fields) in requests.items():
                conn = self.children[k - 1][1]
                try:
                    _send(conn, arrays, fields=fields)
                    asked.append((k, conn))
                except OSError:
                    replies[k] = dict(_EXITED)
            try:
                own = own_work()
            finally:
                for k, conn in asked:
                    replies[k] = _receive(conn)
                drained = True
        except BaseException:
            if not drained:
                self._stop_children()
            raise
        failed = [k for k in sorted(replies) if "error" in replies[k]]
        if failed:
            self._stop_children()
            k = failed[0]
            raise WorkerError(f"the worker process for slice {k} of the batch failed "
                              f"({replies[k]['error']})")
        return own, replies

    def _stop_children(self):
        self._close(wait=0)
        self._restore_threads()


_EXITED = {"error": "it exited: killed, or out of memory?"}


class WorkerError(nn.BatchParallelError):
    """A worker process failed or died during a split call (the message says which)."""


def batch_parallel(model):
    """nn.batch_parallel's twin: a SplitModel on a CPU with several cores, else the model."""
    params = model.parameters()
    on_cpu = all(p.device == "cpu" for p in params)
    processes = default_processes()
    if not on_cpu or processes < 2 or not _can_fork():
        return contextlib.nullcontext(model)
    return SplitModel(model, processes)


class SplitModel(_Workers):
    """A context manager around `model`; inside it, calls split their batch over processes.

    model: a Module called as model(*args), every argument (Tensors or arrays)
        with the batch on axis 0, returning a Tensor with the batch on axis 0.
        Its parameters must share one dtype.
    processes: how many processes share each call, this one included.
    """

    def __init__(self, model, processes=None):
        super().__init__(processes)
        self.model = model
        self.params = model.parameters()
        self.shared = None            # the parameters' shared views while the block is open
        self.child_grads = None       # (children, n) shared array: child k's gradients in row k - 1
        self.calls = 0                # graph-recording calls so far: each one's number names it
        self.released = []            # calls whose graphs the children may drop (sent with the next request)
        self.pending = {}             # in a child: call number -> its slice's output, graph attached

    def __enter__(self):
        if self.processes > 1 and _can_fork():
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

    def __call__(self, *args):
        split = self._slices(args)
        if split is None:
            return self.model(*args)
        for i, (p, view) in enumerate(zip(self.params, self.shared)):
            if p.data is not view:
                raise RuntimeError(f"parameter {i} {tuple(p.shape)} was replaced inside a split "
                                   "block; update it in place: the worker processes read the shared copy")
        if any(isinstance(a, Tensor) and a.requires_grad for a in args):
            raise ValueError("a split model cannot send gradients back to its inputs; "
                             "call it on inputs that do not require grad")
        with_grad = is_grad_enabled() and any(p.requires_grad for p in self.params)
        if not with_grad:
            return Tensor(self._forward(args, split, with_grad=False)[0])
        x = args[0] if isinstance(args[0], Tensor) else Tensor(args[0])
        self.calls += 1
        return _SplitCall(self, args, split, self.calls)(x, *self.params)

    def _release(self, call):
        """The graph op of `call` is gone (after its backward, or never used): the children
        drop their part of its graph at their next request."""
        self.released.append(call)

    def _forward(self, args, split, with_grad, call=None):
        """(the whole batch's output array, this process's output Tensor of slice 0)."""
        arrays, bounds = split
        # With a graph to record (training), the children's dropout masks are seeded from
        # this process's global generator, whose state a checkpoint saves, so a resumed
        # run draws them again. Without (sampling, in eval mode), nothing is drawn here.
        seed = int(backend.global_rng(self.device).integers(2 ** 63)) if with_grad else None
        tensors = [isinstance(a, Tensor) for a in args]
        released, self.released = self.released, []
        requests = {k: ([a[bounds[k]:bounds[k + 1]] for a in arrays],
                        {"op": "forward", "grad": with_grad, "seed": seed, "tensors": tensors,
                         "call": call, "release": released})
                    for k in range(1, len(bounds) - 1)}
        own_args = [Tensor(a[:bounds[1]]) if t else a[:bounds[1]] for a, t in zip(arrays, tensors)]
        own, replies = self._exchange(requests, lambda: self.model(*own_args))
        out = np.empty((bounds[-1],) + own.shape[1:], dtype=own.dtype)
        out[:bounds[1]] = own.data
        for k, reply in replies.items():
            part = reply["arrays"][0]
            expected = (bounds[k + 1] - bounds[k],) + own.shape[1:]
            if part.shape != expected:
                raise WorkerError(f"the worker process for slice {k} returned shape {part.shape}, "
                                  f"expected {expected}")
            out[bounds[k]:bounds[k + 1]] = part
        return out, own

    def _backward(self, grad, bounds, own, call):
        """The parameters' gradients for dL/dy = grad of the whole batch, one per parameter."""
        requests = {k: ([grad[bounds[k]:bounds[k + 1]]], {"op": "backward", "call": call})
                    for k in range(1, len(bounds) - 1)}

        def own_work():
            # Slice 0's gradients, apart from whatever .grad already holds.
            kept = [p.grad for p in self.params]
            for p in self.params:
                p.grad = None
            try:
                own.backward(grad[:bounds[1]])
                return [p.grad for p in self.params]
            finally:
                for p, g in zip(self.params, kept):
                    p.grad = g

        grads, replies = self._exchange(requests, own_work)
        grads = list(grads)
        for k in sorted(replies):                       # in order: the same sums every time
            row = self.child_grads[k - 1]
            for i, (has_grad, (p, view)) in enumerate(zip(replies[k]["has_grad"],
                                                          zip(self.params, self.shared))):
                if not has_grad:
                    continue
                offset = self._offsets[i]
                g = row[offset:offset + view.size].reshape(view.shape)
                grads[i] = g.copy() if grads[i] is None else grads[i] + g
        return grads

    def _serve(self, request, k):
        """Child k: the forward of its slice (keeping its graph under the call's number), or the
        backward of the graph of a call."""
        if request["op"] == "forward":
            for call in request["release"]:
                self.pending.pop(call, None)
            if request["seed"] is not None:
                backend.seed_global_rng([request["seed"], k], self.device)
            args = [Tensor(a) if t else a for a, t in zip(request["arrays"], request["tensors"])]
            if request["grad"]:
                out = self.model(*args)
                self.pending[request["call"]] = out
            else:
                with no_grad():
                    out = self.model(*args)
            return {}, [out.data]
        out = self.pending.pop(request["call"], None)
        if out is None:
            raise RuntimeError(f"backward of call {request['call']}, whose forward this slice did not keep")
        for p in self.params:
            p.grad = None
        out.backward(request["arrays"][0])
        row = self.child_grads[k - 1]
        for p, offset in zip(self.params, self._offsets):
            if p.grad is not None:
                row[offset:offset + p.size] = p.grad.ravel()
        has_grad = [p.grad is not None for p in self.params]
        for p in self.params:
            p.grad = None
        return {"has_grad": has_grad}, []

    def _share_parameters(self):
        dtypes = {p.dtype for p in self.params}
        if len(dtypes) != 1:
            raise ValueError(f"a split model's parameters must share one dtype, got {sorted(map(str, dtypes))}")
        dtype = np.dtype(dtypes.pop())
        n = sum(p.size for p in self.params)
        values = _shared_array(n, dtype)
        self.child_grads = _shared_array((self.processes - 1) * n, dtype).reshape(self.processes - 1, n)
        self.shared, self._offsets, offset = [], [], 0
        for p in self.params:
            view = values[offset:offset + p.size].reshape(p.shape)
            view[...] = p.data
            p.data = view
            self.shared.append(view)
            self._offsets.append(offset)
            offset += view.size

    def _unshare_parameters(self):
        if self.shared is not None:
            for p, view in zip(self.params, self.shared):
                if p.data is view:
                    p.data = view.copy()    # private again: the shared mapping can go
            self.shared = self.child_grads = None


class _SplitCall(Function):
    """One split call of a model as one op of the graph: inputs (x, *parameters).

    Its number, `call`, names the children's parts of its graph, so that a
    model called more than once in a graph gets each call's backward right.
    """

    def __init__(self, split, args, slices, call):
        self.split, self.args, self.slices, self.call = split, args, slices, call
        # However this op ends (backward done, or dropped unused), the children may then forget it.
        weakref.finalize(self, split._release, call)

    def forward(self, x, *params):
        out, self.own = self.split._forward(self.args, self.slices, with_grad=True, call=self.call)
        return out

    def backward(self, grad):
        grads = self.split._backward(grad, self.slices[1], self.own, self.call)
        self.own = None
        return (None,) + tuple(grads)


def default_processes():
    """AUTOGRAD_PROCESSES (or TINYDDPM_PROCESSES) from the environment (1: no split), else as
    many processes as the fast kernels have threads."""
    name = next((n for n in ("AUTOGRAD_PROCESSES", "TINYDDPM_PROCESSES") if n in os.environ), None)
    if name is not None:
        value = os.environ[name]
        if not value.strip().isdigit() or int(value) < 1:
            raise nn.BatchParallelError(f"{name} must be an integer >= 1, got {value!r}")
        return int(value)
    return _cores or threads.num_threads()


def _can_fork():
    # Forking a process that runs other libraries' threads is only dependable
    # on Linux (macOS's system libraries are not fork-safe, Windows cannot fork).
    return sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()


def _shared_array(n, dtype):
    """n values in anonymous memory that forked children share (MAP_SHARED), zeroed."""
    size = max(1, n * dtype.itemsize)
    return np.frombuffer(mmap.mmap(-1, size), dtype=dtype, count=n)


def _fork_global_rngs(k, entropy):
    """In forked child k: global generators of its own, not copies of the parent's."""
    backend.manual_seed(int(np.random.SeedSequence([entropy, k]).generate_state(1)[0]))


# =============================================================================
# The pipe: a JSON header, then each array's raw bytes (no pickle either way)
# =============================================================================

def _send(conn, arrays, fields=None):
    """A header (fields, and each array's dtype and shape) and then the arrays."""
    arrays = [np.ascontiguousarray(a) for a in arrays]
    header = dict(fields or {}, arrays=[[a.dtype.str, list(a.shape)] for a in arrays])
    conn.send_bytes(json.dumps(header).encode())
    for a in arrays:
        conn.send_bytes(a)


def _receive(conn):
    """The header (a dict) with its arrays under "arrays", {} for a request to stop,
    or {"error": ...} for a child gone."""
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
    threads.set_num_threads(1)
    _fork_global_rngs(k, entropy)
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
