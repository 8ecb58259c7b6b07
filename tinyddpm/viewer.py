"""A reverse-process viewer: one self-contained HTML page to watch noise turn into digits.

The page shows, for each sample, x_t beside the network's guess of the
clean image at that step,

    predicted x_0 = (x_t - sqrt(1 - alpha_bar_t) eps_theta(x_t, t)) / sqrt(alpha_bar_t)   (eq. 15)

with a slider over the reverse steps, play/pause, the step's t, alpha_bar_t
and sigma_t, and a plot of the noise level along the chain. The guess
takes the shape of a digit long before x_t does, which is what the paper's
Figure 6 shows on CIFAR-10. A second tab noises a few real digits with
q(x_t | x_0) (eq. 4) at the same t's.

The file needs nothing but a browser: no server, no network, no script
library. The frames are embedded as PNG sprite sheets in data URIs (one
sheet for x_t, one for predicted x_0, one for the forward process; tile
(step s, image i) at row s, column i), drawn 1:1 into small canvases that
CSS scales up with `image-rendering: pixelated`. Everything else is a few
hundred lines of plain inline JavaScript and CSS.

Size: noise does not compress, so a frame of x_t costs up to 4/3 byte per
pixel once in base64; predicted x_0 and the late x_t, mostly black
background, cost less. 16 samples over 100 respaced steps (101 frames with
the final samples) and 4 forward digits make a page of 2-2.5 MB, and at
most 3.9 MB whatever the pixels. `viewer_size_bytes` gives that bound
before anything is sampled, so the command line can refuse a request that
could exceed MAX_BYTES (5 MB) at once.

    # xt, x0: (S, N, 28, 28) recorded by the sampler at the paper's t's (S,), ending in t = 0
    alpha_bar = alpha_bar_at(diffusion.alphas_cumprod, t)
    write_viewer("view.html", xt, x0, t, alpha_bar, sigma,
                 forward_frames=forward_process_frames(digits, alpha_bar))
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from pathlib import Path

import numpy as np
from PIL import Image

from tinyddpm.images import to_uint8

MAX_BYTES = 5_000_000      # a page a learner can open, mail or commit without thinking twice
DEFAULT_SAMPLES = 16       # a 4 x 4 grid of pairs fits one screen
DEFAULT_STEPS = 100        # respaced steps: enough for a smooth slider, 10x cheaper than T = 1000
FORWARD_DIGITS = 4         # real digits in the forward-process tab
DEFAULT_TITLE = "tinyddpm: watching noise become digits"

# Room, in the size bound, for the title and the line of facts (`meta`) above the viewer.
HEADER_ALLOWANCE = 4096


class ViewerError(ValueError):
    """Frames that do not fit together, or a page that would be too large; one line."""


# =============================================================================
# The forward process at the viewer's t's (eq. 4)
# =============================================================================

def alpha_bar_at(alphas_cumprod, timesteps):
    """alpha_bar_t for the paper's t (1-based), with alpha_bar_0 = 1 for t = 0 (x_0 itself).

    alphas_cumprod: (T,) float, index 0 holding alpha_bar_1 (GaussianDiffusion.alphas_cumprod
    of the full chain); timesteps: (S,) ints in 0..T. Returns float64 (S,).
    """
    alphas_cumprod = np.asarray(alphas_cumprod, dtype=np.float64)
    t = np.asarray(timesteps)
    if t.ndim != 1 or not np.issubdtype(t.dtype, np.integer):
        raise ViewerError(f"timesteps must be a 1-D array of integers, got {t.dtype} {t.shape}")
    T = len(alphas_cumprod)
    if t.size and not (0 <= t.min() and t.max() <= T):
        raise ViewerError(f"timesteps must lie in 0..T = {T}, got {t.min()}..{t.max()}")
    return np.where(t == 0, 1.0, alphas_cumprod[np.maximum(t, 1) - 1])


def forward_process_frames(x0, alpha_bar, seed=0):
    """Noise real images to each frame's t: x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps (eq. 4).

    x0: (k, H, W) or (H, W) in [-1, 1]; alpha_bar: (S,), the frames' alpha_bar_t
    (see `alpha_bar_at`; 1 gives x_0 itself). Returns float32 (S, k, H, W).
    """
    x0 = np.asarray(x0, dtype=np.float64)
    if x0.ndim == 2:
        x0 = x0[None]
    if x0.ndim != 3:
        raise ViewerError(f"expected real images (k, H, W) or (H, W), got shape {x0.shape}")
    alpha_bar = np.asarray(alpha_bar, dtype=np.float64)
    if alpha_bar.ndim != 1 or not np.all((0 < alpha_bar) & (alpha_bar <= 1)):
        raise ViewerError(f"alpha_bar must be a 1-D array of numbers in (0, 1], got shape {alpha_bar.shape}")
    alpha_bar = alpha_bar[:, None, None, None]                                  # (S, 1, 1, 1)
    # One eps for all t: any x_t is still a draw from q(x_t | x_0), and the slider
    # then shows the same noise growing instead of a new pattern flickering each step.
    eps = np.random.default_rng(seed).standard_normal(x0.shape)
    return (np.sqrt(alpha_bar) * x0 + np.sqrt(1.0 - alpha_bar) * eps).astype(np.float32)


def first_of_each_digit(images, labels, k=FORWARD_DIGITS):
    """The first image of each digit 0..k-1: (k, H, W), for the forward tab.

    images: (N, 1, H, W) or (N, H, W), e.g. from tinyddpm.data.load_mnist("test").
    """
    images, labels = np.asarray(images), np.asarray(labels)
    chosen = []
    for digit in range(k):
        where = np.flatnonzero(labels == digit)
        if where.size == 0:
            raise ViewerError(f"no image of digit {digit} among the {len(labels)} given")
        chosen.append(images[where[0]].reshape(images.shape[-2:]))
    return np.stack(chosen)


# =============================================================================
# How big a page will be, before sampling
# =============================================================================

def _png_bound(height, width):
    """An upper bound on the bytes of a gray 8-bit PNG of this size, whatever its pixels."""
    raw = height * (width + 1)       # a filter byte starts every row
    # zlib stores incompressible data nearly as is (under 0.1% more); the rest is headers.
    return raw + raw // 1000 + 1024


def _data_uri_bound(height, width):
    return len("data:image/png;base64,") + 4 * math.ceil(_png_bound(height, width) / 3)


def viewer_size_bytes(n, steps, image_size=28, forward_digits=FORWARD_DIGITS):
    """An upper bound on the size of the page for n samples and `steps` reverse steps.

    The page holds steps + 1 frames (x_T down to the final samples), each as
    x_t and predicted x_0, plus forward_digits real digits at the same t's.
    The bound holds even for pure noise, which PNG cannot compress; pages of
    real samples come out a third to a half smaller.
    """
    frames = steps + 1
    size = len(_PAGE.encode()) + HEADER_ALLOWANCE
    size += 2 * _data_uri_bound(frames * image_size, n * image_size)
    if forward_digits:
        size += _data_uri_bound(frames * image_size, forward_digits * image_size)
    size += frames * 3 * 16          # t, alpha_bar_t and sigma_t of every frame, as JSON numbers
    return size


def check_viewer_size(n, steps, image_size=28, forward_digits=FORWARD_DIGITS, limit=MAX_BYTES):
    """Raise ViewerError (one line, saying what would fit) when the page could exceed `limit`."""
    size = viewer_size_bytes(n, steps, image_size, forward_digits)
    if size <= limit:
        return size

    def fits(n, steps):
        return viewer_size_bytes(n, steps, image_size, forward_digits) <= limit

    most_samples = _largest(lambda m: fits(m, steps), upper=n)
    most_steps = _largest(lambda s: fits(n, s), upper=steps)
    options = []
    if most_samples:
        options.append(f"at most {_count(most_samples, 'sample')} at {_count(steps, 'step')}")
    if most_steps:
        options.append(f"at most {_count(most_steps, 'step')} for {_count(n, 'sample')}")
    advice = " or ".join(options) if options else "fewer samples and steps"
    raise ViewerError(f"a viewer of {_count(n, 'sample')} x {_count(steps, 'step')} could reach "
                      f"{size / 1e6:.1f} MB, over the {limit / 1e6:g} MB limit; ask for {advice}")


def _count(number, noun):
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _largest(fits, upper):
    """The largest m in 0..upper with fits(m), for `fits` true up to some point and false after."""
    low, high = 0, upper
    while low < high:
        middle = (low + high + 1) // 2
        if fits(middle):
            low = middle
        else:
            high = middle - 1
    return low


# =============================================================================
# Writing the page
# =============================================================================

def write_viewer(path, xt_frames, x0_frames, timesteps, alpha_bar, sigma, forward_frames=None,
                 title=DEFAULT_TITLE, meta=None):
    """Write the viewer page to `path`; returns its size in bytes.

    xt_frames, x0_frames: (S, N, H, W) (or (S, N, 1, H, W)) in [-1, 1]: x_t and
        predicted x_0 of N samples at S recorded steps, from x_T down to the
        final samples (whose predicted x_0 is the sample itself).
    timesteps: (S,) ints, the paper's t of each frame on the original chain,
        decreasing, the last one 0 (the final samples).
    alpha_bar: (S,) alpha_bar_t of each frame (1 at t = 0; see `alpha_bar_at`).
    sigma: (S,) the standard deviation of the noise sigma_t z that the step
        leaving x_t adds (Algorithm 2, line 4): 0 at t = 1 and t = 0.
    forward_frames: None, or (S, k, H, W) real digits noised to the same t's
        (`forward_process_frames`); None leaves the forward tab with a note.
    meta: facts shown under the title, {label: value} (checkpoint, sampler, seed...).
    """
    page = viewer_html(xt_frames, x0_frames, timesteps, alpha_bar, sigma, forward_frames, title, meta)
    data = page.encode()
    Path(path).write_bytes(data)
    return len(data)


def viewer_html(xt_frames, x0_frames, timesteps, alpha_bar, sigma, forward_frames=None,
                title=DEFAULT_TITLE, meta=None):
    """The page of `write_viewer`, as a string."""
    xt, x0 = _frames(xt_frames, "xt_frames"), _frames(x0_frames, "x0_frames")
    S, N, H, W = xt.shape
    if x0.shape != xt.shape:
        raise ViewerError(f"x0_frames has shape {x0.shape}, xt_frames {xt.shape}; they must match")
    t = np.asarray(timesteps)
    if t.shape != (S,) or not np.issubdtype(t.dtype, np.integer):
        raise ViewerError(f"timesteps must be {S} integers, one per frame, got {t.dtype} {t.shape}")
    if t[-1] != 0 or np.any(np.diff(t) >= 0):
        raise ViewerError(f"timesteps must decrease to 0 (the final samples), got {t[:3]}...{t[-3:]}")
    numbers = {}
    for name, values in (("alpha_bar", alpha_bar), ("sigma", sigma)):
        values = np.asarray(values, dtype=np.float64)
        if values.shape != (S,) or not np.all(np.isfinite(values)):
            raise ViewerError(f"{name} must be {S} finite numbers, one per frame, got shape {values.shape}")
        numbers[name] = [float(f"{v:.6g}") for v in values]
    forward = None
    if forward_frames is not None:
        forward = _frames(forward_frames, "forward_frames")
        if forward.shape[0] != S or forward.shape[2:] != (H, W):
            raise ViewerError(f"forward_frames has shape {forward.shape}; expected ({S}, k, {H}, {W})")

    data = {
        "frames": S, "samples": N, "height": H, "width": W,
        "t": [int(v) for v in t], **numbers,
        "xt": _data_uri(_sprite_sheet(xt)),
        "x0": _data_uri(_sprite_sheet(x0)),
        "forward": None if forward is None else _data_uri(_sprite_sheet(forward)),
        "forwardDigits": 0 if forward is None else forward.shape[1],
    }
    fields = {
        "title": html.escape(title),
        "meta": " &middot; ".join(f"{html.escape(str(k))}: <b>{html.escape(str(v))}</b>"
                                  for k, v in (meta or {}).items()),
        # "</" inside the JSON would end the <script> element early; "<\/" reads the same to JSON.parse.
        "data": json.dumps(data, separators=(",", ":")).replace("</", "<\\/"),
    }
    # One pass, so that a title or meta holding "{{data}}" is shown, not filled in.
    return re.sub(r"\{\{(title|meta|data)\}\}", lambda match: fields[match.group(1)], _PAGE)


def _frames(frames, name):
    """(S, N, H, W) float frames; a channel axis of 1 is dropped."""
    frames = np.asarray(frames)
    if frames.ndim == 5 and frames.shape[2] == 1:
        frames = frames[:, :, 0]
    if frames.ndim != 4 or 0 in frames.shape:
        raise ViewerError(f"{name} must have shape (steps, images, H, W), got {frames.shape}")
    if not np.all(np.isfinite(frames)):
        raise ViewerError(f"{name} holds NaN or infinite values")
    return frames


def _sprite_sheet(frames):
    """(S, N, H, W) in [-1, 1] -> one uint8 picture (S*H, N*W): frame s of image i at row s, column i."""
    S, N, H, W = frames.shape
    return to_uint8(frames).transpose(0, 2, 1, 3).reshape(S * H, N * W)     # (S, H, N, W) -> rows, columns


def _data_uri(picture):
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


# =============================================================================
# The page: HTML, CSS and JavaScript, filled in by viewer_html
# =============================================================================

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{title}}</title>
<style>
  body { margin: 0; background: #f5f6f8; color: #1c2430;
         font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
  main { max-width: 1000px; margin: 0 auto; padding: 18px 24px 40px; }
  h1 { font-size: 21px; margin: 0 0 2px; }
  .meta { color: #5a6472; font-size: 13px; margin: 0 0 10px; }
  .meta b { color: #1c2430; font-weight: 600; }
  p { margin: 6px 0; }
  .tabs { display: flex; gap: 4px; margin: 14px 0 0; border-bottom: 1px solid #cfd5dd; }
  .tabs button { font: inherit; padding: 7px 14px; border: 1px solid transparent;
                 border-radius: 6px 6px 0 0; background: none; color: #4a5564; cursor: pointer; }
  .tabs button[aria-selected="true"] { background: #fff; border-color: #cfd5dd;
                                       border-bottom-color: #fff; margin-bottom: -1px; color: #1c2430; }
  .panel, .controls { background: #fff; border: 1px solid #cfd5dd; padding: 12px 16px; }
  .controls { display: flex; gap: 20px; align-items: center; border-top: none; flex-wrap: wrap; }
  .panel { border-top: none; }
  .slider-box { flex: 1 1 360px; }
  .slider-row { display: flex; gap: 10px; align-items: center; }
  .slider-row input { flex: 1; }
  #play { font: inherit; width: 82px; padding: 4px 0; border-radius: 6px; border: 1px solid #9aa6b5;
          background: #eef2f7; cursor: pointer; }
  .ends { display: flex; justify-content: space-between; color: #5a6472; font-size: 12px;
          margin: 0 0 0 92px; }
  table.numbers { border-collapse: collapse; margin-top: 8px; font-variant-numeric: tabular-nums; }
  table.numbers td { padding: 1px 14px 1px 0; }
  table.numbers td:nth-child(2) { min-width: 70px; font-weight: 600; }
  table.numbers td:nth-child(3) { color: #5a6472; font-size: 13px; }
  svg { flex: 0 0 auto; }
  .caption { color: #3b4553; font-size: 14px; }
  .grid { display: flex; flex-wrap: wrap; gap: 12px; margin: 10px auto 0; justify-content: center; }
  .card { display: flex; gap: 4px; padding: 4px; background: #0b0d10; border-radius: 4px; }
  .labels { display: flex; gap: 4px; color: #5a6472; font-size: 12px; margin-top: 10px; }
  canvas { display: block; image-rendering: pixelated; }
  .formula { white-space: nowrap; }
</style>
</head>
<body>
<main>
<h1>{{title}}</h1>
<p class="meta">{{meta}}</p>
<p>Sampling (Algorithm 2 of Ho et al. 2020) starts from pure noise x<sub>T</sub> ~ N(0, I) and
removes a little of it at every step, down to t = 0. At each step the network predicts the noise
&epsilon;<sub>&theta;</sub>(x<sub>t</sub>, t) in x<sub>t</sub>, and from that prediction follows its
guess of the finished image. Move the slider, use the arrow keys, or press play.</p>

<div class="tabs" role="tablist">
  <button id="tab-reverse" role="tab" aria-selected="true" aria-controls="reverse">Reverse process: sampling</button>
  <button id="tab-forward" role="tab" aria-selected="false" aria-controls="forward">Forward process: noising a real digit</button>
</div>
<div class="controls">
  <div class="slider-box">
    <div class="slider-row">
      <button id="play" type="button">&#9654; Play</button>
      <input id="step" type="range" min="0" max="0" value="0" aria-label="reverse step">
    </div>
    <div class="ends"><span>t = T: pure noise</span><span>t = 0: clean images</span></div>
    <table class="numbers">
      <tr><td>step</td><td id="step-number"></td><td id="step-note"></td></tr>
      <tr><td>t</td><td id="t"></td><td>the paper's time index, T down to 0</td></tr>
      <tr><td>&alpha;&#772;<sub>t</sub></td><td id="alpha-bar"></td>
          <td>x<sub>t</sub> holds &radic;&alpha;&#772;<sub>t</sub> = <span id="signal"></span> of x<sub>0</sub>
              and &radic;(1 &minus; &alpha;&#772;<sub>t</sub>) = <span id="noise"></span> of noise (eq. 4)</td></tr>
      <tr><td>&sigma;<sub>t</sub></td><td id="sigma"></td>
          <td>noise the step adds: x<sub>t&minus;1</sub> = &mu;<sub>&theta;</sub>(x<sub>t</sub>, t) + &sigma;<sub>t</sub> z
              (eq. 11, Algorithm 2)</td></tr>
    </table>
  </div>
  <figure style="margin: 0">
    <svg id="plot" width="300" height="150" viewBox="0 0 300 150" role="img"
         aria-label="noise level along the chain"></svg>
    <figcaption class="caption" style="font-size: 12px; max-width: 300px">
      Noise level &radic;(1 &minus; &alpha;&#772;<sub>t</sub>) (solid) and signal level
      &radic;&alpha;&#772;<sub>t</sub> (dashed) along the chain; the dot is the current step.
      Click to jump.</figcaption>
  </figure>
</div>

<section id="reverse" class="panel" role="tabpanel">
  <p class="caption">Each pair is one sample. <b>Left, x<sub>t</sub></b>: the sample at step t.
  <b>Right, predicted x<sub>0</sub></b> =
  <span class="formula">(x<sub>t</sub> &minus; &radic;(1 &minus; &alpha;&#772;<sub>t</sub>)
  &epsilon;<sub>&theta;</sub>(x<sub>t</sub>, t)) / &radic;&alpha;&#772;<sub>t</sub></span> (eq. 15):
  where the network thinks the chain will end. It looks like a digit long before x<sub>t</sub> does
  (the paper's Figure 6), and sharpens as the noise goes.</p>
  <div id="reverse-grid" class="grid"></div>
</section>

<section id="forward" class="panel" role="tabpanel" hidden>
  <p class="caption">The forward process needs no network: any x<sub>t</sub> is one formula away from a
  real digit, <span class="formula">x<sub>t</sub> = &radic;&alpha;&#772;<sub>t</sub> x<sub>0</sub> +
  &radic;(1 &minus; &alpha;&#772;<sub>t</sub>) &epsilon;</span>, &epsilon; ~ N(0, I) (eq. 4). Training
  (Algorithm 1) shows the network such an x<sub>t</sub> and asks it for &epsilon;. Each pair:
  <b>left, the real digit x<sub>0</sub></b>; <b>right, x<sub>t</sub></b> at the slider's t (the same
  &epsilon; at every t, so one noise pattern grows).</p>
  <p id="forward-missing" class="caption" hidden>This page was written without real digits
  (MNIST was not found), so there is nothing to noise here.</p>
  <div id="forward-grid" class="grid"></div>
</section>
</main>

<script type="application/json" id="viewer-data">{{data}}</script>
<script>
"use strict";
const data = JSON.parse(document.getElementById("viewer-data").textContent);
const SCALE = 3;                 // each image pixel becomes SCALE x SCALE screen pixels
const FRAMES_PER_SECOND = 12;
const last = data.frames - 1;
const slider = document.getElementById("step");
const playButton = document.getElementById("play");
let sheets = {};                 // the decoded sprite sheets: xt, x0, forward
let timer = null;

function loadImage(uri) {
  const image = new Image();
  image.src = uri;
  return image.decode().then(() => image);
}

function makeCanvas(kind, index) {
  const canvas = document.createElement("canvas");
  canvas.width = data.width;
  canvas.height = data.height;
  canvas.className = kind;
  canvas.dataset.index = index;
  canvas.style.width = data.width * SCALE + "px";
  canvas.style.height = data.height * SCALE + "px";
  return canvas;
}

// Frame `step` of image `index` sits at row `step`, column `index` of its sprite sheet.
function drawTile(canvas, sheet, step, index) {
  const context = canvas.getContext("2d");
  context.imageSmoothingEnabled = false;
  context.drawImage(sheet, index * data.width, step * data.height, data.width, data.height,
                    0, 0, data.width, data.height);
}

function formatNumber(value) {
  if (value === 0) return "0";
  return value < 0.001 ? value.toExponential(2) : value.toFixed(4);
}

// ---- the plot of the noise level ------------------------------------------

const PLOT = { left: 30, right: 290, top: 12, bottom: 122 };

function plotX(step) { return PLOT.left + (PLOT.right - PLOT.left) * step / Math.max(last, 1); }
function plotY(value) { return PLOT.bottom - (PLOT.bottom - PLOT.top) * value; }

function svgElement(name, attributes, text) {
  const element = document.createElementNS("http://www.w3.org/2000/svg", name);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, value);
  if (text !== undefined) element.textContent = text;
  document.getElementById("plot").appendChild(element);
  return element;
}

function drawPlot() {
  const line = (f) => data.alpha_bar.map((a, s) => plotX(s).toFixed(1) + "," + plotY(f(a)).toFixed(1)).join(" ");
  svgElement("rect", { x: PLOT.left, y: PLOT.top, width: PLOT.right - PLOT.left,
                       height: PLOT.bottom - PLOT.top, fill: "#f7f9fb", stroke: "#cfd5dd" });
  svgElement("text", { x: PLOT.left - 4, y: PLOT.top + 4, "text-anchor": "end", "font-size": 11 }, "1");
  svgElement("text", { x: PLOT.left - 4, y: PLOT.bottom + 4, "text-anchor": "end", "font-size": 11 }, "0");
  svgElement("text", { x: PLOT.left, y: PLOT.bottom + 16, "font-size": 11 }, "t = " + data.t[0]);
  svgElement("text", { x: PLOT.right, y: PLOT.bottom + 16, "text-anchor": "end", "font-size": 11 }, "t = 0");
  svgElement("polyline", { points: line((a) => Math.sqrt(1 - a)), fill: "none", stroke: "#2f6fc0", "stroke-width": 2 });
  svgElement("polyline", { points: line((a) => Math.sqrt(a)), fill: "none", stroke: "#d9822b",
                           "stroke-width": 2, "stroke-dasharray": "5 3" });
  return {
    cursor: svgElement("line", { y1: PLOT.top, y2: PLOT.bottom, stroke: "#1c2430", "stroke-width": 1 }),
    dot: svgElement("circle", { r: 4, fill: "#2f6fc0", stroke: "#fff", "stroke-width": 1.5 }),
  };
}

// ---- showing one step ------------------------------------------------------

function show(step) {
  step = Math.max(0, Math.min(last, step));
  slider.value = step;
  document.querySelectorAll("#reverse-grid canvas.xt").forEach((c) => drawTile(c, sheets.xt, step, +c.dataset.index));
  document.querySelectorAll("#reverse-grid canvas.x0").forEach((c) => drawTile(c, sheets.x0, step, +c.dataset.index));
  if (sheets.forward) {
    document.querySelectorAll("#forward-grid canvas.xt").forEach((c) => drawTile(c, sheets.forward, step, +c.dataset.index));
  }
  const t = data.t[step], alphaBar = data.alpha_bar[step];
  document.getElementById("step-number").textContent = step + " / " + last;
  document.getElementById("step-note").textContent =
    step === 0 ? "before the first step: pure noise" :
    step === last ? "after the last step: the finished samples" : "reverse steps taken so far";
  document.getElementById("t").textContent = t;
  document.getElementById("alpha-bar").textContent = formatNumber(alphaBar);
  document.getElementById("signal").textContent = Math.sqrt(alphaBar).toFixed(3);
  document.getElementById("noise").textContent = Math.sqrt(1 - alphaBar).toFixed(3);
  document.getElementById("sigma").textContent = step === last ? "none" : formatNumber(data.sigma[step]);
  marker.cursor.setAttribute("x1", plotX(step));
  marker.cursor.setAttribute("x2", plotX(step));
  marker.dot.setAttribute("cx", plotX(step));
  marker.dot.setAttribute("cy", plotY(Math.sqrt(1 - alphaBar)));
}

function pause() {
  clearInterval(timer);
  timer = null;
  playButton.innerHTML = "&#9654; Play";
}

function play() {
  if (+slider.value === last) show(0);          // at the end, play starts over
  timer = setInterval(() => {
    show(+slider.value + 1);
    if (+slider.value === last) pause();
  }, 1000 / FRAMES_PER_SECOND);
  playButton.innerHTML = "&#10074;&#10074; Pause";
}

function selectTab(name) {
  for (const other of ["reverse", "forward"]) {
    document.getElementById(other).hidden = other !== name;
    document.getElementById("tab-" + other).setAttribute("aria-selected", String(other === name));
  }
}

// ---- building the page -------------------------------------------------------

const marker = drawPlot();
slider.max = last;
// Rows of at most ceil(sqrt(N)) pairs, so that 16 samples make a 4 x 4 square.
const pairWidth = 2 * data.width * SCALE + 4 + 8 + 12;     // two canvases, their gap, padding, grid gap
document.getElementById("reverse-grid").style.maxWidth = Math.ceil(Math.sqrt(data.samples)) * pairWidth + "px";
for (let i = 0; i < data.samples; i++) {
  const card = document.createElement("div");
  card.className = "card";
  card.append(makeCanvas("xt", i), makeCanvas("x0", i));
  document.getElementById("reverse-grid").append(card);
}
for (let i = 0; i < data.forwardDigits; i++) {
  const card = document.createElement("div");
  card.className = "card";
  card.append(makeCanvas("x0", i), makeCanvas("xt", i));
  document.getElementById("forward-grid").append(card);
}
document.getElementById("forward-missing").hidden = data.forward !== null;

slider.addEventListener("input", () => { pause(); show(+slider.value); });
playButton.addEventListener("click", () => (timer === null ? play() : pause()));
document.getElementById("tab-reverse").addEventListener("click", () => selectTab("reverse"));
document.getElementById("tab-forward").addEventListener("click", () => selectTab("forward"));
document.getElementById("plot").addEventListener("click", (event) => {
  const box = event.currentTarget.getBoundingClientRect();
  const x = (event.clientX - box.left) * 300 / box.width;
  pause();
  show(Math.round((x - PLOT.left) / (PLOT.right - PLOT.left) * last));
});

const uris = { xt: data.xt, x0: data.x0 };
if (data.forward !== null) uris.forward = data.forward;
Promise.all(Object.entries(uris).map(([name, uri]) => loadImage(uri).then((image) => [name, image])))
  .then((loaded) => {
    sheets = Object.fromEntries(loaded);
    // The real digits x_0 are the forward process's frame at t = 0, the last one.
    document.querySelectorAll("#forward-grid canvas.x0").forEach((c) => drawTile(c, sheets.forward, last, +c.dataset.index));
    show(0);
    document.body.dataset.ready = "true";       // every frame is decoded; tests wait for this
  });
</script>
</body>
</html>
"""
