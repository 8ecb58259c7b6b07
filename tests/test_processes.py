"""BatchSplit: a no_grad forward split over forked processes (autograd/processes.py)."""
import multiprocessing.reduction
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import autograd
from autograd import functional as F, parallel, processes
from autograd.optim import Adam
from autograd.processes import BatchSplit, GradientSplit
from tinyddpm.sample import sample_checkpoint
from tinyddpm.unet import UNet

from test_cli import cache_env, micro_checkpoint, private_cache  # noqa: F401  (fixtures)

TINY = dict(in_channels=1, image_size=8, ch=8, ch_mult=(1, 2), num_res_blocks=1,
            attn_resolutions=(4,), dropout=0.0, num_groups=4)

needs_fork = pytest.mark.skipif(not processes._can_fork(), reason="BatchSplit forks only on Linux")


@pytest.fixture
def two_threads():
    """The kernels on 2 threads for the test (so BatchSplit's default is 2 processes)."""
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.delenv("TINYDDPM_PROCESSES", raising=False)     # the thread count decides
    before = parallel.num_threads()
    parallel.set_num_threads(2)
    yield
    parallel.set_num_threads(before)
    monkeypatch.undo()


def unet_inputs(batch, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 1, 8, 8)).astype(dtype)
    return autograd.Tensor(x), rng.integers(0, 1000, batch)


@needs_fork
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n_processes", [2, 3])
def test_split_forward_is_the_whole_batch_forward(dtype, n_processes, two_threads):
    # Equal to rounding, not always bit for bit: OpenBLAS multiplies small
    # matrices with other kernels than large ones, and which it picks
    # depends on the width of the product, so on how many images a process has.
    model = UNet(**TINY, dtype=dtype, rng=np.random.default_rng(1)).eval()
    with autograd.no_grad(), BatchSplit(model, processes=n_processes) as net:
        assert len(net.children) == n_processes - 1
        for batch in (1, 2, 3, 7):
            x, t = unet_inputs(batch, dtype, seed=batch)
            whole = model(x, t).data
            split = net(x, t)
            assert isinstance(split, autograd.Tensor) and split.dtype == dtype
            assert split.shape == whole.shape
            tolerance = 1e-5 if dtype == np.float32 else 1e-12
            np.testing.assert_allclose(split.data, whole, rtol=tolerance, atol=tolerance,
                                       err_msg=f"batch {batch}")


@needs_fork
def test_block_holds_this_process_at_one_thread_and_stops_its_children(two_threads):
    net = BatchSplit(lambda x: x * 2)
    assert net.processes == 2
    with net:
        assert parallel.num_threads() == 1
        children = [child for child, _ in net.children]
        assert len(children) == 1 and children[0].is_alive()
        with autograd.no_grad():
            x = np.arange(12.0).reshape(6, 2)
            assert np.array_equal(net(x), x * 2)
    assert parallel.num_threads() == 2
    assert net.children == []
    assert not children[0].is_alive() and children[0].exitcode == 0


@needs_fork
def test_arrays_and_tensors_come_back_as_they_went(two_threads):
    seen = []

    def fn(x, labels):
        seen.append((type(x).__name__, type(labels).__name__))
        return x * 1.0 + labels.reshape(-1, 1)

    with autograd.no_grad(), BatchSplit(fn) as net:
        x, labels = np.ones((5, 3)), np.arange(5)
        out = net(autograd.Tensor(x), labels)
        assert isinstance(out, autograd.Tensor)
        assert np.array_equal(out.data, x + labels.reshape(-1, 1))
        plain = net(x, labels)
        assert isinstance(plain, np.ndarray) and np.array_equal(plain, x + labels.reshape(-1, 1))
    assert seen == [("Tensor", "ndarray"), ("ndarray", "ndarray")]    # this process's slices


@needs_fork
def test_a_failing_slice_names_the_error_and_the_next_call_still_works(two_threads):
    def fn(x):
        if (x < 0).any():
            raise ValueError(f"negative input in a slice of {x.shape[0]}")
        return x + 1

    with autograd.no_grad(), BatchSplit(fn) as net:
        x = np.zeros((4, 2))
        x[3] = -1                                       # in the child's slice (rows 2-3)
        with pytest.raises(RuntimeError, match=r"slice 1 failed: ValueError: negative input in a slice of 2"):
            net(x)
        x[0] = -1                                       # in this process's slice too: its own error
        with pytest.raises(ValueError, match="negative input"):
            net(x)
        y = np.arange(8.0).reshape(4, 2)
        assert np.array_equal(net(y), y + 1)            # the replies of the failed calls were read


@needs_fork
def test_a_child_that_died_is_a_clear_error(two_threads):
    with autograd.no_grad(), BatchSplit(lambda x: x) as net:
        child = net.children[0][0]
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        with pytest.raises(RuntimeError, match="slice 1 failed: it exited"):
            net(np.zeros((4, 1)))


@needs_fork
def test_nothing_is_pickled(two_threads, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("pickled")

    monkeypatch.setattr(pickle, "dumps", refuse)
    monkeypatch.setattr(multiprocessing.reduction.ForkingPickler, "dumps", refuse)
    with autograd.no_grad(), BatchSplit(lambda x, t: x * t.reshape(-1, 1)) as net:
        x, t = np.ones((6, 2), dtype=np.float32), np.arange(6)
        assert np.array_equal(net(x, t), x * t.reshape(-1, 1))


def _gone(pid):
    """Whether process pid has exited (reaped, or a zombie nobody has reaped yet)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return any(line.startswith("State:") and "Z" in line.split()[1] for line in f)
    except FileNotFoundError:
        return True


def run_script(tmp_path, source, **options):
    """Run `source` in a fresh Python that imports this checkout; its CompletedProcess."""
    script = tmp_path / "script.py"
    script.write_text(source)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.run([sys.executable, str(script)], env=env, timeout=60, **options)


@needs_fork
def test_the_children_exit_when_their_parent_dies(tmp_path):
    pids = tmp_path / "pids"
    done = run_script(tmp_path, (
        "import os, signal\n"
        "from autograd.processes import BatchSplit\n"
        "with BatchSplit(lambda x: x, processes=3) as net:\n"
        f"    open({str(pids)!r}, 'w').write(' '.join(str(c.pid) for c, _ in net.children))\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    children = [int(pid) for pid in pids.read_text().split()]
    try:
        assert done.returncode == -signal.SIGKILL and len(children) == 2
        deadline = time.monotonic() + 20
        while not all(_gone(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(_gone(pid) for pid in children), "orphaned children still running"
    finally:
        for pid in children:
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)


@needs_fork
def test_a_signal_to_the_process_group_reaches_the_parent_alone(tmp_path):
    # In a session of its own, so that the signals reach no one else (pytest, CI).
    done = run_script(tmp_path, (
        "import os, signal\n"
        "import numpy as np\n"
        "import autograd\n"
        "from autograd.processes import BatchSplit\n"
        "got = []\n"
        "signal.signal(signal.SIGTERM, lambda *a: got.append('TERM'))\n"
        "signal.signal(signal.SIGINT, lambda *a: got.append('INT'))\n"
        "with autograd.no_grad(), BatchSplit(lambda x: x + 1, processes=2) as net:\n"
        "    child = net.children[0][0]\n"
        "    os.killpg(0, signal.SIGTERM)\n"
        "    os.killpg(0, signal.SIGINT)\n"
        "    x = np.zeros((4, 1))\n"
        "    print(got, np.array_equal(net(x), x + 1), child.is_alive(), os.getpgid(child.pid) != os.getpgid(0))\n"),
        capture_output=True, text=True, start_new_session=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[0] == "['TERM', 'INT'] True True True"


@needs_fork
def test_a_block_left_open_does_not_hold_up_the_exit(tmp_path):
    done = run_script(tmp_path, (
        "from autograd.processes import BatchSplit\n"
        "net = BatchSplit(lambda x: x, processes=2).__enter__()\n"
        "print('open', len(net.children))\n"), capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout == "open 1\n", done.stderr


@needs_fork
def test_ctrl_c_while_forking_stops_the_children_forked_so_far(two_threads, monkeypatch):
    started = []
    real_start = multiprocessing.get_context("fork").Process.start

    def start_then_ctrl_c(self):
        real_start(self)
        started.append(self)
        if len(started) == 1:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(multiprocessing.get_context("fork").Process, "start", start_then_ctrl_c)
    net = BatchSplit(lambda x: x, processes=3)
    with pytest.raises(KeyboardInterrupt):
        net.__enter__()
    # Held back until both are forked, or raised at once where another thread of this
    # process (one a library left) takes the signal: either way none is left running.
    assert len(started) in (1, 2) and net.children == []
    for child in started:
        child.join(timeout=10)
        assert not child.is_alive()
    assert processes._parent_ends == set() and parallel.num_threads() == 2


@needs_fork
def test_the_children_ignore_a_ctrl_c_sent_to_them(two_threads):
    with autograd.no_grad(), BatchSplit(lambda x: x + 1) as net:
        child = net.children[0][0]
        os.kill(child.pid, signal.SIGINT)
        x = np.zeros((4, 1))
        assert np.array_equal(net(x), x + 1) and child.is_alive()
    assert not child.is_alive()


@needs_fork
def test_an_exchange_cut_short_stops_the_children_and_the_block_goes_on_unsplit(two_threads, monkeypatch):
    with autograd.no_grad(), BatchSplit(lambda x: x * 2) as net:
        child = net.children[0][0]
        real_receive = processes._receive

        def interrupted(conn):                      # this process only: the child forked before
            monkeypatch.setattr(processes, "_receive", real_receive)
            raise KeyboardInterrupt

        monkeypatch.setattr(processes, "_receive", interrupted)
        x = np.arange(6.0).reshape(6, 1)
        with pytest.raises(KeyboardInterrupt):
            net(x)
        assert net.children == [] and not child.is_alive()   # its reply was never read
        assert np.array_equal(net(x), x * 2)                  # so the block runs here now
    assert parallel.num_threads() == 2


def test_bad_calls_are_refused_with_a_clear_error(two_threads):
    with pytest.raises(ValueError, match="processes must be an integer >= 1"):
        BatchSplit(lambda x: x, processes=0)
    with pytest.raises(ValueError, match="processes must be an integer >= 1"):
        BatchSplit(lambda x: x, processes=True)
    with BatchSplit(lambda x, y: x) as net:
        with pytest.raises(RuntimeError, match="no_grad"):
            net(np.zeros((2, 1)), np.zeros((2, 1)))
        with autograd.no_grad():
            with pytest.raises(ValueError, match=r"same batch size on axis 0, got \[\(4, 1\), \(3,\)\]"):
                net(np.zeros((4, 1)), np.zeros(3))


@pytest.mark.parametrize("how", ["one process", "gpu", "no fork"])
def test_where_it_cannot_or_need_not_fork_calls_go_straight_to_fn(how, two_threads, monkeypatch):
    if how == "no fork":
        monkeypatch.setattr(processes, "_can_fork", lambda: False)
    options = {"one process": dict(processes=1), "gpu": dict(device="cuda"), "no fork": {}}[how]
    calls = []

    def fn(x):
        calls.append(x.shape)
        return x + 1

    with autograd.no_grad(), BatchSplit(fn, **options) as net:
        assert net.children == []
        assert parallel.num_threads() == 2               # not held at one thread either
        assert np.array_equal(net(np.zeros((4, 3))), np.ones((4, 3)))
    assert calls == [(4, 3)]                             # the whole batch, here


def test_the_environment_can_set_the_number_of_processes(two_threads, monkeypatch):
    assert BatchSplit(lambda x: x).processes == 2                 # the kernels' threads
    monkeypatch.setenv("TINYDDPM_PROCESSES", "1")
    assert BatchSplit(lambda x: x).processes == 1
    assert GradientSplit([], lambda x: x).processes == 1
    monkeypatch.setenv("TINYDDPM_PROCESSES", "3")
    assert BatchSplit(lambda x: x).processes == 3
    assert BatchSplit(lambda x: x, processes=2).processes == 2   # an explicit count wins
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("TINYDDPM_PROCESSES", bad)
        with pytest.raises(ValueError, match="TINYDDPM_PROCESSES must be an integer >= 1"):
            BatchSplit(lambda x: x)


def count_children(monkeypatch, cls):
    """A list that gets, each time a `cls` block opens, how many children it forked."""
    children, real_enter = [], cls.__enter__

    def counting_enter(self):
        out = real_enter(self)
        children.append(len(self.children))
        return out

    monkeypatch.setattr(cls, "__enter__", counting_enter)
    return children


@needs_fork
def test_sampling_a_checkpoint_on_two_processes_gives_the_images_of_one_to_rounding(micro_checkpoint, monkeypatch):  # noqa: F811
    children = count_children(monkeypatch, BatchSplit)

    def draw(n_threads):
        before = parallel.num_threads()
        parallel.set_num_threads(n_threads)
        try:
            return sample_checkpoint(micro_checkpoint, n=5, steps=4, seed=3).images
        finally:
            parallel.set_num_threads(before)

    one, two = draw(1), draw(2)
    assert children == [0, 1]                 # one process, then a forked child beside this one
    np.testing.assert_allclose(two, one, rtol=0, atol=1e-4)   # float32 rounding (see the first test)


# =============================================================================
# GradientSplit: a training step's loss and gradients
# =============================================================================

def unet_loss(model):
    def loss_fn(x, t, noise):
        return F.mse_loss(model(autograd.Tensor(x), t), autograd.Tensor(noise))
    return loss_fn


def batch_of(n, dtype, rng):
    return (rng.standard_normal((n, 1, 8, 8)).astype(dtype), rng.integers(0, 1000, n),
            rng.standard_normal((n, 1, 8, 8)).astype(dtype))


@needs_fork
@pytest.mark.parametrize("n_processes", [2, 3])
def test_split_gradients_are_the_whole_batch_gradients(n_processes, two_threads):
    model = UNet(**TINY, dtype=np.float64, rng=np.random.default_rng(1))
    params = model.parameters()
    x, t, noise = batch_of(7, np.float64, np.random.default_rng(2))
    whole = unet_loss(model)(x, t, noise)
    whole.backward()
    expected = [p.grad.copy() for p in params]
    for p in params:
        p.grad = None
    with GradientSplit(params, unet_loss(model), processes=n_processes) as step:
        assert len(step.children) == n_processes - 1
        loss = step(x, t, noise)
    assert loss.shape == () and loss.dtype == np.float64
    np.testing.assert_allclose(loss, whole.data, rtol=1e-12)
    for p, g in zip(params, expected):
        np.testing.assert_allclose(p.grad, g, rtol=1e-10, atol=1e-14)


@needs_fork
def test_an_optimizer_step_in_this_process_reaches_the_children(two_threads):
    def train(split):
        model = UNet(**TINY, dtype=np.float64, rng=np.random.default_rng(1))
        params = model.parameters()
        opt, rng, losses = Adam(params, lr=1e-2), np.random.default_rng(5), []
        with GradientSplit(params, unet_loss(model), processes=2 if split else 1) as step:
            for _ in range(4):
                opt.zero_grad()
                losses.append(float(step(*batch_of(6, np.float64, rng))))
                opt.step()                              # in place, in the shared memory
        assert all(not isinstance(p.data.base, np.ndarray) or p.data.base.size == p.size
                   for p in params)                     # private arrays again
        return losses, [p.data for p in params]

    (one, w_one), (two, w_two) = train(False), train(True)
    # With stale weights in the child the losses would part from step 2 on.
    np.testing.assert_allclose(two, one, rtol=1e-12)
    for a, b in zip(w_two, w_one):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)


@needs_fork
def test_a_replaced_parameter_is_refused_and_parameters_keep_their_values(two_threads):
    w = autograd.Tensor(np.arange(4.0).reshape(2, 2), requires_grad=True)

    def loss_fn(x):                                     # a mean over the slice, as the split expects
        return (autograd.Tensor(x) @ w).mean()

    with GradientSplit([w], loss_fn) as step:
        shared = w.data
        w.data[...] += 1                                # in place: fine, and seen by the child
        loss = step(np.ones((4, 2)))
        np.testing.assert_allclose(loss, (np.ones((4, 2)) @ (np.arange(4.0).reshape(2, 2) + 1)).mean())
        np.testing.assert_allclose(w.grad, np.full((2, 2), 0.5))     # 4 rows of ones over 8 values
        w.data = w.data.copy()                          # replaced: the child would not see it
        with pytest.raises(RuntimeError, match=r"parameter 0 \(2, 2\) was replaced"):
            step(np.ones((4, 2)))
        w.data = shared
    assert w.data is not shared and np.array_equal(w.data, np.arange(4.0).reshape(2, 2) + 1)


@needs_fork
def test_each_process_draws_its_own_dropout_masks(two_threads):
    w = autograd.Tensor(np.ones(1), requires_grad=True)
    p_drop, width = 0.5, 64

    def loss_fn(x):
        return F.dropout(autograd.Tensor(x) * w, p_drop).mean()

    def kept(seed):                                     # a process's mask over its (1, width) slice
        return np.random.default_rng(seed).random((1, width)) >= p_drop

    x = np.ones((2, width))
    with GradientSplit([w], loss_fn) as step:
        # rng_seed: process k seeds its generator with rng_seed + [k]
        w.grad = None
        loss = step(x, rng_seed=[7, 8])
        expected = sum(0.5 * kept([7, 8, k]).mean() / (1 - p_drop) for k in (0, 1))
        np.testing.assert_allclose(loss, expected, rtol=1e-12)

    # Without it: entering the block draws a number from this process's generator,
    # and the child's stream is seeded from it (backend.fork_global_rngs), so it
    # neither copies this one's nor repeats from block to block.
    def child_mask(entropy):
        seed = int(np.random.SeedSequence([entropy, 0x5EED, 1]).generate_state(1)[0])
        return kept([seed, len("cpu")])

    autograd.manual_seed(3)
    mine = np.random.default_rng([3, len("cpu")])        # this process's generator, replayed
    losses = []
    for block in range(2):
        entropy = int(mine.integers(2 ** 63))
        own_mask = mine.random((1, width)) >= p_drop
        with GradientSplit([w], loss_fn) as step:
            w.grad = None
            losses.append(float(step(x)))
        expected = 0.5 * own_mask.mean() / (1 - p_drop) + 0.5 * child_mask(entropy).mean() / (1 - p_drop)
        np.testing.assert_allclose(losses[-1], expected, rtol=1e-12, err_msg=f"block {block}")


@needs_fork
def test_gradient_split_refuses_what_cannot_work(two_threads):
    a = autograd.Tensor(np.ones(2), requires_grad=True)
    b = autograd.Tensor(np.ones(2, dtype=np.float32), requires_grad=True)
    with pytest.raises(ValueError, match="one dtype"):
        with GradientSplit([a, b], lambda x: (autograd.Tensor(x) * a).mean()):
            pass
    assert parallel.num_threads() == 2 and a.data.dtype == np.float64

    def loss_fn(x):
        if (x < 0).any():
            raise ValueError("negative input")
        return (autograd.Tensor(x) * a).mean()

    with GradientSplit([a], loss_fn) as step:
        with autograd.no_grad(), pytest.raises(RuntimeError, match="do not call it under no_grad"):
            step(np.ones((4, 2)))
        bad = np.ones((4, 2))
        bad[3] = -1
        with pytest.raises(RuntimeError, match="slice 1 failed: ValueError: negative input"):
            step(bad)
        a.grad = None
        np.testing.assert_allclose(step(np.ones((4, 2))), 1.0)
        np.testing.assert_allclose(a.grad, [0.5, 0.5])                # 4 rows of ones over 8 values


@needs_fork
def test_training_on_two_processes_follows_training_on_one(tmp_path, monkeypatch, private_cache):  # noqa: F811
    from test_train import arrays, MICRO
    from tinyddpm import unet
    from tinyddpm.cli import main

    # No dropout: with it, the masks depend on the number of processes too.
    monkeypatch.setitem(unet.PRESETS, "micro", dict(MICRO, dropout=0.0))
    children = count_children(monkeypatch, GradientSplit)

    def run(n_threads, out):
        before = parallel.num_threads()
        parallel.set_num_threads(n_threads)
        try:
            assert main(["train", "--preset", "micro", "--steps", "3", "--batch-size", "4", "--out", str(out),
                         "--lr", "0.01", "--warmup", "0", "--sample-n", "1", "--sample-steps", "1"]) == 0
        finally:
            parallel.set_num_threads(before)
        return arrays(out / "checkpoint.npz")

    one, two = run(1, tmp_path / "one"), run(2, tmp_path / "two")
    assert children == [0, 1]
    weights = [k for k in one if k.startswith("model/")]
    assert weights and set(one) == set(two)
    for k in weights:
        # Rounding apart, through Adam: it divides by sqrt(v), so where a gradient is near
        # zero its last bits move that weight by a small fraction of the step size (lr 0.01).
        np.testing.assert_allclose(two[k], one[k], rtol=1e-4, atol=1e-4, err_msg=k)
