"""Convolution forward + backward at the UNet's shapes, against PyTorch when it is importable.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_conv.py [--batch 64] [--rounds 9]

Each configuration times `F.conv2d(x, w, b)` followed by `backward(dy)` on
Tensors (what a training step does), float32, 2 threads for both. With torch
importable (e.g. from .torchvenv/bin/python) the same work in PyTorch runs
alternately, round by round. Prints one JSON line per configuration, then a
table.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from common import emit_json, set_threads, machine_header, print_table, time_alternating, torch_or_none  # noqa: E402

import autograd  # noqa: E402
from autograd import functional as F  # noqa: E402

# (name, C_in, C_out, H=W, kernel, stride): the convolutions of the mnist and
# mnist-tiny UNets (DESIGN.md, "The UNet").
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


def ours(x, w, b, dy, stride, pad):
    tx, tw, tb = (autograd.Tensor(a, requires_grad=True) for a in (x, w, b))

    def step():
        tx.grad = tw.grad = tb.grad = None
        F.conv2d(tx, tw, tb, stride=stride, padding=pad).backward(dy)
    return step


def theirs(torch, x, w, b, dy, stride, pad):
    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    tdy = torch.tensor(dy)

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
    a = p.parse_args()
    set_threads(a.threads)
    torch = None if a.no_torch else torch_or_none(a.threads)
    header = machine_header()
    header["torch"] = torch.__version__ if torch else None
    emit_json({"bench": "conv", "machine": header})

    rows = []
    for name, cin, cout, size, k, stride in CONFIGS:
        x, w, b, dy, pad = make_case(a.batch, cin, cout, size, k, stride)
        fns = {"tinyddpm": ours(x, w, b, dy, stride, pad)}
        if torch:
            fns["torch"] = theirs(torch, x, w, b, dy, stride, pad)
        med = time_alternating(fns, a.rounds)
        row = {"bench": "conv", "config": name, "x": [a.batch, cin, size, size],
               "w": [cout, cin, k, k], "stride": stride, "padding": pad,
               "tinyddpm_ms": 1e3 * med["tinyddpm"],
               "torch_ms": 1e3 * med["torch"] if torch else None}
        row["ratio"] = row["tinyddpm_ms"] / row["torch_ms"] if torch else None
        emit_json(row)
        rows.append(row)

    print()
    print(f"conv2d forward+backward, batch {a.batch}, float32, median of {a.rounds}; "
          f"BLAS: {header['blas']}; torch: {header['torch']}")
    print_table(rows, [("config", "configuration", "{}"), ("tinyddpm_ms", "tinyddpm ms", "{:.2f}"),
                       ("torch_ms", "torch ms", "{:.2f}"), ("ratio", "ratio", "{:.2f}")])


if __name__ == "__main__":
    main()
