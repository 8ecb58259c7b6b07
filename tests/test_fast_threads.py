"""The fast CPU kernels' thread pool (autograd/fast/threads.py), and the kernels on it.

The pool must run every chunk exactly once, pass errors on, never deadlock,
and hold the BLAS at one thread. Every chunked kernel (fast/conv_cpu.py,
norm_cpu.py, attention.py) must give the same numbers, bit for bit, whatever
the number of threads and whichever thread ran which chunk. (Equal to the
plain kernels: tests/test_fast_conv_cpu.py, test_fast_norm_cpu.py, and the
attention tests at the end here.) Last, the host memory settings the pool
makes at its first loop (fast/memory.py).
"""
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from autograd.fast import attention as fast_attention, conv_cpu, memory, norm_cpu, threads
from autograd.kernels import attention as plain_attention
from fast_helpers import (CONV_CASES, CONV_IDS, assert_all_equal, conv_arrays, fast_on,  # noqa: F401
                          images_per_chunk, needs_threadpoolctl, set_threads)


# =============================================================================
# The pool
# =============================================================================

@pytest.mark.parametrize("n_threads", [1, 2, 3])
@pytest.mark.parametrize("n", [0, 1, 2, 7, 100])
def test_parallel_for_runs_each_index_once(n, n_threads, set_threads):
    if n_threads > 1 and threads._blas() is None:
        pytest.skip("threadpoolctl cannot steer this NumPy's BLAS")
    set_threads(n_threads)
    seen, workers, lock = [], set(), threading.Lock()

    def body(i, worker):
        with lock:
            seen.append(i)
            workers.add(worker)

    threads.parallel_for(n, body)
    assert sorted(seen) == list(range(n))
    assert workers <= set(range(n_threads))


@needs_threadpoolctl
def test_parallel_for_raises_the_bodys_error_and_the_pool_works_after_it(set_threads):
    set_threads(2)
    done = []

    def body(i, worker):
        if i == 3:
            raise ValueError("chunk 3 is bad")
        done.append(i)

    with pytest.raises(ValueError, match="chunk 3 is bad"):
        threads.parallel_for(50, body)
    assert 3 not in done
    out = np.zeros(10)
    threads.parallel_for(10, lambda i, w: out.__setitem__(i, i))
    np.testing.assert_array_equal(out, np.arange(10))


@needs_threadpoolctl
def test_nested_parallel_for_runs_in_order_instead_of_deadlocking(set_threads):
    set_threads(2)
    out = np.zeros((4, 5))

    def outer(i, worker):
        threads.parallel_for(5, lambda j, w: out.__setitem__((i, j), 10 * i + j))

    threads.parallel_for(4, outer)
    np.testing.assert_array_equal(out, 10 * np.arange(4)[:, None] + np.arange(5))


@needs_threadpoolctl
@pytest.mark.parametrize("n_threads", [1, 2])
def test_blas_is_held_at_one_thread_and_given_back(n_threads, set_threads):
    libs = threads._blas().lib_controllers
    threads.release_blas()
    before = [lib.num_threads for lib in libs]
    set_threads(n_threads)
    threads.parallel_for(4, lambda i, w: None)
    assert [lib.num_threads for lib in libs] == [1] * len(libs)
    threads.release_blas()
    assert [lib.num_threads for lib in libs] == before


@needs_threadpoolctl
def test_set_num_threads_inside_a_loop_is_refused_not_a_deadlock(set_threads):
    set_threads(2)
    seen = []

    def body(i, worker):
        with pytest.raises(RuntimeError, match="while a parallel loop runs"):
            threads.set_num_threads(1)
        seen.append(i)

    threads.parallel_for(3, body)
    assert sorted(seen) == [0, 1, 2]


@needs_threadpoolctl
def test_the_caller_does_not_wait_for_a_pool_thread_that_has_not_started(set_threads, monkeypatch):
    """A pool thread that is late (here: busy until released) must not hold up
    the loop: the caller takes every chunk itself and returns; the late thread,
    when it comes, finds nothing left and runs no chunk of the finished loop."""
    set_threads(2)
    late = ThreadPoolExecutor(1)
    release = threading.Event()
    late.submit(release.wait)                  # its only thread is busy until release.set()
    monkeypatch.setattr(threads, "_pool", late)
    calls, workers = [], set()

    def body(i, worker):
        calls.append(i)
        workers.add(worker)

    done = threading.Event()
    caller = threading.Thread(target=lambda: (threads.parallel_for(6, body), done.set()))
    caller.start()
    finished = done.wait(timeout=30)
    release.set()                              # the late thread now runs the loop's leftover task
    caller.join(timeout=30)
    late.shutdown(wait=True)
    monkeypatch.setattr(threads, "_pool", None)
    assert finished, "parallel_for waited for a pool thread that never took a chunk"
    assert sorted(calls) == list(range(6)) and workers == {0}


@needs_threadpoolctl
def test_a_pool_that_takes_no_more_work_leaves_the_caller_to_do_it(set_threads, monkeypatch):
    """At interpreter shutdown (atexit, a thread still running) the executor
    refuses new tasks; the calling thread then runs every chunk itself."""
    set_threads(2)
    closed = ThreadPoolExecutor(1)
    closed.shutdown()
    monkeypatch.setattr(threads, "_pool", closed)
    out = np.zeros(9)
    threads.parallel_for(9, lambda i, w: out.__setitem__(i, i + 1))
    np.testing.assert_array_equal(out, np.arange(1, 10))
    monkeypatch.setattr(threads, "_pool", None)


@needs_threadpoolctl
def test_a_thread_count_changed_just_before_the_loop_takes_its_lock_is_respected(set_threads, monkeypatch):
    """set_num_threads(1) from another thread can land between parallel_for's
    first look at the count and its taking the lock: the count read under the
    lock decides (here: run in order), never a pool of zero workers."""
    set_threads(2)
    monkeypatch.setattr(threads, "_pool", None)
    monkeypatch.setattr(threads, "_hold_blas", lambda: None)     # it reads the count too
    counts = iter([2])                  # the first look sees 2; every later one sees 1
    monkeypatch.setattr(threads, "num_threads", lambda: next(counts, 1))
    workers = set()
    out = np.zeros(5)

    def body(i, worker):
        workers.add(worker)
        out[i] = i + 1

    threads.parallel_for(5, body)
    np.testing.assert_array_equal(out, np.arange(1, 6))
    assert workers == {0}
    assert not threads._busy.locked()


def test_default_threads_never_exceed_the_cpus_this_process_may_use(monkeypatch):
    monkeypatch.setattr(threads, "_threads", None)
    n = threads.num_threads()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert 1 <= n <= cpus


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2", None])
def test_set_num_threads_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="number of threads must be an integer >= 1"):
        threads.set_num_threads(bad)


def test_scratch_makes_one_buffer_per_worker():
    made = []
    s = threads.Scratch(lambda: made.append(1) or np.zeros(3))
    assert s[0] is s[0] and s[1] is not s[0]
    assert len(made) == 2


@needs_threadpoolctl
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_makes_its_own_pool(set_threads):
    set_threads(2)
    threads.parallel_for(4, lambda i, w: None)           # the parent's pool exists now
    pid = os.fork()
    if pid == 0:                                         # child: the pool must work, not hang
        out = np.zeros(8)
        threads.parallel_for(8, lambda i, w: out.__setitem__(i, i))
        os._exit(0 if out.tolist() == list(range(8)) else 1)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail("the forked child's parallel_for hung (it waited on the parent's threads)")


# =============================================================================
# The chunked kernels: one thread == several threads, bit for bit
# =============================================================================

def _conv_all(x, w, b, stride, padding, g):
    y = conv_cpu.conv2d_forward(x, w, b, stride, padding)
    return (y,) + conv_cpu.conv2d_backward(g, x, w, stride, padding, True, True, b is not None)


@needs_threadpoolctl
@pytest.mark.parametrize("per_chunk", [1, 4])
@pytest.mark.parametrize("x_shape, w_shape, stride, padding, bias", CONV_CASES, ids=CONV_IDS)
def test_conv_kernels_give_the_same_bits_on_any_number_of_threads(x_shape, w_shape, stride, padding,
                                                                  bias, per_chunk, set_threads, monkeypatch):
    x, w, b, g = conv_arrays(x_shape, w_shape, stride, padding, bias)
    images_per_chunk(monkeypatch, per_chunk)
    set_threads(1)
    one = _conv_all(x, w, b, stride, padding, g)
    for n in (2, 3):
        set_threads(n)
        assert_all_equal(_conv_all(x, w, b, stride, padding, g), one)


@needs_threadpoolctl
@pytest.mark.parametrize("per_chunk", [1, 4])
@pytest.mark.parametrize("scale", [1, 2, 3])
def test_upsample_kernels_give_the_same_bits_on_any_number_of_threads(scale, per_chunk, set_threads,
                                                                      monkeypatch):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((7, 3, 4, 5))
    g = rng.standard_normal((7, 3, 4 * scale, 5 * scale))
    images_per_chunk(monkeypatch, per_chunk)

    def run():
        return (conv_cpu.upsample_nearest2d_forward(x, scale), conv_cpu.upsample_nearest2d_backward(g, scale))

    set_threads(1)
    one = run()
    set_threads(3)
    assert_all_equal(run(), one)


@needs_threadpoolctl
@pytest.mark.parametrize("per_chunk", [1, 4])
@pytest.mark.parametrize("silu", [False, True])
def test_group_norm_kernels_give_the_same_bits_on_any_number_of_threads(silu, per_chunk, set_threads,
                                                                        monkeypatch):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((9, 8, 5, 5))
    w, b = rng.standard_normal(8), rng.standard_normal(8)
    g = rng.standard_normal(x.shape)

    def run(keep_u=True):
        y, mean, rstd, u = norm_cpu.group_norm_fused_forward(x, 4, w, b, 1e-5, silu=silu, keep_u=keep_u)
        if not keep_u:
            return y, mean, rstd
        return (y, mean, rstd) + norm_cpu.group_norm_fused_backward(g, x, mean, rstd, 4, w,
                                                                     y if silu else None, u)

    images_per_chunk(monkeypatch, per_chunk)
    set_threads(1)
    one = run()
    set_threads(3)
    assert_all_equal(run(), one)
    assert_all_equal(run(keep_u=False), one[:3])     # sampling: u in per-thread scratch buffers


def _attention_all(q, k, v, g):
    out, p = fast_attention.attention_forward(q, k, v)
    return (out, p) + fast_attention.attention_backward(g, q, k, v, p)


def _attention_inputs(seed, B, Nq, Nk, d, dv):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((B, Nq, d)), rng.standard_normal((B, Nk, d)),
            rng.standard_normal((B, Nk, dv)), rng.standard_normal((B, Nq, dv)))


@needs_threadpoolctl
@pytest.mark.parametrize("per_chunk", [1, 4])
def test_attention_kernels_give_the_same_bits_on_any_number_of_threads_and_the_plain_numbers(
        per_chunk, set_threads, monkeypatch):
    q, k, v, g = _attention_inputs(5, 9, 5, 6, 4, 3)
    images_per_chunk(monkeypatch, per_chunk)
    set_threads(1)
    one = _attention_all(q, k, v, g)
    set_threads(3)
    assert_all_equal(_attention_all(q, k, v, g), one)
    out, p = plain_attention.attention_forward.plain(q, k, v)
    plain = (out, p) + plain_attention.attention_backward.plain(g, q, k, v, p)
    for name, a, e in zip(["out", "P", "dq", "dk", "dv"], one, plain):
        np.testing.assert_allclose(a, e, rtol=1e-12, atol=1e-14, err_msg=name)


@needs_threadpoolctl
def test_attention_small_enough_for_one_chunk_is_split_in_two(set_threads, monkeypatch):
    """A batch whose weights fit one chunk but are worth two threads (256 KB or
    more) goes in two halves, with the numbers of one chunk."""
    q, k, v, g = _attention_inputs(6, 5, 100, 90, 8, 3)          # weights 5 x 100 x 90 x 8 B = 360 KB
    assert fast_attention._chunks(q, k) == (3, 2)
    assert fast_attention._chunks(q[:, :20], k) == (5, 1)        # 72 KB: one chunk
    set_threads(2)
    split = _attention_all(q, k, v, g)
    monkeypatch.setitem(fast_attention._CHUNK_BYTES, "cpu", 1 << 40)     # one chunk, too large to split
    assert fast_attention._chunks(q, k) == (5, 1)
    assert_all_equal(split, _attention_all(q, k, v, g))


@needs_threadpoolctl
def test_unet_gradients_are_the_same_for_any_number_of_threads(set_threads, fast_on, monkeypatch):
    """The whole training step's arithmetic, not only each kernel: one thread
    and three give equal bits (every product runs on one BLAS thread)."""
    from autograd import Tensor
    import autograd.functional as F
    from tinyddpm.unet import PRESETS, UNet

    monkeypatch.setattr(conv_cpu, "_CHUNK_BYTES", 64 << 10)      # several chunks even at batch 4
    monkeypatch.setattr(norm_cpu, "_CHUNK_BYTES", 8 << 10)
    rng = np.random.default_rng(4)
    model = UNet(**PRESETS["mnist-tiny"])
    for p in model.parameters():          # off the zero init, so that every branch carries gradient
        p.data[...] = (rng.standard_normal(p.shape) * 0.05).astype(p.dtype)
    x = rng.standard_normal((4, 1, 28, 28)).astype(np.float32)
    t = np.array([1, 250, 500, 999])
    eps = rng.standard_normal(x.shape).astype(np.float32)

    def grads():
        for p in model.parameters():
            p.grad = None
        F.mse_loss(model(Tensor(x), t), Tensor(eps)).backward()
        return [p.grad.copy() for p in model.parameters()]

    set_threads(1)
    one = grads()
    set_threads(3)
    assert_all_equal(grads(), one)


# =============================================================================
# Host memory (fast/memory.py), set up by the pool's first loop
# =============================================================================

def _glibc():
    try:
        return bool(os.confstr("CS_GNU_LIBC_VERSION"))
    except (ValueError, OSError, AttributeError):
        return False


@pytest.mark.skipif(not _glibc(), reason="glibc's malloc only")
def test_freed_host_memory_is_reused_after_the_first_kernel_loop():
    """Two 8 MB arrays made and dropped again and again: with glibc's defaults
    each round lands on fresh pages (thousands of page faults); once the
    kernels have asked malloc to keep freed memory, the pages are reused."""
    import resource

    threads.parallel_for(2, lambda i, w: None)
    assert memory.keep_freed_host_memory() is True

    def faults_per_round(rounds=20):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(rounds):
            a, b = np.ones(2 << 20, np.float32), np.ones(2 << 20, np.float32)   # 8 MB each
            del a, b
        return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / rounds

    faults_per_round(3)                       # the heap grows once
    assert faults_per_round() < 100           # 4096 per round when each array is a fresh mapping


@pytest.mark.skipif(not _glibc(), reason="glibc's malloc only")
@pytest.mark.parametrize("setting, applied", [("default", "False"), ("", "True")])
def test_tinyddpm_malloc_default_leaves_glibc_alone(setting, applied):
    code = "from autograd.fast import memory; print(memory.keep_freed_host_memory())"
    env = dict(os.environ, TINYDDPM_MALLOC=setting)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), check=True)
    assert out.stdout.strip() == applied
