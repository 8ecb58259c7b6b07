"""Pictures for the examples: matplotlib when it is installed, Pillow otherwise.

matplotlib is an optional extra (`pip install -e '.[plot]'`); Pillow is always
there. Each example asks `pyplot()` first and falls back to the small Pillow
drawings below (scatter panels, a line plot, a row of images), which need no
fonts beyond Pillow's built-in one.
"""
import numpy as np
from PIL import Image, ImageDraw, ImageFont


def pyplot():
    """matplotlib.pyplot with a file-only backend, or None when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")          # no window: the examples only write files
    import matplotlib.pyplot as plt
    return plt


def _font(size=12):
    try:
        return ImageFont.load_default(size=size)    # Pillow >= 10.1 scales its built-in font
    except TypeError:
        return ImageFont.load_default()


def save_png(image, path):
    image.save(path, format="PNG", optimize=True)


# =============================================================================
# Pillow fallbacks
# =============================================================================

def scatter_panels(panels, lim, size=220, dot=1, pad=22):
    """A row of square scatter plots.

    panels: list of (title, points (N, 2), (r, g, b)); lim: the axes span
    [-lim, lim] in both directions. Returns a PIL image.
    """
    font = _font()
    image = Image.new("RGB", (len(panels) * (size + pad) + pad, size + 2 * pad), "white")
    draw = ImageDraw.Draw(image)
    for i, (title, points, color) in enumerate(panels):
        x0, y0 = pad + i * (size + pad), pad
        draw.rectangle([x0, y0, x0 + size, y0 + size], outline=(160, 160, 160))
        draw.text((x0, 4), title, fill="black", font=font)
        pts = np.asarray(points, dtype=np.float64)
        keep = np.all(np.abs(pts) <= lim, axis=1)
        px = x0 + (pts[keep, 0] + lim) / (2 * lim) * size
        py = y0 + (lim - pts[keep, 1]) / (2 * lim) * size        # y grows upwards on a plot
        for u, v in zip(px, py):
            draw.ellipse([u - dot, v - dot, u + dot, v + dot], fill=color)
    return image


def line_plot(x, series, title, xlabel, ylabel, size=(560, 340), pad=50):
    """Lines y(x) on one set of axes with y in [0, 1]. series: list of (label, y, (r, g, b))."""
    font = _font()
    w, h = size
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = pad, 30, w - 20, h - pad
    draw.rectangle([left, top, right, bottom], outline="black")
    draw.text(((left + right - draw.textlength(title, font=font)) // 2, 8), title, fill="black", font=font)
    draw.text(((left + right) // 2 - 10, h - 22), xlabel, fill="black", font=font)
    draw.text((4, top - 18), ylabel, fill="black", font=font)
    x = np.asarray(x, dtype=np.float64)
    sx = lambda v: left + (v - x.min()) / (x.max() - x.min()) * (right - left)   # noqa: E731
    sy = lambda v: bottom - v * (bottom - top)                                  # noqa: E731
    for tick in (0.0, 0.5, 1.0):
        draw.text((8, sy(tick) - 6), f"{tick:.1f}", fill="black", font=font)
    for tick in _nice_ticks(x.min(), x.max()):
        draw.text((sx(tick) - 8, bottom + 4), f"{tick:g}", fill="black", font=font)
    for k, (label, y, color) in enumerate(series):
        y = np.asarray(y, dtype=np.float64)
        draw.line(list(zip(sx(x).tolist(), sy(y).tolist())), fill=color, width=2)
        draw.line([right - 150, top + 14 + 16 * k, right - 125, top + 14 + 16 * k], fill=color, width=2)
        draw.text((right - 120, top + 7 + 16 * k), label, fill="black", font=font)
    return image


def _nice_ticks(lo, hi, n=4):
    """Round tick values (multiples of 1, 2, 2.5 or 5 times a power of ten) in [lo, hi]."""
    raw = (hi - lo) / n
    power = 10 ** np.floor(np.log10(raw))
    step = min((m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw), default=10 * power)
    return np.arange(np.ceil(lo / step) * step, hi + 1e-9, step)


def image_row(images, titles, scale=4, pad=4, label_height=16):
    """Greyscale images in [-1, 1] side by side, each enlarged `scale` times, a title above each."""
    font = _font()
    h, w = images[0].shape
    cell_w, cell_h = w * scale, h * scale
    canvas = Image.new("L", (len(images) * (cell_w + pad) + pad, cell_h + label_height + 2 * pad), 255)
    draw = ImageDraw.Draw(canvas)
    for i, (img, title) in enumerate(zip(images, titles)):
        pixels = ((np.clip(img, -1, 1) + 1) * 127.5).round().astype(np.uint8)
        tile = Image.fromarray(pixels).resize((cell_w, cell_h), Image.NEAREST)
        x = pad + i * (cell_w + pad)
        draw.text((x, pad), title, fill=0, font=font)
        canvas.paste(tile, (x, pad + label_height))
    return canvas
