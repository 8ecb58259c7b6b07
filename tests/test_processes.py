"""BatchSplit: a no_grad forward split over forked processes (autograd/processes.py)."""
import multiprocessing.reduction
import os
import pickle
import signal

import numpy as np
import pytest

import autograd
from autograd import parallel, processes
from autograd.processes import BatchSplit
from tinyddpm.sample import sample_checkpoint
from tinyddpm.unet import UNet

from test_cli import cache_env, micro_checkpoint, private_cache  # noqa: F401  (fixtures)

TINY = dict(in_channels=1, image_size=8, ch=8, ch_mult=(1, 2), num_res_blocks=1,
            attn_resolutions=(4,), dropout=0.0, num_groups=4)

needs_fork = pytest.mark.skipif(not processes._can_fork(), reason="BatchSplit forks only on Linux")


@pytest.fixture
def two_threads():
    """The kernels on 2 threads for the test (so BatchSplit's default is 2 processes)."""
    before = parallel.num_threads()
    parallel.set_num_threads(2)
    yield
    parallel.set_num_threads(before)


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


@needs_fork
def test_sampling_a_checkpoint_on_two_processes_gives_the_images_of_one_to_rounding(micro_checkpoint, monkeypatch):  # noqa: F811
    children = []
    real_enter = BatchSplit.__enter__

    def counting_enter(self):
        out = real_enter(self)
        children.append(len(self.children))
        return out

    monkeypatch.setattr(BatchSplit, "__enter__", counting_enter)

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
