"""The MNIST feature network: the shipped weights, their hash check, save/load, training."""
import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

from tinyddpm import classifier as clf
from tinyddpm import evaluate
from tinyddpm.data import load_mnist


@pytest.fixture(scope="module")
def shipped():
    return clf.load_classifier()


@pytest.fixture(scope="module")
def test_set():
    return load_mnist("test")


def test_shipped_weights_match_the_sha256_in_their_sidecar():
    meta = json.loads(clf.sidecar_path(clf.DEFAULT_WEIGHTS).read_text())
    assert clf.file_sha256(clf.DEFAULT_WEIGHTS) == meta["sha256"]
    assert meta["command"].startswith("tinyddpm train-classifier ")


def test_shipped_weights_are_small_float32_and_load_without_pickle():
    assert clf.DEFAULT_WEIGHTS.stat().st_size < 1_000_000
    with np.load(clf.DEFAULT_WEIGHTS, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    assert all(a.dtype == np.float32 for a in arrays.values())
    assert sum(a.size for a in arrays.values()) == clf.MNISTClassifier().num_parameters()


def test_shipped_classifier_reaches_99_percent_on_the_10k_test_digits(shipped, test_set):
    model, meta = shipped
    images, labels = test_set
    acc = clf.accuracy(model, images, labels)
    assert acc >= 0.99
    # The sidecar reports the number this very file gives.
    assert acc == pytest.approx(meta["test_accuracy"], abs=1e-4)


def test_classify_gives_128_features_and_probabilities(shipped, test_set):
    model, _ = shipped
    features, probs = clf.classify(model, test_set[0][:37], batch_size=16)
    assert features.shape == (37, clf.FEATURE_DIM) and probs.shape == (37, 10)
    assert features.dtype == np.float64 and (features >= 0).all()  # after a ReLU
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def _copy_shipped(tmp_path):
    dst = tmp_path / "classifier.npz"
    shutil.copy(clf.DEFAULT_WEIGHTS, dst)
    shutil.copy(clf.sidecar_path(clf.DEFAULT_WEIGHTS), clf.sidecar_path(dst))
    return dst


def test_a_tampered_weight_file_is_refused(tmp_path):
    path = _copy_shipped(tmp_path)
    clf.load_classifier(path)  # the untouched copy loads
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one bit inside the weights
    path.write_bytes(bytes(raw))
    with pytest.raises(clf.ClassifierError, match="SHA-256"):
        clf.load_classifier(path)


def test_weights_saved_again_with_other_values_are_refused(tmp_path):
    path = _copy_shipped(tmp_path)
    with np.load(path) as npz:
        state = {k: npz[k] for k in npz.files}
    state["fc2.bias"] = state["fc2.bias"] + 1.0  # a valid .npz, but not the recorded one
    np.savez(path, **state)
    with pytest.raises(clf.ClassifierError, match="altered"):
        clf.load_classifier(path)


def test_missing_sidecar_is_refused(tmp_path):
    path = _copy_shipped(tmp_path)
    clf.sidecar_path(path).unlink()
    with pytest.raises(clf.ClassifierError, match="missing"):
        clf.load_classifier(path)


def test_save_then_load_gives_the_same_network(tmp_path):
    model = clf.MNISTClassifier(rng=np.random.default_rng(1))
    meta = clf.save_classifier(model, tmp_path / "c.npz", {"test_accuracy": 0.1})
    loaded, meta2 = clf.load_classifier(tmp_path / "c.npz")
    assert meta2 == meta and meta["sha256"] == clf.file_sha256(tmp_path / "c.npz")
    x = np.random.default_rng(2).uniform(-1, 1, (5, 1, 28, 28)).astype(np.float32)
    np.testing.assert_array_equal(clf.classify(model, x)[1], clf.classify(loaded, x)[1])


def test_train_classifier_command_writes_weights_that_really_learned(tmp_path, monkeypatch):
    # The real run takes minutes; two epochs of 2,000 digits reach about 75% on 1,000 test digits.
    full = {"train": load_mnist("train"), "test": load_mnist("test")}
    subset = {"train": 2000, "test": 1000}
    monkeypatch.setattr(clf, "load_mnist",
                        lambda split, data_dir=None: tuple(a[:subset[split]] for a in full[split]))
    out = tmp_path / "small.npz"
    args = SimpleNamespace(epochs=2, seed=3, out=str(out), batch_size=64, lr=1e-3,
                           data_dir=None, device="cpu")
    assert evaluate.run_train_classifier(args) == 0
    meta = json.loads(clf.sidecar_path(out).read_text())
    assert meta["sha256"] == clf.file_sha256(out)
    assert meta["command"] == (f"tinyddpm train-classifier --epochs 2 --seed 3 --batch-size 64 "
                               f"--lr 0.001 --device cpu --out {out}")
    # The recorded accuracy is what the written weights give, and far above chance (0.1).
    model, _ = clf.load_classifier(out)
    images, labels = (a[:1000] for a in full["test"])
    assert clf.accuracy(model, images, labels) == pytest.approx(meta["test_accuracy"], abs=1e-9)
    assert meta["test_accuracy"] > 0.6


def test_classifier_weights_that_are_too_large_or_misshapen_are_refused(tmp_path):
    path = _copy_shipped(tmp_path)
    with np.load(path) as npz:
        state = {k: npz[k] for k in npz.files}
    state["fc2.bias"] = state["fc2.bias"].astype(np.float64)

    def refused(words):
        np.savez(path, **state)
        side = clf.sidecar_path(path)
        side.write_text(json.dumps(dict(json.loads(side.read_text()), sha256=clf.file_sha256(path))))
        with pytest.raises(clf.ClassifierError, match=words):
            clf.load_classifier(path)

    refused("do not fit the network")
    state["fc2.bias"] = np.zeros(11, np.float32)
    refused("do not fit the network")
    state["fc2.bias"] = np.zeros(5 * 2**20, np.float32)        # 20 MB
    refused("at most 16,777,216 are read")


def test_train_classifier_refuses_bad_settings(tmp_path, capsys):
    args = SimpleNamespace(epochs=0, seed=0, out=str(tmp_path / "x.npz"), batch_size=64, lr=1e-3,
                           data_dir=None, device="cpu")
    assert evaluate.run_train_classifier(args) != 0
    err = capsys.readouterr().err
    assert "--epochs" in err and err.count("\n") == 1
