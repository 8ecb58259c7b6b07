"""One DDPM training step and one sampling step, timed, with peak memory; optionally beside PyTorch.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_step.py \\
        [--preset mnist-tiny] [--batch 64] [--rounds 7] [--compare-torch] [--profile] [--device cpu|cuda]

- train step: q_sample (t and eps drawn), UNet forward, eps loss (eq. 14),
  backward, gradient-norm clipping, Adam, EMA update: what `tinyddpm train`
  does per batch, minus data loading.
- sample step: one UNet forward under no_grad (one step of Algorithm 2 is
  this plus a few element-wise operations).
On a CPU with more than one thread both run as `tinyddpm train` and the
sampler run them: through nn.batch_parallel, which the fast layer makes a
split of the batch over as many processes, each on one thread
(autograd/fast/processes.py); `--no-split` runs them on the kernel threads
of one process instead, as a Python caller of the model gets them. Run with
AUTOGRAD_FAST=0 in the environment to time the plain kernels alone.
Each is warmed up, then timed `--rounds` times; medians are reported. With
`--compare-torch` (run it with a Python that has torch, e.g.
.torchvenv/bin/python) an equivalent PyTorch model, written below with the
same architecture and parameter count, runs alternately, round by round, with
the same threads (2 by default). Peak memory is measured in a fresh
subprocess per (implementation, step), so one's peak never hides another's:
the process's peak RSS (VmHWM) and the rise over the RSS just before
the first step (on CUDA: the memory pool's size after the step, which it
keeps at its high-water mark). `--profile` prints where one train step's time
goes, per op class, forward and backward.

Prints one JSON line per configuration, then a readable table.
"""
import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from common import emit_json, set_threads, machine_header, print_table, quartiles, time_rounds, torch_or_none  # noqa: E402

import autograd  # noqa: E402
from autograd import backend, nn  # noqa: E402
from autograd.optim import EMA, Adam, clip_grad_norm  # noqa: E402
from tinyddpm.diffusion import GaussianDiffusion  # noqa: E402
from tinyddpm.schedule import linear_betas  # noqa: E402
from tinyddpm.unet import PRESETS, UNet  # noqa: E402

LR, GRAD_CLIP, EMA_DECAY, T = 2e-4, 1.0, 0.9999, 1000


# =============================================================================
# tinyddpm
# =============================================================================

def tinyddpm_steps(preset, batch, device, seed=0):
    """(train_step, sample_step, n_params, sync) for tinyddpm on `device`."""
    model = UNet(**PRESETS[preset], rng=np.random.default_rng(seed))
    model.to(device)
    params = model.parameters()
    opt, ema = Adam(params, lr=LR), EMA(params, decay=EMA_DECAY)
    diffusion = GaussianDiffusion(linear_betas(T))
    rng = backend.default_rng(seed, device)
    x0 = backend.to_device(np.random.default_rng(seed).uniform(-1, 1, (batch, 1, 28, 28))
                           .astype(np.float32), device)
    t_mid = backend.to_device(np.full(batch, T // 2), device)

    # As `tinyddpm train` and the sampler run them: through the model that
    # nn.batch_parallel gives inside `with train_step.split:` / `with
    # sample_step.split:` (the batch split over processes, with the fast
    # layer on a CPU); outside such a block the calls go to the model itself.
    current = {"net": model}

    def train_step():
        opt.zero_grad()
        loss = diffusion.loss(current["net"], x0, rng)
        loss.backward()
        clip_grad_norm(params, GRAD_CLIP)
        opt.step()
        ema.update()
        return loss.data

    def sample_step():
        with autograd.no_grad():
            return current["net"](autograd.Tensor(x0), t_mid)

    train_step.split = Split(model, current, train=True)
    sample_step.split = Split(model, current, train=False)
    sync = (lambda: backend.cupy.cuda.Device().synchronize()) if device == "cuda" else None
    return train_step, sample_step, sum(p.size for p in params), sync


class Split:
    """`with step.split:` runs the step through nn.batch_parallel(model), the model in the
    step's mode (set before the block: forked processes keep the mode they were forked with)."""

    def __init__(self, model, current, train):
        self.model, self.current, self.train = model, current, train
        self.block = None

    @property
    def processes(self):
        return getattr(self.block, "processes", 1)

    @property
    def children(self):
        return getattr(self.block, "children", [])

    def __enter__(self):
        self.model.train(self.train)
        self.block = nn.batch_parallel(self.model)
        self.current["net"] = self.block.__enter__()
        return self

    def __exit__(self, *exc):
        self.current["net"] = self.model
        return self.block.__exit__(*exc)


# =============================================================================
# PyTorch: the same UNet, written out here (never a dependency of the project)
# =============================================================================

def torch_unet(torch, in_channels=1, image_size=28, ch=64, ch_mult=(1, 2, 2), num_res_blocks=2,
               attn_resolutions=(14,), dropout=0.1, num_groups=32):
    """tinyddpm's UNet (tinyddpm/unet.py) written in PyTorch: the same parameters, made in
    the same order with the same shapes and names (but for tinyddpm's `attn.` child), so
    that weights carry over by position. tools/make_unet_fixture.py builds the fixture of
    tests/test_unet.py from it."""
    import math

    nn, F = torch.nn, torch.nn.functional
    groups = num_groups

    def timestep_embedding(t, dim, dtype):
        half = dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64,
                                                            device=t.device) / (half - 1))
        args = t.double()[:, None] * freqs[None, :]
        return torch.cat([torch.sin(args), torch.cos(args)], dim=1).to(dtype)

    class ResBlock(nn.Module):
        def __init__(self, cin, cout, temb_dim):
            super().__init__()
            self.norm1, self.conv1 = nn.GroupNorm(groups, cin), nn.Conv2d(cin, cout, 3, padding=1)
            self.temb_proj = nn.Linear(temb_dim, cout)
            self.norm2, self.dropout = nn.GroupNorm(groups, cout), nn.Dropout(dropout)
            self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
            self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else None

        def forward(self, x, temb):
            h = self.conv1(F.silu(self.norm1(x)))
            h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
            h = self.conv2(self.dropout(F.silu(self.norm2(h))))
            return (x if self.skip is None else self.skip(x)) + h

    class AttnBlock(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.norm = nn.GroupNorm(groups, c)
            self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

        def forward(self, x):
            B, C, H, W = x.shape
            h = self.norm(x)
            q = self.q(h).reshape(B, C, H * W).transpose(1, 2)
            k = self.k(h).reshape(B, C, H * W)
            v = self.v(h).reshape(B, C, H * W).transpose(1, 2)
            w = torch.softmax(torch.bmm(q, k) * C ** -0.5, dim=-1)
            return x + self.proj_out(torch.bmm(w, v).transpose(1, 2).reshape(B, C, H, W))

    class TorchUNet(nn.Module):
        def __init__(self):
            super().__init__()
            res, temb_dim = image_size, 4 * ch
            self.temb_dense0, self.temb_dense1 = nn.Linear(ch, temb_dim), nn.Linear(temb_dim, temb_dim)
            self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
            self.down, skips, cur = nn.ModuleList(), [ch], ch
            for level, mult in enumerate(ch_mult):
                for _ in range(num_res_blocks):
                    stage = [ResBlock(cur, ch * mult, temb_dim)]
                    cur = ch * mult
                    if res in attn_resolutions:
                        stage.append(AttnBlock(cur))
                    self.down.append(nn.ModuleList(stage))
                    skips.append(cur)
                if level != len(ch_mult) - 1:
                    self.down.append(nn.Conv2d(cur, cur, 3, stride=2, padding=1))
                    skips.append(cur)
                    res //= 2
            self.mid1, self.mid_attn, self.mid2 = (ResBlock(cur, cur, temb_dim), AttnBlock(cur),
                                                   ResBlock(cur, cur, temb_dim))
            self.up = nn.ModuleList()
            for level in reversed(range(len(ch_mult))):
                for _ in range(num_res_blocks + 1):
                    stage = [ResBlock(cur + skips.pop(), ch * ch_mult[level], temb_dim)]
                    cur = ch * ch_mult[level]
                    if res in attn_resolutions:
                        stage.append(AttnBlock(cur))
                    self.up.append(nn.ModuleList(stage))
                if level != 0:
                    self.up.append(nn.Conv2d(cur, cur, 3, padding=1))
                    res *= 2
            self.norm_out = nn.GroupNorm(groups, cur)
            self.conv_out = nn.Conv2d(cur, in_channels, 3, padding=1)

        @staticmethod
        def stage(layers, h, temb):
            h = layers[0](h, temb)
            for attn in layers[1:]:
                h = attn(h)
            return h

        def forward(self, x, t):
            temb = self.temb_dense1(F.silu(self.temb_dense0(timestep_embedding(t, ch, x.dtype))))
            hs = [self.conv_in(x)]
            for layer in self.down:
                hs.append(layer(hs[-1]) if isinstance(layer, nn.Conv2d) else self.stage(layer, hs[-1], temb))
            h = self.mid2(self.mid_attn(self.mid1(hs[-1], temb)), temb)
            for layer in self.up:
                if isinstance(layer, nn.Conv2d):
                    h = layer(F.interpolate(h, scale_factor=2, mode="nearest"))
                else:
                    h = self.stage(layer, torch.cat([h, hs.pop()], dim=1), temb)
            return self.conv_out(F.silu(self.norm_out(h)))

    return TorchUNet()


def torch_steps(torch, preset, batch, device, seed=0):
    """(train_step, sample_step, n_params, sync) for the PyTorch reference on `device`."""
    F = torch.nn.functional
    torch.manual_seed(seed)
    model = torch_unet(torch, **PRESETS[preset]).to(device)
    params = list(model.parameters())
    opt = torch.optim.Adam(params, lr=LR)
    ema = [p.detach().clone() for p in params]
    abar = torch.cumprod(1 - torch.tensor(linear_betas(T)), 0).float().to(device)
    x0 = torch.rand(batch, 1, 28, 28, device=device) * 2 - 1
    t_mid = torch.full((batch,), T // 2, device=device)

    def train_step():
        model.train()
        t = torch.randint(0, T, (batch,), device=device)
        eps = torch.randn_like(x0)
        ab = abar[t][:, None, None, None]
        loss = F.mse_loss(model(ab.sqrt() * x0 + (1 - ab).sqrt() * eps, t), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, params, 1 - EMA_DECAY)
        return loss

    def sample_step():
        model.eval()
        with torch.no_grad():
            return model(x0, t_mid)

    sync = torch.cuda.synchronize if device == "cuda" else None
    return train_step, sample_step, sum(p.numel() for p in params), sync


# =============================================================================
# Peak memory, each in a fresh process
# =============================================================================

def _status_mb(field, pid="self"):
    """VmRSS (now) or VmHWM (peak) of this process (or process `pid`), in MB, from /proc.

    Not ru_maxrss: Linux carries that across fork + exec, so a child would
    report its parent's peak when the parent was bigger.
    """
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # other systems


def memory_child(impl, which, preset, batch, device, threads, split):
    """Runs in the subprocess: build, run `which` 3 times, print the peaks as JSON.

    A step split over processes counts every process: the sum of their
    peaks (pages the fork left shared count once per process, so the sum
    errs high).
    """
    torch = torch_or_none(threads) if impl == "torch" else None
    train, sample, _, sync = (torch_steps(torch, preset, batch, device) if impl == "torch"
                              else tinyddpm_steps(preset, batch, device))
    fn = train if which == "train" else sample
    sync = sync or (lambda: None)
    if impl != "torch":
        fn.split.model.train(which == "train")
    pool = backend.cupy.get_default_memory_pool() if (device == "cuda" and impl != "torch") else None
    if pool is not None:
        pool.free_all_blocks()
    block = getattr(fn, "split", None) if split else None
    before = _status_mb("VmRSS")
    with block or contextlib.nullcontext():
        for _ in range(3):
            fn()
            sync()
        children = [child.pid for child, _ in block.children] if block else []
        # A child's peak, read before the block ends and it exits.
        children_peak = sum(_status_mb("VmHWM", pid) for pid in children)
    out = {"peak_rss_mb": _status_mb("VmHWM") + children_peak, "rss_before_mb": before}
    out["step_rss_mb"] = out["peak_rss_mb"] - before
    if pool is not None:
        out["device_peak_mb"] = pool.total_bytes() / 2 ** 20   # the pool keeps its high-water mark
    elif device == "cuda":
        out["device_peak_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
        # What its caching allocator held at most: the figure like CuPy's pool total.
        out["device_reserved_mb"] = torch.cuda.max_memory_reserved() / 2 ** 20
    print(json.dumps(out))


def measure_memory(impl, which, a):
    cmd = [sys.executable, os.path.abspath(__file__), "--_memory-child", impl, which,
           "--preset", a.preset, "--batch", str(a.batch), "--device", a.device, "--threads", str(a.threads)]
    cmd += ["--no-split"] if a.no_split else []
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"memory subprocess failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# =============================================================================
# Profile: time per op class, by wrapping every Function's forward and backward
# =============================================================================

def _all_function_classes():
    import autograd.functional  # noqa: F401  (defines the op classes)
    from autograd.tensor import Function
    found, todo = [], [Function]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            found.append(sub)
            todo.append(sub)
    return found


def profile_step(step, rounds, sync):
    """{name: {"calls", "forward_ms", "backward_ms"}} per step, plus the unaccounted rest.

    On a GPU (`sync` given) every timed call is bracketed by a device
    synchronization: kernels run asynchronously, so without it an op would be
    billed for the launch only, and a later op that waits for the device for
    the work of all before it. The synchronizations keep the device from
    overlapping one op's kernels with the host's launching of the next, so
    the profiled step is longer than the benchmark's, and each op's figure
    is its launches plus its kernels plus one synchronization: a lead to
    where the time goes, not kernel time alone."""
    import autograd.optim as optim_mod
    totals = {}
    depth = [0]   # only the outermost timed call counts (Mean.forward calls Sum.forward)

    def wrap(owner, attr, key, kind):
        original = getattr(owner, attr)

        def timed(*args, **kwargs):
            if depth[0]:
                return original(*args, **kwargs)
            depth[0] += 1
            if sync:
                sync()
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                if sync:
                    sync()
                entry = totals.setdefault(key, {"calls": 0, "forward_ms": 0.0, "backward_ms": 0.0})
                entry[kind] += 1e3 * (time.perf_counter() - t0)
                entry["calls"] += kind == "forward_ms"
                depth[0] -= 1
        setattr(owner, attr, timed)
        return owner, attr, original

    patches = []
    for cls in _all_function_classes():
        for attr, kind in (("forward", "forward_ms"), ("backward", "backward_ms")):
            if attr in cls.__dict__:
                patches.append(wrap(cls, attr, cls.__name__, kind))
    patches.append(wrap(optim_mod.Adam, "step", "Adam.step", "forward_ms"))
    patches.append(wrap(optim_mod.EMA, "update", "EMA.update", "forward_ms"))
    step_globals = tinyddpm_steps.__globals__
    original_clip = step_globals["clip_grad_norm"]
    patches.append(wrap(optim_mod, "clip_grad_norm", "clip_grad_norm", "forward_ms"))
    step_globals["clip_grad_norm"] = optim_mod.clip_grad_norm
    try:
        step()   # warm-up under the wrappers
        totals.clear()
        t0 = time.perf_counter()
        for _ in range(rounds):
            step()
        (sync or (lambda: None))()
        step_ms = 1e3 * (time.perf_counter() - t0) / rounds
    finally:
        for owner, attr, original in reversed(patches):
            setattr(owner, attr, original)
        step_globals["clip_grad_norm"] = original_clip
    rows = []
    for name, e in totals.items():
        rows.append({"op": name, "calls": e["calls"] / rounds, "forward_ms": e["forward_ms"] / rounds,
                     "backward_ms": e["backward_ms"] / rounds})
    for r in rows:
        r["total_ms"] = r["forward_ms"] + r["backward_ms"]
        r["share"] = r["total_ms"] / step_ms
    rows.sort(key=lambda r: -r["total_ms"])
    accounted = sum(r["total_ms"] for r in rows)
    rows.append({"op": "(rest: Python, graph walk, allocation)", "total_ms": step_ms - accounted,
                 "share": (step_ms - accounted) / step_ms})
    return step_ms, rows


def host_and_device_ms(step, rounds):
    """CUDA only: (host ms, device ms) per step, medians of `rounds`, by
    cupyx.profiler.benchmark, which reads the host clock around each call
    and CUDA events on the device around it. Neither step reads a value back
    to the host inside it (clip_grad_norm leaves the norm on the device), so
    host time close to device time means the device waits for Python to
    issue kernels (launch-bound); host time well under it means the kernels
    themselves take the time."""
    from cupyx.profiler import benchmark
    result = benchmark(step, n_repeat=rounds, n_warmup=1)
    return 1e3 * float(np.median(result.cpu_times)), 1e3 * float(np.median(result.gpu_times[0]))


# =============================================================================
# Main
# =============================================================================

def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="mnist-tiny", choices=sorted(PRESETS))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, default=2, help="threads for tinyddpm (its kernel pool, NumPy's BLAS via threadpoolctl) and for torch")
    p.add_argument("--compare-torch", action="store_true")
    p.add_argument("--profile", action="store_true", help="print a per-op profile of one train step")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--no-split", action="store_true",
                   help="tinyddpm's steps on the kernel threads of one process, not split over "
                        "processes as `tinyddpm train` and the sampler run them (autograd/fast/processes.py)")
    p.add_argument("--tf32", action="store_true",
                   help="cuda: float32 products on TF32 tensor cores, for both (default: full float32 for "
                        "both; PyTorch's own default would run its cuDNN convolutions in TF32). tinyddpm's "
                        "TF32 reaches its 2-D products only (3x3 convolutions, linear layers), not CuPy's "
                        "batched matmul (1x1 convolutions, attention)")
    p.add_argument("--_memory-child", nargs=2, metavar=("IMPL", "STEP"), help=argparse.SUPPRESS)
    a = p.parse_args()
    set_threads(a.threads)
    if a._memory_child:
        return memory_child(*a._memory_child, a.preset, a.batch, a.device, a.threads, not a.no_split)

    torch = torch_or_none(a.threads) if a.compare_torch else None
    if a.compare_torch and torch is None:
        sys.exit("--compare-torch: torch is not importable from this Python "
                 "(try .torchvenv/bin/python, see docs/performance.md)")
    if a.device == "cuda":
        autograd.fast.set_tf32(a.tf32)
        if torch:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = a.tf32
    header = machine_header()
    header.update(torch=torch.__version__ if torch else None, device=a.device, tf32=a.tf32,
                  autograd_fast=autograd.fast.enabled())
    emit_json({"bench": "step", "machine": header})

    impls = {"tinyddpm": tinyddpm_steps(a.preset, a.batch, a.device)}
    if torch:
        impls["torch"] = torch_steps(torch, a.preset, a.batch, a.device)
    syncs = [s for *_, s in impls.values() if s]

    def sync():
        for s in syncs:
            s()

    rows = []
    for which, index in (("train", 0), ("sample", 1)):
        # Each step's block is open only around its own rounds: it holds this
        # process at one thread, and its children at the weights of the fork.
        split = impls["tinyddpm"][index].split
        impls["tinyddpm"][index].split.model.train(which == "train")
        with contextlib.nullcontext() if a.no_split else split:
            times = time_rounds({name: fns[index] for name, fns in impls.items()}, a.rounds, sync=sync)
        med = {name: statistics.median(ts) for name, ts in times.items()}
        row = {"bench": "step", "preset": a.preset, "batch": a.batch, "device": a.device, "step": which,
               "tf32": a.tf32, "params": impls["tinyddpm"][2], "rounds": a.rounds,
               "tinyddpm_processes": 1 if a.no_split or a.device != "cpu" else split.processes}
        for name in impls:
            row[f"{name}_s"] = med[name]
            if not a.no_memory:
                mem = measure_memory(name, which, a)
                row.update({f"{name}_{k}": v for k, v in mem.items()})
        if torch:
            row["torch_params"] = impls["torch"][2]
            row["ratio"] = row["tinyddpm_s"] / row["torch_s"]
            # The two ran side by side in each round, so a round's ratio is the
            # steadier figure when the machine's speed drifts between rounds.
            q1, q2, q3 = quartiles([t / u for t, u in zip(times["tinyddpm"], times["torch"])])
            row.update(ratio_per_round=q2, ratio_q1=q1, ratio_q3=q3,
                       ratio_iqr=f"{q1:.2f}-{q3:.2f}")
            if not a.no_memory:
                row["peak_rss_ratio"] = row["tinyddpm_peak_rss_mb"] / row["torch_peak_rss_mb"]
                row["step_rss_ratio"] = row["tinyddpm_step_rss_mb"] / row["torch_step_rss_mb"]
        emit_json(row)
        rows.append(row)

    print()
    print(f"{a.preset}, batch {a.batch}, {a.device}{' (TF32)' if a.tf32 else ''}, median of {a.rounds}; "
          f"autograd.fast {'on' if autograd.fast.enabled() else 'off (AUTOGRAD_FAST=0)'}; "
          f"BLAS: {header['blas']}; "
          f"tinyddpm: {a.threads} threads" + ("" if a.no_split or a.device != "cpu" or a.threads < 2 else
                                              f" (as {a.threads} processes of 1 thread)")
          + f"; torch: {header['torch']} ({a.threads} threads)")
    cols = [("step", "step", "{}"), ("tinyddpm_s", "tinyddpm s", "{:.3f}")]
    if torch:
        cols += [("torch_s", "torch s", "{:.3f}"), ("ratio", "ratio", "{:.2f}"),
                 ("ratio_per_round", "per round", "{:.2f}"), ("ratio_iqr", "quartiles", "{}")]
    if not a.no_memory:
        cols += [("tinyddpm_peak_rss_mb", "tinyddpm peak RSS MB", "{:.0f}"),
                 ("tinyddpm_step_rss_mb", "rise MB", "{:.0f}")]
        if torch:
            cols += [("torch_peak_rss_mb", "torch peak RSS MB", "{:.0f}"),
                     ("torch_step_rss_mb", "rise MB", "{:.0f}"),
                     ("peak_rss_ratio", "peak ratio", "{:.2f}")]
        if a.device == "cuda":
            cols += [("tinyddpm_device_peak_mb", "tinyddpm GPU pool MB", "{:.0f}")]
            if torch:
                cols += [("torch_device_reserved_mb", "torch GPU reserved MB", "{:.0f}"),
                         ("torch_device_peak_mb", "allocated MB", "{:.0f}")]
    print_table(rows, cols)

    if a.profile:
        for which, index in (("train", 0), ("sample", 1)):
            step_ms, prof = profile_step(impls["tinyddpm"][index], a.rounds, impls["tinyddpm"][3])
            emit_json({"bench": "step-profile", "step": which, "preset": a.preset, "batch": a.batch,
                       "step_ms": step_ms, "ops": prof})
            extra = ""
            if a.device == "cuda":
                host_ms, device_ms = host_and_device_ms(impls["tinyddpm"][index], a.rounds)
                emit_json({"bench": "step-host-device", "step": which, "preset": a.preset, "batch": a.batch,
                           "host_ms": host_ms, "device_ms": device_ms})
                extra = (f"; a device synchronization around each op. Without them: host "
                         f"{host_ms:.0f} ms, device {device_ms:.0f} ms a step")
            print(f"\nprofile of one tinyddpm {which} step ({step_ms:.0f} ms, mean of {a.rounds}{extra}):")
            print_table(prof, [("op", "op", "{}"), ("calls", "calls", "{:.0f}"),
                               ("forward_ms", "forward ms", "{:.1f}"), ("backward_ms", "backward ms", "{:.1f}"),
                               ("total_ms", "total ms", "{:.1f}"), ("share", "share", "{:.0%}")])


if __name__ == "__main__":
    main()
