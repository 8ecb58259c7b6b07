"""nn.batch_parallel's twin: a model whose calls split the batch over forked processes
(autograd/fast/processes.py: SplitModel).

A split call is the whole batch's call: the same output, and, through one
graph op, the same gradients from loss.backward(), to rounding. The
parameters live in shared memory inside the block, so an optimizer step
here reaches the children, and a replaced parameter is refused. Each
process draws its own dropout masks, seeded from this process's generator.
Nothing is pickled. Around the children: they die with their parent, a
signal to the process group reaches the parent alone, Ctrl-C while forking
or waiting stops them, and one that fails or dies ends the call with a
WorkerError, after which the block runs unsplit.
"""
import multiprocessing
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
from autograd import backend, functional as F, nn
from autograd.fast import processes, threads
from autograd.fast.processes import SplitModel, WorkerError
from autograd.optim import Adam
from fast_helpers import TINY, fast_on, set_threads  # noqa: F401  (fixtures)
from test_cli import cache_env, micro_checkpoint, private_cache  # noqa: F401  (fixtures)
from tinyddpm.unet import UNet

needs_fork = pytest.mark.skipif(not processes._can_fork(), reason="the split forks only on Linux")
pytestmark = needs_fork


class Affine(nn.Module):
    """y = x W + b on (B, 3) inputs: a model small enough to fork in no time.
    With fail_below set, a call whose inputs go below it raises (in whichever process)."""

    def __init__(self, dtype=np.float64, fail_below=None):
        rng = np.random.default_rng(0)
        self.w = nn.Parameter(rng.standard_normal((3, 2)).astype(dtype))
        self.b = nn.Parameter(rng.standard_normal(2).astype(dtype))
        self.fail_below = fail_below

    def forward(self, x):
        if self.fail_below is not None and (x.data < self.fail_below).any():
            raise ValueError(f"an input below {self.fail_below} in a slice of {x.shape[0]}")
        return x @ self.w + self.b


def affine_batch(n=6, seed=1):
    return autograd.Tensor(np.random.default_rng(seed).standard_normal((n, 3)))


def unet_inputs(batch, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return (autograd.Tensor(rng.standard_normal((batch, 1, 8, 8)).astype(dtype)), rng.integers(0, 1000, batch),
            autograd.Tensor(rng.standard_normal((batch, 1, 8, 8)).astype(dtype)))


def loss_and_grads(net, params, batch):
    """The eps loss of net on (x, t, noise) and every parameter's gradient, from .grad empty."""
    for p in params:
        p.grad = None
    x, t, noise = batch
    loss = F.mse_loss(net(x, t), noise)
    loss.backward()
    return float(loss.data), [p.grad for p in params]


# =============================================================================
# A split call is the whole batch's call
# =============================================================================

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n_processes", [2, 3])
def test_split_forward_is_the_whole_batch_forward(dtype, n_processes):
    # Equal to rounding, not always bit for bit: OpenBLAS multiplies small
    # matrices with other kernels than large ones, and which it picks
    # depends on the width of the product, so on how many images a process has.
    model = UNet(**TINY, dtype=dtype, rng=np.random.default_rng(1)).eval()
    with autograd.no_grad(), SplitModel(model, processes=n_processes) as net:
        assert len(net.children) == n_processes - 1
        for batch in (1, 2, 3, 7):
            x, t, _ = unet_inputs(batch, dtype, seed=batch)
            whole = model(x, t).data
            split = net(x, t)
            assert isinstance(split, autograd.Tensor) and split.dtype == dtype
            assert split.shape == whole.shape
            tolerance = 1e-5 if dtype == np.float32 else 1e-13
            np.testing.assert_allclose(split.data, whole, rtol=tolerance, atol=tolerance,
                                       err_msg=f"batch {batch}")


@pytest.mark.parametrize("n_processes", [2, 3])
def test_split_loss_backward_gives_the_whole_batch_gradients(n_processes):
    model = UNet(**TINY, dtype=np.float64, rng=np.random.default_rng(1))
    params = model.parameters()
    batch = unet_inputs(7, np.float64, seed=2)
    whole_loss, whole = loss_and_grads(model, params, batch)
    with SplitModel(model, processes=n_processes) as net:
        assert len(net.children) == n_processes - 1
        loss, split = loss_and_grads(net, params, batch)
    assert loss == pytest.approx(whole_loss, rel=1e-13)
    for i, (a, e) in enumerate(zip(split, whole)):
        assert a is not None, f"parameter {i} got no gradient"
        np.testing.assert_allclose(a, e, rtol=1e-10, atol=1e-14, err_msg=f"parameter {i}")


def squares(y):
    """sum(y^2): a loss whose dL/dy = 2 y differs from row to row."""
    return (y * y).sum()


def unsplit_gradients(model, loss):
    """The gradients loss(model).backward() gives, as copies; every .grad empty again after."""
    model.zero_grad()
    loss(model).backward()
    grads = [p.grad.copy() for p in model.parameters()]
    model.zero_grad()
    return grads


def test_a_second_backward_adds_to_the_gradients_as_an_unsplit_one_does():
    model, x = Affine(), affine_batch()
    once = unsplit_gradients(model, lambda net: squares(net(x)))
    with SplitModel(model, processes=2) as net:
        for _ in range(2):
            squares(net(x)).backward()
    for p, g in zip(model.parameters(), once):
        np.testing.assert_allclose(p.grad, 2 * g, rtol=1e-13)


def test_a_model_called_twice_in_one_graph_gives_the_unsplit_gradients():
    model, x, x2 = Affine(), affine_batch(seed=1), affine_batch(seed=2)
    whole = unsplit_gradients(model, lambda net: squares(net(x) * net(x2)))
    with SplitModel(model, processes=2) as net:
        squares(net(x) * net(x2)).backward()
        for p, g in zip(model.parameters(), whole):
            np.testing.assert_allclose(p.grad, g, rtol=1e-13)


def test_the_children_are_told_to_forget_the_graphs_of_dropped_calls():
    # A call's number goes on the release list once its graph op is gone (here: at once,
    # since the output is not kept), and the next request takes the list to the children.
    model, x = Affine(), affine_batch(seed=1)
    with SplitModel(model, processes=2) as net:
        for _ in range(5):
            net(x)                                  # recorded, never backpropagated
        assert net.released == [5], "calls 1-4 went out with the requests of calls 2-5"
        kept = net(x)
        assert net.released == [] and kept.shape == (x.shape[0], 2)
        del kept
        assert net.released == [6]
        with autograd.no_grad():
            net(x)
        assert net.released == [], "a no-grad call takes the list along too"


def test_an_optimizer_step_in_this_process_reaches_the_children():
    def train(n_processes):
        model = UNet(**TINY, dtype=np.float64, rng=np.random.default_rng(1))
        params = model.parameters()
        opt, losses = Adam(params, lr=1e-2), []
        with SplitModel(model, processes=n_processes) as net:
            for step in range(4):
                loss, _ = loss_and_grads(net, params, unet_inputs(6, np.float64, seed=10 + step))
                losses.append(loss)
                opt.step()                              # in place, in the shared memory
        assert all(p.data.base is None for p in params), "private arrays again after the block"
        return losses, [p.data for p in params]

    (one, w_one), (two, w_two) = train(1), train(2)
    # With stale weights in the child the losses would part from step 2 on.
    np.testing.assert_allclose(two, one, rtol=1e-12)
    for a, b in zip(w_two, w_one):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)     # 1e-10 of a step: rounding, through Adam


def test_a_replaced_parameter_is_refused_and_in_place_updates_reach_the_children():
    model, x = Affine(), affine_batch()
    with autograd.no_grad(), SplitModel(model, processes=2) as net:
        shared = model.w.data
        model.w.data[...] += 1                          # in place: fine, and seen by the child
        np.testing.assert_allclose(net(x).data, x.data @ shared + model.b.data, rtol=1e-14)
        model.w.data = model.w.data.copy()              # replaced: the child would not see it
        with pytest.raises(RuntimeError, match=r"parameter 0 \(3, 2\) was replaced inside a split block"):
            net(x)
        model.w.data = shared
        net(x)
    assert not np.shares_memory(model.w.data, shared)
    np.testing.assert_array_equal(model.w.data, Affine().w.data + 1)


# =============================================================================
# Dropout: each process its own masks, seeded from this process's generator
# =============================================================================

class DropoutModel(nn.Module):
    """dropout(x * w) with p = 1/2: its output shows each row's mask."""

    def __init__(self, width=64):
        self.w = nn.Parameter(np.ones(width))

    def forward(self, x):
        return F.dropout(x * self.w, 0.5, training=self.training)


def test_each_process_draws_its_own_dropout_masks_and_a_reseed_repeats_them():
    model, x = DropoutModel(), autograd.Tensor(np.ones((2, 64)))
    with SplitModel(model, processes=2) as net:
        autograd.manual_seed(3)
        first = net(x).data
        assert not np.array_equal(first[0] != 0, first[1] != 0), "the child drew this process's mask"
        autograd.manual_seed(3)
        np.testing.assert_array_equal(net(x).data, first)
        saved = backend.global_rng("cpu").bit_generator.state     # as a checkpoint saves it
        second = net(x).data
        assert not np.array_equal(second[1], first[1]), "the child repeated its mask"
        backend.global_rng("cpu").bit_generator.state = saved     # as a resumed run restores it
        np.testing.assert_array_equal(net(x).data, second)


def test_sampling_calls_draw_nothing_from_this_processs_generator():
    """Without a graph to record (sampling, the model in eval mode) no seed is drawn
    for the children, so the samples of a seed do not depend on the split."""
    model, x = DropoutModel().eval(), autograd.Tensor(np.ones((4, 64)))
    autograd.manual_seed(5)
    before = backend.global_rng("cpu").bit_generator.state
    with autograd.no_grad(), SplitModel(model, processes=2) as net:
        np.testing.assert_array_equal(net(x).data, x.data)
    assert backend.global_rng("cpu").bit_generator.state == before


# =============================================================================
# The block: threads, pipes, no pickle
# =============================================================================

def test_the_block_holds_this_process_at_one_thread_and_stops_its_children(set_threads):
    set_threads(2)
    model = Affine()
    with SplitModel(model, processes=2) as net:
        assert threads.num_threads() == 1
        children = [child for child, _ in net.children]
        assert len(children) == 1 and children[0].is_alive()
        assert all(p.data is view for p, view in zip(model.parameters(), net.shared))
    assert threads.num_threads() == 2
    assert net.children == [] and net.shared is None
    assert not children[0].is_alive() and children[0].exitcode == 0


def test_nothing_is_pickled(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("pickled")

    monkeypatch.setattr(pickle, "dumps", refuse)
    monkeypatch.setattr(multiprocessing.reduction.ForkingPickler, "dumps", refuse)
    model, x = Affine(np.float32), autograd.Tensor(np.ones((6, 3), dtype=np.float32))
    with SplitModel(model, processes=2) as net:
        squares(net(x)).backward()
        with autograd.no_grad():
            np.testing.assert_allclose(net(x).data, model(x).data, rtol=1e-6)
    assert all(p.grad is not None for p in model.parameters())


def test_what_cannot_work_is_refused_with_a_clear_error(set_threads):
    set_threads(2)
    for bad in (0, True, 1.5):
        with pytest.raises(ValueError, match="processes must be an integer >= 1"):
            SplitModel(Affine(), processes=bad)
    mixed = Affine()
    mixed.b = nn.Parameter(np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="parameters must share one dtype"):
        with SplitModel(mixed, processes=2):
            pass
    assert threads.num_threads() == 2 and processes._parent_ends == set()
    with SplitModel(Affine(), processes=2) as net:
        with pytest.raises(ValueError, match="cannot send gradients back to its inputs"):
            net(autograd.Tensor(np.ones((4, 3)), requires_grad=True))
        with pytest.raises(ValueError, match=r"same batch size on axis 0 of every argument"):
            net(np.ones((4, 3)), np.ones(3))


# =============================================================================
# Signals and deaths
# =============================================================================

def _gone(pid):
    """Whether process pid has exited (reaped, or a zombie nobody has reaped yet)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return any(line.startswith("State:") and "Z" in line.split()[1] for line in f)
    except FileNotFoundError:
        return True


SCRIPT_MODEL = (
    "import os, signal\n"
    "import numpy as np\n"
    "import autograd\n"
    "from autograd import nn\n"
    "from autograd.fast.processes import SplitModel\n"
    "class Scale(nn.Module):\n"
    "    def __init__(self):\n"
    "        self.w = nn.Parameter(np.ones(1))\n"
    "    def forward(self, x):\n"
    "        return x * self.w\n")


def run_script(tmp_path, source, **options):
    """Run SCRIPT_MODEL + source in a fresh Python that imports this checkout; its CompletedProcess."""
    script = tmp_path / "script.py"
    script.write_text(SCRIPT_MODEL + source)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.run([sys.executable, str(script)], env=env, timeout=60, **options)


def test_the_children_exit_when_their_parent_dies(tmp_path):
    pids = tmp_path / "pids"
    done = run_script(tmp_path, (
        "with SplitModel(Scale(), processes=3) as net:\n"
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


def test_a_signal_to_the_process_group_reaches_the_parent_alone(tmp_path):
    # In a session of its own, so that the signals reach no one else (pytest, CI).
    done = run_script(tmp_path, (
        "got = []\n"
        "signal.signal(signal.SIGTERM, lambda *a: got.append('TERM'))\n"
        "signal.signal(signal.SIGINT, lambda *a: got.append('INT'))\n"
        "with autograd.no_grad(), SplitModel(Scale(), processes=2) as net:\n"
        "    child = net.children[0][0]\n"
        "    os.killpg(0, signal.SIGTERM)\n"
        "    os.killpg(0, signal.SIGINT)\n"
        "    x = autograd.Tensor(np.arange(4.0))\n"
        "    same = np.array_equal(net(x).data, x.data)\n"
        "    print(got, same, child.is_alive(), os.getpgid(child.pid) != os.getpgid(0))\n"),
        capture_output=True, text=True, start_new_session=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[0] == "['TERM', 'INT'] True True True"


def test_a_block_left_open_does_not_hold_up_the_exit(tmp_path):
    done = run_script(tmp_path, (
        "net = SplitModel(Scale(), processes=2).__enter__()\n"
        "print('open', len(net.children))\n"), capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout == "open 1\n", done.stderr


def test_ctrl_c_while_forking_stops_the_children_forked_so_far(set_threads, monkeypatch):
    set_threads(2)
    started = []
    process = multiprocessing.get_context("fork").Process
    real_start = process.start

    def start_then_ctrl_c(self):
        real_start(self)
        started.append(self)
        if len(started) == 1:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(process, "start", start_then_ctrl_c)
    model = Affine()
    net = SplitModel(model, processes=3)
    with pytest.raises(KeyboardInterrupt):
        net.__enter__()
    # Held back until both are forked, or raised at once where another thread of this
    # process (one a library left) takes the signal: either way none is left running.
    assert len(started) in (1, 2) and net.children == []
    for child in started:
        child.join(timeout=10)
        assert not child.is_alive()
    assert processes._parent_ends == set() and threads.num_threads() == 2
    assert net.shared is None and all(p.data.base is None for p in model.parameters())


def test_the_children_ignore_a_ctrl_c_sent_to_them():
    model, x = Affine(), affine_batch()
    with autograd.no_grad(), SplitModel(model, processes=2) as net:
        child = net.children[0][0]
        os.kill(child.pid, signal.SIGINT)
        np.testing.assert_allclose(net(x).data, model(x).data, rtol=1e-14)
        assert child.is_alive()
    assert not child.is_alive()


def _kill(child):
    os.kill(child.pid, signal.SIGKILL)
    child.join()


@pytest.mark.parametrize("how", ["killed", "raises"])
def test_a_child_that_fails_or_dies_is_a_one_line_error_and_the_block_goes_on_unsplit(how, set_threads):
    set_threads(2)
    model = Affine(fail_below=-10.0)
    x = affine_batch(4)
    whole = model(x).data
    with autograd.no_grad(), SplitModel(model, processes=2) as net:
        child = net.children[0][0]
        if how == "killed":
            _kill(child)
            bad = x
            message = r"slice 1 of the batch failed \(it exited: killed, or out of memory\?\)"
        else:
            bad = autograd.Tensor(x.data.copy())
            bad.data[3] = -20                           # in the child's slice (rows 2-3)
            message = r"slice 1 of the batch failed \(ValueError: an input below -10.0 in a slice of 2\)"
        with pytest.raises(WorkerError, match=message) as error:
            net(bad)
        assert "\n" not in str(error.value) and isinstance(error.value, nn.BatchParallelError)
        assert net.children == [] and not child.is_alive() and threads.num_threads() == 2
        np.testing.assert_array_equal(net(x).data, whole)    # here, unsplit
    assert threads.num_threads() == 2


def test_a_child_that_dies_between_forward_and_backward_is_an_error_of_the_backward():
    model, x = Affine(), affine_batch()
    whole = unsplit_gradients(model, lambda net: squares(net(x)))
    with SplitModel(model, processes=2) as net:
        y = net(x)
        _kill(net.children[0][0])
        with pytest.raises(WorkerError, match="slice 1 of the batch failed"):
            squares(y).backward()
        model.zero_grad()
        squares(net(x)).backward()                           # unsplit now, and right
    for p, g in zip(model.parameters(), whole):
        np.testing.assert_allclose(p.grad, g, rtol=1e-13)


def test_an_exchange_cut_short_stops_the_children_and_the_block_goes_on_unsplit(set_threads, monkeypatch):
    set_threads(2)
    model, x = Affine(), affine_batch()
    with autograd.no_grad(), SplitModel(model, processes=2) as net:
        child = net.children[0][0]
        real_receive = processes._receive

        def interrupted(conn):                      # this process only: the child forked before
            monkeypatch.setattr(processes, "_receive", real_receive)
            raise KeyboardInterrupt

        monkeypatch.setattr(processes, "_receive", interrupted)
        with pytest.raises(KeyboardInterrupt):
            net(x)
        assert net.children == [] and not child.is_alive()   # its reply was never read
        np.testing.assert_allclose(net(x).data, model(x).data, rtol=1e-14)   # so the block runs here now
    assert threads.num_threads() == 2


# =============================================================================
# How many processes: batch_parallel and TINYDDPM_PROCESSES
# =============================================================================

def test_tinyddpm_processes_sets_the_split_and_1_turns_it_off(set_threads, monkeypatch):
    set_threads(2)
    model = Affine()
    monkeypatch.delenv("TINYDDPM_PROCESSES", raising=False)
    assert processes.batch_parallel(model).processes == 2           # as many as the kernels' threads
    monkeypatch.setenv("TINYDDPM_PROCESSES", "3")
    assert processes.batch_parallel(model).processes == 3
    monkeypatch.setenv("TINYDDPM_PROCESSES", "1")
    with processes.batch_parallel(model) as net:
        assert net is model


@pytest.mark.parametrize("value", ["abc", "0", "-1", "2.5", ""])
def test_a_bad_tinyddpm_processes_is_refused_with_a_clear_error(value, monkeypatch):
    monkeypatch.setenv("TINYDDPM_PROCESSES", value)
    with pytest.raises(nn.BatchParallelError, match=rf"^TINYDDPM_PROCESSES must be an integer >= 1, got {value!r}$"):
        processes.batch_parallel(Affine())


def test_where_it_cannot_fork_the_model_is_called_itself(set_threads, monkeypatch):
    set_threads(2)
    monkeypatch.delenv("TINYDDPM_PROCESSES", raising=False)
    monkeypatch.setattr(processes, "_can_fork", lambda: False)
    model = Affine()
    with processes.batch_parallel(model) as net:
        assert net is model and threads.num_threads() == 2


def count_children(monkeypatch):
    """A list that gets, each time a SplitModel block opens, how many children it forked."""
    children, real_enter = [], SplitModel.__enter__

    def counting_enter(self):
        out = real_enter(self)
        children.append(len(self.children))
        return out

    monkeypatch.setattr(SplitModel, "__enter__", counting_enter)
    return children


def test_sampling_a_checkpoint_on_two_processes_gives_the_images_of_one_to_rounding(
        micro_checkpoint, fast_on, monkeypatch):  # noqa: F811
    from tinyddpm.sample import sample_checkpoint
    children = count_children(monkeypatch)

    def draw(n_processes):
        monkeypatch.setenv("TINYDDPM_PROCESSES", str(n_processes))
        return sample_checkpoint(micro_checkpoint, n=5, steps=4, seed=3).images

    one, two = draw(1), draw(2)
    assert children == [1]                    # one process alone, then a child beside this one
    np.testing.assert_allclose(two, one, rtol=0, atol=1e-5)   # float32 rounding (see the first test)


def test_training_on_two_processes_follows_training_on_one(tmp_path, private_cache, fast_on,  # noqa: F811
                                                           monkeypatch):
    from test_train import MICRO, arrays
    from tinyddpm import unet
    from tinyddpm.cli import main

    # No dropout: with it, the masks depend on the number of processes too.
    monkeypatch.setitem(unet.PRESETS, "micro", dict(MICRO, dropout=0.0))
    children = count_children(monkeypatch)

    def run(n_processes, out):
        monkeypatch.setenv("TINYDDPM_PROCESSES", str(n_processes))
        assert main(["train", "--preset", "micro", "--steps", "3", "--batch-size", "4", "--out", str(out),
                     "--lr", "0.01", "--warmup", "0", "--sample-n", "1", "--sample-steps", "1"]) == 0
        return arrays(out / "checkpoint.npz")

    one, two = run(1, tmp_path / "one"), run(2, tmp_path / "two")
    assert children and all(n == 1 for n in children)     # the training loop's block (and the preview's)
    weights = [k for k in one if k.startswith("model/")]
    assert weights and set(one) == set(two)
    for k in weights:
        # Rounding apart, through Adam: it divides by sqrt(v), so where a gradient is near
        # zero its last bits move that weight by a small fraction of the step size (lr 0.01).
        np.testing.assert_allclose(two[k], one[k], rtol=1e-4, atol=1e-4, err_msg=k)


def test_autograd_processes_comes_before_the_tinyddpm_name(monkeypatch):
    monkeypatch.setenv("TINYDDPM_PROCESSES", "2")
    monkeypatch.setenv("AUTOGRAD_PROCESSES", "1")
    model = Affine()
    assert processes.default_processes() == 1
    with processes.batch_parallel(model) as net:
        assert net is model
    monkeypatch.delenv("AUTOGRAD_PROCESSES")
    assert processes.default_processes() == 2
