"""Fetch the four MNIST IDX files from public mirrors, checking every byte.

This is the only module of tinyddpm that touches the network, and only when
`download_mnist` is called (by `tinyddpm download-mnist`). Each file is
streamed into a temporary file next to its destination and renamed into
place only once its SHA-256 matches the known digest, so a broken or
tampered download can never be mistaken for the data set: it is deleted and
the next mirror is tried.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import urllib.request
from pathlib import Path

from tqdm import tqdm

__all__ = ["MIRRORS", "MNIST_SHA256", "MNISTDownloadError", "download_mnist"]

# Tried in order. LeCun's original site now refuses most automated downloads,
# so it is not listed.
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",  # PyTorch's mirror
    "https://storage.googleapis.com/cvdf-datasets/mnist/",  # TensorFlow's mirror
)

# SHA-256 of the original gzip files (sizes 9,912,422 / 28,881 / 1,648,877 /
# 4,542 bytes). The same four digests are published independently by several
# public projects, e.g. the MNIST dataset class of ankane/torchvision-ruby
# (lib/torchvision/datasets/mnist.rb) and Guild AI's resource documentation.
MNIST_SHA256 = {
    "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}

# The largest file is under 10 MB; a server sending far more is broken or
# hostile, and reading it all would only fill the disk before the hash fails.
MAX_BYTES = 64 * 2**20
CHUNK = 2**16


class MNISTDownloadError(RuntimeError):
    """A file could not be fetched and verified from any mirror."""


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch(url: str, dest: Path, expected: str, timeout: float, progress: bool) -> None:
    """Download `url` to `dest` if its SHA-256 is `expected`; raise otherwise.

    `dest` is never touched unless the whole download verified.
    """
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        digest = hashlib.sha256()
        # `timeout` bounds every blocking socket operation, so a mirror that
        # stops sending fails instead of hanging forever.
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            total = response.headers.get("Content-Length")
            bar = tqdm(
                total=int(total) if total and total.isdigit() else None,
                desc=dest.name,
                unit="B",
                unit_scale=True,
                disable=not progress,
                leave=False,
            )
            with bar:
                received = 0
                while chunk := response.read(CHUNK):
                    received += len(chunk)
                    if received > MAX_BYTES:
                        raise MNISTDownloadError(f"more than {MAX_BYTES} bytes, giving up")
                    digest.update(chunk)
                    out.write(chunk)
                    bar.update(len(chunk))
        got = digest.hexdigest()
        if got != expected:
            raise MNISTDownloadError(f"SHA-256 mismatch: got {got}, expected {expected}")
        os.replace(tmp, dest)
    except BaseException:
        os.unlink(tmp)
        raise


def download_mnist(
    to_dir,
    mirrors=None,
    timeout: float = 30.0,
    progress: bool = True,
    sha256: dict[str, str] | None = None,
) -> list[Path]:
    """Download and verify the MNIST gzip files into `to_dir`.

    `mirrors` (base URLs, tried in order) defaults to `MIRRORS`; `sha256`
    (file name -> hex digest) defaults to `MNIST_SHA256` and also decides
    which files are fetched. Files already present with the right digest are
    kept as they are. Returns the paths of all files, in table order.
    Raises `MNISTDownloadError` naming the file and each mirror's failure.
    """
    mirrors = list(MIRRORS if mirrors is None else mirrors)
    table = MNIST_SHA256 if sha256 is None else sha256
    if not mirrors:
        raise ValueError("no mirrors to download MNIST from")
    to_dir = Path(to_dir).expanduser()
    to_dir.mkdir(parents=True, exist_ok=True)

    paths = []
    for name, expected in table.items():
        dest = to_dir / name
        paths.append(dest)
        if dest.is_file() and _sha256_of(dest) == expected:
            continue
        failures = []
        for mirror in mirrors:
            url = mirror.rstrip("/") + "/" + name
            try:
                _fetch(url, dest, expected, timeout, progress)
                break
            # URLError, HTTPError and socket timeouts are OSErrors; a
            # connection dropped mid-body is an http.client.IncompleteRead.
            except MNISTDownloadError as exc:
                failures.append(f"  {url}: {exc}")
            except (OSError, http.client.HTTPException) as exc:
                failures.append(f"  {url}: {type(exc).__name__}: {exc}")
        else:
            raise MNISTDownloadError(
                f"could not download {name} from any mirror:\n" + "\n".join(failures)
            )
    return paths
