"""Pictures of samples: PNG grids, trajectory strips and GIFs, with Pillow.

All functions take host (NumPy) arrays of images in the model's range
[-1, 1], laid out NCHW as everywhere in the project, with 1 (gray) or 3
(RGB) channels. Values outside [-1, 1] are clipped, so a raw x_t from the
middle of the reverse process can be shown too.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

PADDING = 2          # pixels of background between (and around) the tiles of a grid
BACKGROUND = 0       # black, like MNIST's own background


def to_uint8(images):
    """[-1, 1] -> {0..255}: -1 is black (0), 1 is white (255); rounded, not truncated."""
    x = np.clip(np.asarray(images, dtype=np.float64), -1.0, 1.0)
    return np.round((x + 1.0) * 127.5).astype(np.uint8)


def make_grid(images, nrow=None, padding=PADDING):
    """Tile images (N, C, H, W) into one uint8 picture (H', W') or (H', W', 3).

    nrow: tiles per row; by default ceil(sqrt(N)), so 64 images make an 8 x 8
    square. Every tile is surrounded by `padding` pixels of background.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape (N, 1 or 3, H, W), got {images.shape}")
    N, C, H, W = images.shape
    if N == 0:
        raise ValueError("no images to tile")
    ncol = nrow if nrow is not None else math.ceil(math.sqrt(N))
    if ncol < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    nrows = math.ceil(N / ncol)
    tiles = to_uint8(images).transpose(0, 2, 3, 1)                       # (N, H, W, C)
    grid = np.full((nrows * (H + padding) + padding, ncol * (W + padding) + padding, C),
                   BACKGROUND, dtype=np.uint8)
    for i, tile in enumerate(tiles):
        top = padding + (i // ncol) * (H + padding)
        left = padding + (i % ncol) * (W + padding)
        grid[top:top + H, left:left + W] = tile
    return grid[:, :, 0] if C == 1 else grid


def _pil(grid):
    # A 2-D uint8 array becomes a gray ("L") image, (H, W, 3) an RGB one.
    return Image.fromarray(grid)


def save_grid(images, path, nrow=None):
    """Write images (N, C, H, W) in [-1, 1] as one PNG grid (see make_grid)."""
    _pil(make_grid(images, nrow)).save(Path(path))


def _frames(trajectory):
    """The trajectory as an array (S, N, C, H, W): S snapshots of the same N images.

    Accepts that array itself, or a list of S arrays (N, C, H, W), or the list of
    (t, x_t) pairs that GaussianDiffusion.sample(return_trajectory=...) returns.
    """
    if isinstance(trajectory, np.ndarray):
        frames = trajectory
    else:
        frames = np.stack([np.asarray(item[1] if isinstance(item, tuple) else item)
                           for item in trajectory])
    if frames.ndim != 5:
        raise ValueError(f"expected a trajectory (S, N, C, H, W), got shape {frames.shape}")
    return frames


def save_strip(trajectory, path):
    """One PNG with a row per sample and a column per snapshot, noise on the left, digit on the right."""
    frames = _frames(trajectory)
    S, N = frames.shape[:2]
    # Row-major tiling of (N, S) puts sample n's snapshots side by side in row n.
    by_sample = frames.transpose(1, 0, 2, 3, 4).reshape(N * S, *frames.shape[2:])
    save_grid(by_sample, path, nrow=S)


def save_gif(trajectory, path, duration_ms=80, hold_ms=1500):
    """An animated GIF: each frame a grid of the N samples at one snapshot.

    The last frame (the finished samples) is held for `hold_ms` before the loop restarts.
    """
    frames = [_pil(make_grid(x)) for x in _frames(trajectory)]
    durations = [duration_ms] * (len(frames) - 1) + [hold_ms]
    frames[0].save(Path(path), save_all=True, append_images=frames[1:], duration=durations, loop=0)


def save_trajectory(trajectory, path):
    """save_gif for a path ending in .gif, save_strip otherwise."""
    if Path(path).suffix.lower() == ".gif":
        save_gif(trajectory, path)
    else:
        save_strip(trajectory, path)
