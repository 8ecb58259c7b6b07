"""Write the UNet fixtures that tests/test_unet.py checks tinyddpm's UNet against.

Run with a Python that has PyTorch (never a project dependency):

    .torchvenv/bin/python tools/make_unet_fixture.py

It builds the PyTorch reference of the UNet that benchmarks/bench_step.py times
(`torch_unet`) and writes two files into tests/fixtures/:

- unet_tiny_reference.npz: a tiny configuration (8x8 images, ch 8, two levels,
  attention at 4x4) with a fixed seed: its parameters in torch's
  `parameters()` order, an input x (2, 1, 8, 8), timesteps t and the output of
  the float64 torch model. To stay small (under 50 KB for 44,969 values) the
  weights are int8 codes times a power of two per parameter: `codes` holds
  all parameters' codes flattened and joined in order, `scales[i]` is
  parameter i's scale, and the float64 weights are exactly codes * scale (the
  torch model is run with exactly those weights). Also `config` (the tinyddpm
  keyword arguments) and `names` (torch's [name, shape] list), JSON strings.
- unet_preset_shapes.json: [name, shape] of every parameter, in order, of the
  two real presets, so the full-size parameter order is checked without torch.
"""
import json
import math
import pathlib
import sys

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
from bench_step import torch_unet  # noqa: E402
from tinyddpm.unet import PRESETS  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"

# The tiny configuration, in tinyddpm's keywords.
TINY = dict(in_channels=1, image_size=8, ch=8, ch_mult=[1, 2], num_res_blocks=1,
            attn_resolutions=[4], dropout=0.0, num_groups=4)
TIMESTEPS = [3, 517]


def quantize(w):
    """int8 codes and a power-of-two scale with codes * scale close to w (exactly representable)."""
    scale = 2.0 ** math.ceil(math.log2(max(np.abs(w).max(), 1e-12) / 127))
    codes = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
    return codes, scale


def named_shapes(model):
    return [[name, list(p.shape)] for name, p in model.named_parameters()]


def main():
    torch.manual_seed(0)
    model = torch_unet(torch, **TINY).double().eval()

    # Torch's default init everywhere, plus random GroupNorm affines (which
    # start at exactly 1 and 0) so that a swapped weight and bias would show.
    codes, scales = [], []
    gen = np.random.default_rng(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            w = p.detach().numpy().copy()
            if "norm" in name and name.endswith(".weight"):
                w = 1 + 0.2 * gen.standard_normal(w.shape)
            elif "norm" in name and name.endswith(".bias"):
                w = 0.2 * gen.standard_normal(w.shape)
            c, scale = quantize(w)
            p.copy_(torch.from_numpy(c.astype(np.float64) * scale))
            codes.append(c.ravel())
            scales.append(scale)

        x = gen.standard_normal((2, TINY["in_channels"], TINY["image_size"], TINY["image_size"]))
        t = np.array(TIMESTEPS, dtype=np.int64)
        out = model(torch.from_numpy(x), torch.from_numpy(t)).numpy()

    FIXTURES.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(FIXTURES / "unet_tiny_reference.npz", codes=np.concatenate(codes),
                        scales=np.array(scales, dtype=np.float64), x=x, t=t, out=out,
                        config=np.array(json.dumps(TINY)),
                        names=np.array(json.dumps(named_shapes(model))))

    presets = {}
    for preset, cfg in PRESETS.items():
        presets[preset] = named_shapes(torch_unet(torch, **cfg))
    # One parameter a line: diffs of the file then read like diffs of the model.
    lines = ",\n".join(f'  "{preset}": [\n' + ",\n".join("    " + json.dumps(e) for e in entries) + "\n  ]"
                       for preset, entries in presets.items())
    (FIXTURES / "unet_preset_shapes.json").write_text("{\n" + lines + "\n}\n")
    print(f"{len(scales)} parameters, {sum(c.size for c in codes)} values; "
          f"output |max| {np.abs(out).max():.4g}")


if __name__ == "__main__":
    main()
