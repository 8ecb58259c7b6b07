"""The pictures of docs/training.md and docs/evaluation.md, drawn from a run's own files.

    python benchmarks/lab/draw_results.py grid S.npz OUT.png        # the first 64 samples, 8 x 8
    python benchmarks/lab/draw_results.py loss METRICS.csv OUT.png  # the loss of eq. 14 against the step
    python benchmarks/lab/draw_results.py tradeoff SWEEP.jsonl OUT.png
        # FID against label accuracy, one point per guidance weight, from the
        # JSON lines of `tinyddpm eval CKPT --guidance-sweep ...`

Pillow only (matplotlib is an optional extra), with its built-in font.
"""
import csv
import json
import math
import sys

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from tinyddpm.images import save_grid


def _font():
    try:
        return ImageFont.load_default(size=12)
    except TypeError:       # Pillow < 10.1
        return ImageFont.load_default()


def _axes(title, xlabel, ylabel, size=(560, 340)):
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    box = (60, 30, size[0] - 20, size[1] - 45)
    draw.rectangle(box, outline="black")
    font = _font()
    draw.text(((box[0] + box[2] - draw.textlength(title, font=font)) // 2, 8), title, fill="black", font=font)
    draw.text(((box[0] + box[2] - draw.textlength(xlabel, font=font)) // 2, size[1] - 20), xlabel,
              fill="black", font=font)
    draw.text((4, box[1] - 18), ylabel, fill="black", font=font)
    return image, draw, box, font


def _scale(lo, hi, a, b):
    return lambda v: a + (v - lo) / (hi - lo) * (b - a)


def grid(npz_path, out):
    with np.load(npz_path, allow_pickle=False) as f:
        samples = f["samples"][:64]
    if samples.dtype == np.uint8:                 # (N, H, W, C) in {0..255}: another tool's layout
        samples = samples.transpose(0, 3, 1, 2) / 127.5 - 1.0
    save_grid(samples, out)


def loss(metrics_path, out):
    rows = list(csv.DictReader(open(metrics_path)))
    steps = np.array([float(r["step"]) for r in rows])
    values = np.log10([float(r["loss"]) for r in rows])
    image, draw, (left, top, right, bottom), font = _axes("loss of eq. 14 (log scale)", "step", "loss")
    lo, hi = math.floor(values.min()), math.ceil(values.max())
    sx, sy = _scale(0, steps.max(), left, right), _scale(lo, hi, bottom, top)
    for power in range(lo, hi + 1):
        draw.text((8, sy(power) - 6), f"1e{power}", fill="black", font=font)
    for tick in np.linspace(0, steps.max(), 5):
        draw.text((sx(tick) - 10, bottom + 4), f"{tick:.0f}", fill="black", font=font)
    draw.line(list(zip(sx(steps).tolist(), sy(values).tolist())), fill=(31, 119, 180), width=2)
    image.save(out, optimize=True)


def tradeoff(sweep_path, out):
    lines = [json.loads(line) for line in open(sweep_path) if line.strip()]
    acc = np.array([100 * r["label_accuracy"] for r in lines])
    fid = np.array([r["fid"] for r in lines])
    image, draw, (left, top, right, bottom), font = _axes(
        "guidance: FID against label accuracy (labels: w)", "label accuracy (%)", "FID")
    xlo, xhi = math.floor(acc.min() - 1), math.ceil(acc.max() + 1)
    ylo, yhi = 0, 20 * math.ceil(fid.max() / 20 + 0.25)
    sx, sy = _scale(xlo, xhi, left + 10, right - 10), _scale(ylo, yhi, bottom, top)
    for tick in np.linspace(ylo, yhi, 5):
        draw.text((8, sy(tick) - 6), f"{tick:.0f}", fill="black", font=font)
    for tick in np.linspace(xlo, xhi, 5):
        draw.text((sx(tick) - 10, bottom + 4), f"{tick:.1f}", fill="black", font=font)
    points = list(zip(sx(acc).tolist(), sy(fid).tolist()))
    draw.line(points, fill=(31, 119, 180), width=2)
    for (x, y), r in zip(points, lines):
        draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=(31, 119, 180))
        draw.text((x + 6, y - 16), f"w={r['guidance']:g}", fill="black", font=font)
    image.save(out, optimize=True)


if __name__ == "__main__":
    commands = {"grid": grid, "loss": loss, "tradeoff": tradeoff}
    if len(sys.argv) != 4 or sys.argv[1] not in commands:
        sys.exit(__doc__)
    commands[sys.argv[1]](sys.argv[2], sys.argv[3])
