"""The CPU kernels' thread pool (autograd/parallel.py) and the kernels that use it.

Every chunked kernel must give the same numbers, bit for bit, whatever the
number of threads and whichever thread ran which chunk, and the same as its
reference version; the pool must run every chunk exactly once and pass on
errors.
"""
import threading

import numpy as np
import pytest

from autograd import parallel
from autograd.kernels import conv as conv_k
from autograd.kernels import norm as norm_k

needs_threadpoolctl = pytest.mark.skipif(parallel._blas() is None,
                                         reason="threadpoolctl cannot steer this NumPy's BLAS")


@pytest.fixture
def threads():
    """Set the pool's threads inside a test; the previous setting comes back after it."""
    before = parallel.num_threads()
    yield parallel.set_num_threads
    parallel.set_num_threads(before)


@pytest.mark.parametrize("n_threads", [1, 2, 3])
@pytest.mark.parametrize("n", [0, 1, 2, 7, 100])
def test_parallel_for_runs_each_index_once(n, n_threads, threads):
    if n_threads > 1 and parallel._blas() is None:
        pytest.skip("threadpoolctl cannot steer this NumPy's BLAS")
    threads(n_threads)
    seen, lock = [], threading.Lock()
    workers = set()

    def body(i, worker):
        with lock:
            seen.append(i)
            workers.add(worker)

    parallel.parallel_for(n, body)
    assert sorted(seen) == list(range(n))
    assert workers <= set(range(n_threads))


@needs_threadpoolctl
def test_parallel_for_raises_the_bodys_error_after_all_threads_stop(threads):
    threads(2)
    done = []

    def body(i, worker):
        if i == 3:
            raise ValueError("chunk 3 is bad")
        done.append(i)

    with pytest.raises(ValueError, match="chunk 3 is bad"):
        parallel.parallel_for(50, body)
    assert 3 not in done
    # The pool is usable again afterwards.
    out = np.zeros(10)
    parallel.parallel_for(10, lambda i, w: out.__setitem__(i, i))
    np.testing.assert_array_equal(out, np.arange(10))


@needs_threadpoolctl
def test_nested_parallel_for_runs_in_order_instead_of_deadlocking(threads):
    threads(2)
    out = np.zeros((4, 5))

    def outer(i, worker):
        parallel.parallel_for(5, lambda j, w: out.__setitem__((i, j), 10 * i + j))

    parallel.parallel_for(4, outer)
    np.testing.assert_array_equal(out, 10 * np.arange(4)[:, None] + np.arange(5))


@needs_threadpoolctl
@pytest.mark.parametrize("n_threads", [1, 2])
def test_blas_is_held_at_one_thread_and_given_back(n_threads, threads):
    libs = parallel._blas().lib_controllers
    parallel.release_blas()
    before = [lib.num_threads for lib in libs]
    threads(n_threads)
    parallel.parallel_for(4, lambda i, w: None)
    assert [lib.num_threads for lib in libs] == [1] * len(libs)
    parallel.release_blas()
    assert [lib.num_threads for lib in libs] == before


@needs_threadpoolctl
def test_set_num_threads_inside_a_loop_is_refused_not_a_deadlock(threads):
    threads(2)
    seen = []

    def body(i, worker):
        with pytest.raises(RuntimeError, match="while a parallel loop runs"):
            parallel.set_num_threads(1)
        seen.append(i)

    parallel.parallel_for(3, body)
    assert sorted(seen) == [0, 1, 2]


@needs_threadpoolctl
def test_the_caller_does_not_wait_for_a_pool_thread_that_has_not_started(threads, monkeypatch):
    """A pool thread that is late (here: busy until released) must not hold up
    the loop: the caller takes every chunk itself and returns; the late thread,
    when it comes, finds nothing left and runs no chunk of the finished loop."""
    from concurrent.futures import ThreadPoolExecutor
    threads(2)
    late = ThreadPoolExecutor(1)
    release = threading.Event()
    late.submit(release.wait)                  # its only thread is busy until release.set()
    monkeypatch.setattr(parallel, "_pool", late)
    calls, workers = [], set()

    def body(i, worker):
        calls.append(i)
        workers.add(worker)

    done = threading.Event()
    caller = threading.Thread(target=lambda: (parallel.parallel_for(6, body), done.set()))
    caller.start()
    finished = done.wait(timeout=30)
    release.set()                              # the late thread now runs the loop's leftover task
    caller.join(timeout=30)
    late.shutdown(wait=True)
    monkeypatch.setattr(parallel, "_pool", None)
    assert finished, "parallel_for waited for a pool thread that never took a chunk"
    assert sorted(calls) == list(range(6)) and workers == {0}


@needs_threadpoolctl
def test_a_pool_that_takes_no_more_work_leaves_the_caller_to_do_it(threads, monkeypatch):
    """At interpreter shutdown (atexit, a thread still running) the executor
    refuses new tasks; the calling thread then runs every chunk itself."""
    from concurrent.futures import ThreadPoolExecutor
    threads(2)
    closed = ThreadPoolExecutor(1)
    closed.shutdown()
    monkeypatch.setattr(parallel, "_pool", closed)
    out = np.zeros(9)
    parallel.parallel_for(9, lambda i, w: out.__setitem__(i, i + 1))
    np.testing.assert_array_equal(out, np.arange(1, 10))
    monkeypatch.setattr(parallel, "_pool", None)


@needs_threadpoolctl
def test_a_thread_count_changed_just_before_the_loop_takes_its_lock_is_respected(threads, monkeypatch):
    """set_num_threads(1) from another thread can land between parallel_for's
    first look at the count and its taking the lock: the count read under the
    lock decides (here: run in order), never a pool of zero workers."""
    threads(2)
    monkeypatch.setattr(parallel, "_pool", None)
    monkeypatch.setattr(parallel, "_hold_blas", lambda: None)   # it reads the count too
    counts = iter([2])                  # the first look sees 2; every later one sees 1
    monkeypatch.setattr(parallel, "num_threads", lambda: next(counts, 1))
    workers = set()
    out = np.zeros(5)

    def body(i, worker):
        workers.add(worker)
        out[i] = i + 1
    parallel.parallel_for(5, body)
    np.testing.assert_array_equal(out, np.arange(1, 6))
    assert workers == {0}
    assert not parallel._busy.locked()


def test_default_threads_never_exceed_the_cpus_this_process_may_use(monkeypatch):
    import os
    monkeypatch.setattr(parallel, "_threads", None)
    n = parallel.num_threads()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert 1 <= n <= cpus


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2", None])
def test_set_num_threads_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="number of threads must be an integer >= 1"):
        parallel.set_num_threads(bad)


def test_scratch_makes_one_buffer_per_worker():
    made = []
    s = parallel.Scratch(lambda: made.append(1) or np.zeros(3))
    assert s[0] is s[0] and s[1] is not s[0]
    assert len(made) == 2


# =============================================================================
# The chunked kernels: one thread == several threads, bit for bit, == reference
# =============================================================================

def images_per_chunk(monkeypatch, k):
    """Make every chunked kernel take k images (examples) per chunk: with a
    batch of 9 and k = 4 the last chunk is shorter, with k = 1 there are 9."""
    from autograd.kernels import attention as attn_k
    monkeypatch.setattr(conv_k, "_chunk", lambda B, *args: min(B, k))
    monkeypatch.setattr(norm_k, "_chunk", lambda x3: min(x3.shape[0], k))
    monkeypatch.setattr(attn_k, "_chunks", lambda q, kk: (min(q.shape[0], k), -(-q.shape[0] // k)))


CONV_CASES = [
    # x shape, w shape, stride, padding, with bias
    ((9, 4, 12, 12), (6, 4, 3, 3), 1, 1, True),      # im2col path; backward from dL/dy's patches
    ((9, 3, 7, 7), (4, 3, 3, 3), 1, 2, True),        # padding k - 1: output larger, dL/db summed apart
    ((9, 4, 12, 12), (6, 4, 5, 5), 1, 2, True),      # 5x5 "same"
    ((9, 12, 28, 28), (5, 12, 3, 3), 1, 1, True),    # shifted-output path (C_in >= 2 C_out, 28x28)
    ((9, 4, 13, 11), (6, 4, 3, 3), 2, 1, False),     # stride 2: strided adds for dL/dx
    ((9, 5, 9, 9), (3, 5, 3, 3), 2, 1, True),        # stride 2 with a bias (its row of ones)
    ((9, 3, 11, 10), (4, 3, 3, 2), 3, 1, False),     # stride 3, non-square: phases of 1 or 0 taps
    ((9, 6, 7, 7), (5, 6, 1, 1), 1, 0, True),        # 1x1: a matrix product per image
    ((9, 3, 8, 8), (4, 3, 3, 3), 1, 0, False),       # no padding
    ((9, 4, 10, 9), (5, 4, 3, 2), 1, 1, True),       # non-square kernel: dL/dx by strided adds
    ((9, 3, 6, 6), (4, 3, 3, 3), 1, 3, False),       # padding > k - 1: dL/dx by strided adds
    ((9, 6, 8, 8), (5, 6, 1, 1), 2, 0, True),        # 1x1 with stride 2 (the im2col path)
    ((1, 4, 12, 12), (6, 4, 3, 3), 1, 1, True),      # a batch of one
    ((9, 12, 30, 32), (5, 12, 3, 3), 1, 0, False),   # shifted-output path, non-square, no padding
]


def _conv_all(x, w, b, stride, padding, g):
    y = conv_k.conv2d_forward(x, w, stride, padding, bias=b)
    return (y,) + conv_k.conv2d_backward(g, x, w, stride, padding, need_b=b is not None)


@needs_threadpoolctl
@pytest.mark.parametrize("per_chunk", [1, 4])
@pytest.mark.parametrize("x_shape, w_shape, stride, padding, bias", CONV_CASES)
def test_conv_kernels_agree_across_threads_and_with_reference(x_shape, w_shape, stride, padding,
                                                              bias, per_chunk, threads, monkeypatch):
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal(x_shape), rng.standard_normal(w_shape)
    b = rng.standard_normal(w_shape[0]) if bias else None
    Ho = conv_k.output_size(x_shape[2], w_shape[2], stride, padding)
    Wo = conv_k.output_size(x_shape[3], w_shape[3], stride, padding)
    g = rng.standard_normal((x_shape[0], w_shape[0], Ho, Wo))
    images_per_chunk(monkeypatch, per_chunk)
    threads(1)
    one = _conv_all(x, w, b, stride, padding, g)
    for n in (2, 3):
        threads(n)
        for a, e in zip(_conv_all(x, w, b, stride, padding, g), one):
            if e is None:
                assert a is None
            else:
                np.testing.assert_array_equal(a, e)
    # ... and the numbers are right: against the loop convolution and its adjoint.
    y, dx, dw, db = one
    expected = conv_k.conv2d_reference(x, w, stride, padding)
    if b is not None:
        expected = expected + b[:, None, None]
    np.testing.assert_allclose(y, expected, rtol=1e-10, atol=1e-10)
    # <g, conv(x, w)> is linear in x and in w, so its gradients are dx and dw exactly.
    eps = 1e-6
    dir_x, dir_w = rng.standard_normal(x.shape), rng.standard_normal(w.shape)
    f = lambda x_, w_: np.sum(g * conv_k.conv2d_reference(x_, w_, stride, padding))  # noqa: E731
    np.testing.assert_allclose(np.sum(dx * dir_x), (f(x + eps * dir_x, w) - f(x - eps * dir_x, w)) / (2 * eps),
                               rtol=1e-6)
    np.testing.assert_allclose(np.sum(dw * dir_w), (f(x, w + eps * dir_w) - f(x, w - eps * dir_w)) / (2 * eps),
                               rtol=1e-6)
    if b is not None:
        np.testing.assert_allclose(db, g.sum(axis=(0, 2, 3)), rtol=1e-12)
    # Asking for less gives the same arrays for what is asked.
    for need in ((True, False, False), (False, True, False), (False, False, True)):
        part = conv_k.conv2d_backward(g, x, w, stride, padding, *need)
        for got, full, asked in zip(part, (dx, dw, g.sum(axis=(0, 2, 3))), need):
            if asked:
                np.testing.assert_allclose(got, full, rtol=1e-12, atol=1e-12)
            else:
                assert got is None


@pytest.mark.parametrize("need, x_shape, w_shape, shared", [
    ((True, True, True), (2, 4, 12, 12), (6, 4, 3, 3), True),
    ((True, True, False), (2, 4, 12, 12), (6, 4, 3, 3), True),
    ((True, False, True), (2, 4, 12, 12), (6, 4, 3, 3), False),    # no dL/dw: dL/dx alone
    ((False, True, True), (2, 4, 12, 12), (6, 4, 3, 3), False),    # no dL/dx: x's patches
    ((True, True, True), (2, 4, 28, 28), (12, 4, 3, 3), False),    # dL/dx output-side (O >= 2 C at 28x28)
])
def test_backward_from_the_patches_of_dy_is_taken_when_both_gradients_are(need, x_shape, w_shape,
                                                                          shared, monkeypatch):
    calls = []
    real = conv_k._conv2d_backward_shared_patches
    monkeypatch.setattr(conv_k, "_conv2d_backward_shared_patches",
                        lambda *args: calls.append(1) or real(*args))
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal(x_shape), rng.standard_normal(w_shape)
    g = rng.standard_normal((x_shape[0], w_shape[0]) + x_shape[2:])
    got = conv_k.conv2d_backward(g, x, w, 1, 1, *need)
    assert bool(calls) == shared
    f = lambda w_: np.sum(g * conv_k.conv2d_reference(x, w_, 1, 1))  # noqa: E731
    if need[1]:
        d = rng.standard_normal(w.shape)
        np.testing.assert_allclose(np.sum(got[1] * d), (f(w + 1e-6 * d) - f(w - 1e-6 * d)) / 2e-6, rtol=1e-6)


@needs_threadpoolctl
@pytest.mark.parametrize("per_chunk", [1, 4])
@pytest.mark.parametrize("silu", [False, True])
def test_group_norm_kernels_agree_across_threads(silu, per_chunk, threads, monkeypatch):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((9, 8, 5, 5))
    w, b = rng.standard_normal(8), rng.standard_normal(8)
    g = rng.standard_normal(x.shape)

    def run():
        y, mean, rstd, u = norm_k.group_norm_fused_forward(x, 4, w, b, 1e-5, silu=silu)
        return (y, mean, rstd) + norm_k.group_norm_fused_backward(g, x, mean, rstd, 4, w, y, u)

    images_per_chunk(monkeypatch, per_chunk)
    threads(1)
    one = run()
    threads(3)
    for a, e in zip(run(), one):
        np.testing.assert_array_equal(a, e)
    # and against the plain formulas
    y_ref, xhat, rstd = norm_k.group_norm_forward(x, 4, w, b, 1e-5)
    if not silu:
        np.testing.assert_allclose(one[0], y_ref, rtol=1e-10, atol=1e-12)
        dx_ref, dw_ref, db_ref = norm_k.group_norm_backward(g, xhat, rstd, 4, w)
        for a, e in zip(one[3:], (dx_ref, dw_ref, db_ref)):
            np.testing.assert_allclose(a, e, rtol=1e-9, atol=1e-11)
    else:
        sig = 1 / (1 + np.exp(-y_ref))
        np.testing.assert_allclose(one[0], y_ref * sig, rtol=1e-10, atol=1e-12)
        dz = g * (sig + y_ref * sig * (1 - sig))                  # SiLU's derivative, then the group norm's
        dx_ref, dw_ref, db_ref = norm_k.group_norm_backward(dz, xhat, rstd, 4, w)
        for a, e in zip(one[3:], (dx_ref, dw_ref, db_ref)):
            np.testing.assert_allclose(a, e, rtol=1e-9, atol=1e-11)
        # keep_u=False (sampling) on several threads: the same output
        threads(3)
        y2 = norm_k.group_norm_fused_forward(x, 4, w, b, 1e-5, silu=True, keep_u=False)[0]
        np.testing.assert_array_equal(y2, one[0])


@needs_threadpoolctl
@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_a_forked_child_makes_its_own_pool(threads):
    import os
    threads(2)
    parallel.parallel_for(4, lambda i, w: None)          # the parent's pool exists now
    pid = os.fork()
    if pid == 0:                                         # child: the pool must work, not hang
        out = np.zeros(8)
        parallel.parallel_for(8, lambda i, w: out.__setitem__(i, i))
        os._exit(0 if out.tolist() == list(range(8)) else 1)
    import time
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


@needs_threadpoolctl
@pytest.mark.parametrize("per_chunk", [1, 4])
@pytest.mark.parametrize("scale", [1, 2, 3])
def test_upsample_kernels_match_references_for_any_threads(scale, per_chunk, threads, monkeypatch):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((7, 3, 4, 5))
    g = rng.standard_normal((7, 3, 4 * scale, 5 * scale))
    images_per_chunk(monkeypatch, per_chunk)
    for n in (1, 3):
        threads(n)
        np.testing.assert_array_equal(conv_k.upsample_nearest2d_forward(x, scale),
                                      conv_k.upsample_nearest2d_forward_reference(x, scale))
        np.testing.assert_allclose(conv_k.upsample_nearest2d_backward(g, scale),
                                   conv_k.upsample_nearest2d_backward_reference(g, scale), rtol=1e-12)
    # and the reference is what it says: pixel (i, j) comes from (i // scale, j // scale)
    y = conv_k.upsample_nearest2d_forward_reference(x, scale)
    i, j = np.arange(4 * scale), np.arange(5 * scale)
    np.testing.assert_array_equal(y, x[:, :, i[:, None] // scale, j[None, :] // scale])


def test_group_norm_silu_without_keeping_u_gives_the_same_output(monkeypatch):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 8, 6, 6))
    w, b = rng.standard_normal(8), rng.standard_normal(8)
    monkeypatch.setitem(norm_k._CHUNK_BYTES, "cpu", 1)
    y, mean, rstd, u = norm_k.group_norm_fused_forward(x, 4, w, b, 1e-5, silu=True)
    y2, mean2, rstd2, u2 = norm_k.group_norm_fused_forward(x, 4, w, b, 1e-5, silu=True, keep_u=False)
    assert u is not None and u2 is None
    for a, e in ((y2, y), (mean2, mean), (rstd2, rstd)):
        np.testing.assert_array_equal(a, e)


@needs_threadpoolctl
def test_unet_gradients_are_the_same_for_any_number_of_threads(threads, monkeypatch):
    """The whole training step's arithmetic, not only each kernel: one thread
    and three give equal bits (every product runs on one BLAS thread)."""
    from autograd import Tensor
    import autograd.functional as F
    from tinyddpm.unet import PRESETS, UNet

    monkeypatch.setitem(conv_k._CHUNK_BYTES, "cpu", 64 << 10)   # several chunks even at batch 4
    monkeypatch.setitem(norm_k._CHUNK_BYTES, "cpu", 8 << 10)
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

    threads(1)
    one = grads()
    threads(3)
    for a, e in zip(grads(), one):
        np.testing.assert_array_equal(a, e)


def _glibc():
    import os
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

    from autograd import backend
    parallel.parallel_for(2, lambda i, w: None)
    assert backend.keep_freed_host_memory() is True

    def faults_per_round(rounds=20):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(rounds):
            a, b = np.ones(2 << 20, np.float32), np.ones(2 << 20, np.float32)   # 8 MB each
            del a, b
        return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / rounds

    faults_per_round(3)                       # the heap grows once
    assert faults_per_round() < 100           # 4096 per round when each array is a fresh mapping


@needs_threadpoolctl
@pytest.mark.parametrize("per_chunk", [1, 4])
def test_attention_kernels_agree_across_threads_and_with_the_formulas(per_chunk, threads, monkeypatch):
    from autograd.kernels import attention as attn_k
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((9, 5, 4)), rng.standard_normal((9, 6, 4)),
               rng.standard_normal((9, 6, 3)))
    g = rng.standard_normal((9, 5, 3))
    images_per_chunk(monkeypatch, per_chunk)

    def run():
        out, p = attn_k.attention_forward(q, k, v)
        return (out, p) + attn_k.attention_backward(g, q, k, v, p)

    threads(1)
    one = run()
    threads(3)
    for a, e in zip(run(), one):
        np.testing.assert_array_equal(a, e)
    s = np.einsum("bqd,bkd->bqk", q, k) / 2.0                   # d = 4: scale 1/2
    p = np.exp(s - s.max(axis=2, keepdims=True))
    p /= p.sum(axis=2, keepdims=True)
    np.testing.assert_allclose(one[1], p, rtol=1e-12)
    np.testing.assert_allclose(one[0], p @ v, rtol=1e-12)
    # The backward's formulas (module docstring of kernels/attention.py), written out:
    dv = p.transpose(0, 2, 1) @ g
    dp = g @ v.transpose(0, 2, 1)
    ds = p * (dp - (dp * p).sum(axis=2, keepdims=True)) / 2.0
    np.testing.assert_allclose(one[4], dv, rtol=1e-12)
    np.testing.assert_allclose(one[2], ds @ k, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(one[3], ds.transpose(0, 2, 1) @ q, rtol=1e-10, atol=1e-12)


def test_tinyddpm_malloc_default_leaves_glibc_alone():
    import os
    import subprocess
    import sys
    code = "from autograd import backend; print(backend.keep_freed_host_memory())"
    env = dict(os.environ, TINYDDPM_MALLOC="default")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), check=True)
    assert out.stdout.strip() == "False"


@needs_threadpoolctl
def test_attention_small_enough_for_one_chunk_is_split_in_two(threads, monkeypatch):
    """A batch whose weights fit one chunk but are worth two threads (256 KB or
    more) goes in two halves, with the numbers of one chunk."""
    from autograd.kernels import attention as attn_k
    rng = np.random.default_rng(6)
    q, k, v = (rng.standard_normal((5, 100, 8)), rng.standard_normal((5, 90, 8)),
               rng.standard_normal((5, 90, 3)))                 # weights 5 x 100 x 90 x 8 B = 360 KB
    g = rng.standard_normal((5, 100, 3))
    assert attn_k._chunks(q, k) == (3, 2)
    assert attn_k._chunks(q[:, :20], k) == (5, 1)               # 72 KB: one chunk

    def run():
        out, p = attn_k.attention_forward(q, k, v)
        return (out, p) + attn_k.attention_backward(g, q, k, v, p)

    threads(2)
    split = run()
    monkeypatch.setitem(attn_k._CHUNK_BYTES, "cpu", 1 << 40)     # one chunk, too large to split
    assert attn_k._chunks(q, k) == (5, 1)
    for a, e in zip(split, run()):
        np.testing.assert_array_equal(a, e)
