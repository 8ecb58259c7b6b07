"""Convolution forward + backward at the UNet's shapes, against PyTorch when it is importable.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_conv.py [--batch 64] [--rounds 9]
    python benchmarks/bench_conv.py --preset mnist --device cuda --batch 128 [--tf32]

Each configuration times `F.conv2d(x, w, b)` followed by `backward(dy)` on
Tensors (what a training step does), float32, 2 threads for both on a CPU.
With torch importable (e.g. from .torchvenv/bin/python) the same work in
PyTorch runs alternately, round by round. Without --preset the shapes are
the fixed list below; with it, the distinct convolutions of one forward
pass of that preset's UNet, each with how often it occurs, and a last row
with the sums weighted by those counts (a step's convolutions, forward and
backward; every one computes dL/dx here, which a training step skips for
the first, whose input is the image). Prints one JSON line per
configuration, then a table.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from common import emit_json, set_threads, machine_header, print_table, time_alternating, torch_or_none  # noqa: E402

import autograd  # noqa: E402
from autograd import backend, functional as F  # noqa: E402
from tinyddpm.unet import PRESETS, UNet  # noqa: E402

# (name, C_in, C_out, H=W, kernel, stride): the convolutions of the mnist and
# mnist-tiny UNets (docs/design.md, "The UNet").
CONFIGS = [
    ("conv_in 1->32 @28", 1, 32, 28, 3, 1),
    ("3x3 32->32 @28", 32, 32, 28, 3, 1),
    ("3x3 64->64 @14", 64, 64, 14, 3, 1),
    ("3x3 64->64 @7", 64, 64, 7, 3, 1),
    ("3x3 s2 32->32 @28", 32, 32, 28, 3, 2),
    ("3x3 s2 64->64 @14", 64, 64, 14, 3, 2),
    ("3x3 96->32 @28", 96, 32, 28, 3, 1),
    ("conv_out 32->1 @28", 32, 1, 28, 3, 1),
    ("1x1 32->64 @14", 32, 64, 14, 1, 1),
    ("1x1 64->64 @7", 64, 64, 7, 1, 1),
]


def make_case(batch, cin, cout, size, k, stride, seed=0):
    rng = np.random.default_rng(seed)
    pad = k // 2
    x = rng.standard_normal((batch, cin, size, size), dtype=np.float32)
    w = rng.standard_normal((cout, cin, k, k), dtype=np.float32) * np.float32((cin * k * k) ** -0.5)
    b = rng.standard_normal(cout, dtype=np.float32)
    out = (size + 2 * pad - k) // stride + 1
    dy = rng.standard_normal((batch, cout, out, out), dtype=np.float32)
    return x, w, b, dy, pad


def preset_configs(preset):
    """(name, C_in, C_out, H=W, kernel, stride, count) of every distinct convolution
    in one forward pass of the preset's UNet, in the order they first run."""
    model = UNet(**PRESETS[preset], rng=np.random.default_rng(0))
    seen = {}
    original = F.conv2d

    def record(x, w, b=None, stride=1, padding=0, **rest):
        key = (x.shape[1], w.shape[0], x.shape[2], w.shape[2], stride)
        seen[key] = seen.get(key, 0) + 1
        return original(x, w, b, stride=stride, padding=padding, **rest)

    F.conv2d = record
    try:
        with autograd.no_grad():
            model(autograd.Tensor(np.zeros((1, 1, 28, 28), np.float32)), np.array([0]))
    finally:
        F.conv2d = original
    configs = []
    for (cin, cout, size, k, stride), count in seen.items():
        name = f"{k}x{k}{' s2' if stride == 2 else ''} {cin}->{cout} @{size}"
        configs.append((name, cin, cout, size, k, stride, count))
    return configs


def ours(x, w, b, dy, stride, pad, device):
    tx, tw, tb = (autograd.Tensor(a, requires_grad=True).to(device) for a in (x, w, b))
    dy = backend.to_device(dy, device)

    def step():
        tx.grad = tw.grad = tb.grad = None
        F.conv2d(tx, tw, tb, stride=stride, padding=pad).backward(dy)
    return step


def theirs(torch, x, w, b, dy, stride, pad, device):
    tx, tw, tb = (torch.tensor(a, device=device, requires_grad=True) for a in (x, w, b))
    tdy = torch.tensor(dy, device=device)

    def step():
        tx.grad = tw.grad = tb.grad = None
        torch.nn.functional.conv2d(tx, tw, tb, stride=stride, padding=pad).backward(tdy)
    return step


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", type=int, default=2, help="threads for tinyddpm (kernel pool and BLAS) and for torch")
    p.add_argument("--no-torch", action="store_true", help="time tinyddpm only")
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="the convolutions of this UNet preset, with counts (default: a fixed list)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--tf32", action="store_true", help="cuda: TF32 tensor cores for both (as bench_step.py)")
    a = p.parse_args()
    if a.tf32 and a.device != "cuda":
        sys.exit("--tf32 applies to --device cuda only")
    set_threads(a.threads)
    torch = None if a.no_torch else torch_or_none(a.threads)
    syncs = []
    if a.device == "cuda":
        autograd.fast.set_tf32(a.tf32)
        syncs.append(lambda: backend.cupy.cuda.Device().synchronize())
        if torch is not None:
            if not torch.cuda.is_available():
                sys.exit("--device cuda: this torch sees no CUDA device (or use --no-torch)")
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = a.tf32
            syncs.append(torch.cuda.synchronize)
    header = machine_header()
    header.update(torch=torch.__version__ if torch else None, device=a.device, tf32=a.tf32)
    emit_json({"bench": "conv", "machine": header})

    configs = preset_configs(a.preset) if a.preset else [c + (1,) for c in CONFIGS]
    rows = []
    for name, cin, cout, size, k, stride, count in configs:
        x, w, b, dy, pad = make_case(a.batch, cin, cout, size, k, stride)
        fns = {"tinyddpm": ours(x, w, b, dy, stride, pad, a.device)}
        if torch:
            fns["torch"] = theirs(torch, x, w, b, dy, stride, pad, a.device)
        med = time_alternating(fns, a.rounds, sync=lambda: [s() for s in syncs])
        row = {"bench": "conv", "config": name, "count": count, "x": [a.batch, cin, size, size],
               "w": [cout, cin, k, k], "stride": stride, "padding": pad, "device": a.device,
               "tinyddpm_ms": 1e3 * med["tinyddpm"],
               "torch_ms": 1e3 * med["torch"] if torch else None}
        row["ratio"] = row["tinyddpm_ms"] / row["torch_ms"] if torch else None
        emit_json(row)
        rows.append(row)
    if a.preset:
        total = {"config": f"all of {a.preset}, weighted by count", "count": sum(r["count"] for r in rows),
                 "tinyddpm_ms": sum(r["count"] * r["tinyddpm_ms"] for r in rows)}
        total["torch_ms"] = sum(r["count"] * r["torch_ms"] for r in rows) if torch else None
        total["ratio"] = total["tinyddpm_ms"] / total["torch_ms"] if torch else None
        emit_json({"bench": "conv-total", "preset": a.preset, "batch": a.batch, "device": a.device, **total})
        rows.append(total)

    print()
    print(f"conv2d forward+backward, batch {a.batch}, float32{' (TF32)' if a.tf32 else ''}, {a.device}, "
          f"median of {a.rounds}; BLAS: {header['blas']}; torch: {header['torch']}")
    print_table(rows, [("config", "configuration", "{}"), ("count", "count", "{}"),
                       ("tinyddpm_ms", "tinyddpm ms", "{:.2f}"),
                       ("torch_ms", "torch ms", "{:.2f}"), ("ratio", "ratio", "{:.2f}")])


if __name__ == "__main__":
    main()
