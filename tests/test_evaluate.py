"""FID, Inception Score, reading samples files and `tinyddpm eval`.

Uses the shipped classifier and subsets of 1,000 MNIST digits, so the
whole file runs in seconds.
"""
import json
import zipfile
from types import SimpleNamespace

import numpy as np
import pytest
from hostile import peak_bytes

from tinyddpm import classifier as clf
from tinyddpm import evaluate as ev
from tinyddpm.data import load_mnist


@pytest.fixture(scope="module")
def model():
    return clf.load_classifier()[0]


@pytest.fixture(scope="module")
def digits():
    """1,000 training digits and 1,000 test digits, float32 (N, 1, 28, 28) in [-1, 1]."""
    return load_mnist("train")[0][:1000], load_mnist("test")[0][:1000]


@pytest.fixture(scope="module")
def test_outputs(model, digits):
    """Features (1000, 128) and class probabilities (1000, 10) of the test digits."""
    return clf.classify(model, digits[1])


@pytest.fixture(scope="module")
def reference(test_outputs):
    return ev.gaussian_stats(test_outputs[0])


def _stats(model, images):
    return ev.gaussian_stats(clf.classify(model, images)[0])


def _add_noise(images, sigma, seed=0):
    noise = np.random.default_rng(seed).standard_normal(images.shape)
    return np.clip(images + sigma * noise, -1, 1).astype(np.float32)


# =============================================================================
# The Frechet distance
# =============================================================================

def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    m1, m2 = rng.standard_normal(6), rng.standard_normal(6)
    s1, s2 = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    expected = np.sum((m1 - m2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert ev.frechet_distance(m1, np.diag(s1), m2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_matches_the_closed_form_in_one_dimension():
    # N(1, 4) vs N(-2, 9): 3^2 + 4 + 9 - 2 * 6 = 10
    assert ev.frechet_distance([1.0], [[4.0]], [-2.0], [[9.0]]) == pytest.approx(10.0, rel=1e-12)


def test_frechet_distance_survives_singular_covariances():
    # Rank-1 covariances: sqrtm of their product is hopeless without the eps shift.
    u, v = np.array([1.0, 0, 0]), np.array([0, 1.0, 0])
    d = ev.frechet_distance(np.zeros(3), np.outer(u, u), np.zeros(3), np.outer(v, v))
    assert np.isfinite(d) and d == pytest.approx(2.0, abs=1e-4)


def test_fid_of_a_set_with_itself_is_zero(reference):
    mu, cov = reference
    assert abs(ev.frechet_distance(mu, cov, mu, cov)) < 1e-6 * np.trace(cov)


def test_fid_is_symmetric(model, digits, reference):
    mu, cov = _stats(model, digits[0])
    ab = ev.frechet_distance(mu, cov, *reference)
    ba = ev.frechet_distance(*reference, mu, cov)
    assert ab > 0 and ab == pytest.approx(ba, rel=1e-6)


def test_fid_grows_with_the_noise_added_to_real_digits(model, digits, test_outputs):
    # Noisy copies of the very digits the reference is made of, so that the
    # noise is the only difference (two different sets of 1,000 real digits
    # already differ by more than sigma 0.1 does: see docs/evaluation.md).
    clean = digits[1]
    reference = ev.gaussian_stats(test_outputs[0])
    fids = [ev.frechet_distance(*reference, *reference)]
    fids += [ev.frechet_distance(*_stats(model, _add_noise(clean, s)), *reference) for s in (0.1, 0.3, 0.5)]
    assert abs(fids[0]) < 1e-6 and all(a < b for a, b in zip(fids, fids[1:])), fids


# =============================================================================
# The Inception Score
# =============================================================================

def test_inception_score_is_1_for_identical_predictions_and_k_for_certain_balanced_ones():
    assert ev.inception_score(np.tile([0.7, 0.2, 0.1], (8, 1)))[0] == pytest.approx(1.0)
    assert ev.inception_score(np.tile(np.eye(10), (3, 1)))[0] == pytest.approx(10.0)


def test_inception_score_over_splits_averages_the_splits():
    probs = np.concatenate([np.tile(np.eye(2), (2, 1)), np.tile([[0.5, 0.5]], (4, 1))])
    mean, std = ev.inception_score(probs, splits=2)
    assert (mean, std) == pytest.approx((1.5, 0.5))


def test_inception_score_of_real_digits_is_high_and_of_one_repeated_image_is_1(model, digits,
                                                                             test_outputs):
    real = ev.inception_score(test_outputs[1])[0]
    assert 9.0 < real <= 10.0  # about 9.7 (docs/evaluation.md)
    _, probs = clf.classify(model, np.repeat(digits[1][:1], 200, axis=0))
    assert ev.inception_score(probs)[0] == pytest.approx(1.0, abs=1e-6)


# =============================================================================
# Reading samples: formats accepted and refused
# =============================================================================

def _formats(images):
    """The same pictures as uint8, [0, 1] and [-1, 1] floats, in both layouts."""
    u8 = np.round((images[:, 0] + 1) * 127.5).astype(np.uint8)      # (N, 28, 28)
    unit = u8.astype(np.float32) / 255
    return {
        "uint8 [0, 255] (N, 28, 28)": u8,
        "uint8 [0, 255] (N, 1, 28, 28)": u8[:, None],
        "float [0, 1] (N, 28, 28)": unit,
        "float [0, 1] (N, 1, 28, 28)": unit[:, None].astype(np.float64),
        "float [-1, 1] (N, 28, 28)": unit * 2 - 1,
        "float [-1, 1] (N, 1, 28, 28)": (unit * 2 - 1)[:, None],
    }


def test_every_format_is_detected_and_gives_the_same_features(model, digits):
    features = {}
    for expected, array in _formats(digits[1][:50]).items():
        images, fmt = ev.images_from_array(array)
        assert fmt == expected
        assert images.shape == (50, 1, 28, 28) and images.dtype == np.float32
        features[fmt] = clf.classify(model, images)[0]
    first = next(iter(features.values()))
    for f in features.values():
        np.testing.assert_allclose(f, first, rtol=1e-5, atol=1e-5)


def test_uint8_pixels_map_onto_the_training_scale(digits):
    # load_mnist maps byte u to u / 255 * 2 - 1; a uint8 file must land on the same values.
    u8 = np.round((digits[1][:20] + 1) * 127.5).astype(np.uint8)
    np.testing.assert_array_equal(ev.images_from_array(u8)[0], digits[1][:20])


@pytest.mark.parametrize("array, message", [
    (np.zeros((4, 32, 32), np.uint8), "shape"),
    (np.zeros((4, 3, 28, 28), np.uint8), "shape"),
    (np.zeros((28, 28), np.uint8), "shape"),
    (np.zeros((0, 28, 28), np.uint8), "no images"),
    (np.full((2, 28, 28), np.nan, np.float32), "NaN"),
    (np.full((2, 28, 28), np.inf, np.float32), "NaN or infinite"),
    (np.full((2, 28, 28), 255.0, np.float32), "span"),
    (np.full((2, 28, 28), -1.5, np.float32), "span"),
    (np.zeros((2, 28, 28), np.int64), "dtype"),
    (np.zeros((2, 28, 28), bool), "dtype"),
])
def test_malformed_arrays_are_refused_with_the_reason(array, message):
    with pytest.raises(ev.SamplesError, match=message):
        ev.images_from_array(array)


def test_samples_files_take_the_key_samples_or_a_single_array(tmp_path):
    x = np.zeros((3, 28, 28), np.uint8)
    np.savez(tmp_path / "one.npz", whatever=x)
    np.savez(tmp_path / "keyed.npz", samples=x, labels=np.arange(3))
    np.save(tmp_path / "plain.npy", x)
    for name in ("one.npz", "keyed.npz", "plain.npy"):
        assert ev.load_samples(tmp_path / name)[0].shape == (3, 1, 28, 28)


@pytest.mark.parametrize("arrays, message", [
    ({"a": np.zeros((3, 28, 28)), "b": np.zeros((3, 28, 28))}, "2 arrays"),
    ({}, "no arrays"),
    ({"samples": np.array([None, 1], dtype=object)}, "pickle"),
])
def test_ambiguous_or_unreadable_files_are_refused(tmp_path, arrays, message):
    path = tmp_path / "s.npz"
    np.savez(path, **arrays)
    with pytest.raises(ev.SamplesError, match=message):
        ev.load_samples(path)


def test_a_missing_or_non_numpy_file_is_refused(tmp_path):
    with pytest.raises(ev.SamplesError, match="no such file"):
        ev.load_samples(tmp_path / "nope.npz")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(ev.SamplesError, match="not a readable"):
        ev.load_samples(tmp_path / "text.npz")


# =============================================================================
# The test-set statistics cache and `tinyddpm eval`
# =============================================================================

def test_reference_statistics_are_cached_under_the_classifier_hash(model, digits, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    # 500 test digits stand in for the 10,000, to keep the test fast.
    monkeypatch.setattr(ev, "load_mnist", lambda split, data_dir=None: (digits[1][:500], None))
    mu, cov = ev.reference_statistics(model, "ab" * 32)
    cached = tmp_path / "tinyddpm" / f"fid-stats-mnist-test-{'ab' * 8}.npz"
    assert cached.is_file()
    monkeypatch.setattr(ev, "load_mnist", None)  # a second call must not need the data
    mu2, cov2 = ev.reference_statistics(model, "ab" * 32)
    np.testing.assert_array_equal(mu, mu2)
    np.testing.assert_array_equal(cov, cov2)


def _eval_args(**kw):
    args = dict(path=None, samples=None, calibrate=False, classifier=None, data_dir=None,
                device="cpu", n=None, steps=None, sampler="ancestral", eta=0.0, seed=0,
                batch_size=None, bpd=False, bpd_n=None, label=None, guidance=0.0, guidance_sweep=None)
    args.update(kw)
    return SimpleNamespace(**args)


def test_run_eval_on_a_samples_file_prints_one_json_line(model, digits, reference, tmp_path,
                                                          monkeypatch, capsys):
    monkeypatch.setattr(ev, "reference_statistics", lambda *a, **k: reference)
    results = {}
    for name, images in (("digits", digits[0][:300]),
                         ("noise", np.random.default_rng(0).integers(0, 256, (300, 28, 28), np.uint8))):
        np.savez(tmp_path / f"{name}.npz", samples=images)
        assert ev.run_eval(_eval_args(samples=str(tmp_path / f"{name}.npz"))) == 0
        out = capsys.readouterr().out
        assert out.count("\n") == 1
        results[name] = json.loads(out)
    real = results["digits"]
    for key in ("fid", "inception_score", "confidence", "class_histogram", "n", "format"):
        assert key in real
    assert real["n"] == 300 and sum(real["class_histogram"]) == 300
    assert real["format"] == "float [-1, 1] (N, 1, 28, 28)"
    assert results["noise"]["format"] == "uint8 [0, 255] (N, 28, 28)"
    assert 0 < real["fid"] < results["noise"]["fid"]
    assert 1 <= results["noise"]["inception_score"] < real["inception_score"] <= 10


@pytest.mark.parametrize("kind", ["missing", "malformed", "nothing", "negative n"])
def test_run_eval_user_errors_exit_nonzero_with_one_line(tmp_path, capsys, kind):
    path = tmp_path / "bad.npz"
    np.savez(path, samples=np.zeros((2, 27, 27), np.uint8))
    args = {"missing": _eval_args(samples=str(tmp_path / "none.npz")),
            "malformed": _eval_args(samples=str(path)),
            "nothing": _eval_args(),
            "negative n": _eval_args(path=str(path), n=-3)}[kind]
    assert ev.run_eval(args) != 0
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """An untrained mnist-tiny checkpoint with T = 4, so that the bound takes 4 network calls."""
    from autograd import optim
    from tinyddpm.checkpoint import save_checkpoint
    from tinyddpm.config import TrainConfig
    from tinyddpm.train import build_model

    config = TrainConfig(T=4, sample_steps=2).validate()
    net = build_model(config)
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.npz"
    state = np.random.default_rng(0).bit_generator.state     # the generators' states as train.py saves them
    rng = {"data": {"epoch_start": state, "batches_taken": 0}, "noise": state, "dropout": state}
    save_checkpoint(path, net, optim.EMA(net.parameters()), optim.Adam(net.parameters(), 1e-4),
                    0, rng, config)
    return path


def test_run_eval_on_a_checkpoint_samples_scores_and_reports_bits_per_dim(
        tiny_checkpoint, reference, monkeypatch, capsys):
    monkeypatch.setattr(ev, "reference_statistics", lambda *a, **k: reference)
    args = _eval_args(path=str(tiny_checkpoint), n=4, steps=2, bpd=True, bpd_n=2)
    assert ev.run_eval(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 4 and result["steps"] == 2 and result["sampler"] == "ancestral"
    assert np.isfinite(result["fid"]) and result["fid"] > 0
    # An untrained network is a poor density model, but the bound is still a finite positive number.
    assert result["bpd_n"] == 2 and 0 < result["bpd"] < np.inf


@pytest.fixture(scope="module")
def tiny_conditional_checkpoint(tmp_path_factory):
    """An untrained class-conditional mnist-tiny checkpoint with T = 4, its weights moved off
    their zero initialization so that the label changes the prediction."""
    from autograd import optim
    from tinyddpm.checkpoint import save_checkpoint
    from tinyddpm.config import TrainConfig
    from tinyddpm.train import build_model

    config = TrainConfig(T=4, sample_steps=2, class_cond=True).validate()
    net = build_model(config)
    for p in net.parameters():
        p.data += 0.05 * np.random.default_rng(1).standard_normal(p.shape).astype(np.float32)
    path = tmp_path_factory.mktemp("ckpt") / "conditional.npz"
    state = np.random.default_rng(0).bit_generator.state
    rng = {"data": {"epoch_start": state, "batches_taken": 0}, "noise": state, "dropout": state}
    save_checkpoint(path, net, optim.EMA(net.parameters()), optim.Adam(net.parameters(), 1e-4),
                    0, rng, config)
    return path


def test_a_guidance_sweep_prints_one_line_per_weight_with_label_accuracy(tiny_conditional_checkpoint, reference,
                                                                         monkeypatch, capsys):
    monkeypatch.setattr(ev, "reference_statistics", lambda *a, **k: reference)
    args = _eval_args(path=str(tiny_conditional_checkpoint), n=20, steps=2, guidance_sweep="0,1.5")
    assert ev.run_eval(args) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["guidance"], r["label"], r["n"]) for r in lines] == [(0.0, "all", 20), (1.5, "all", 20)]
    for r in lines:
        assert 0 <= r["label_accuracy"] <= 1 and len(r["label_accuracy_per_digit"]) == 10
        assert sum(r["class_histogram"]) == 20 and np.isfinite(r["fid"])
    assert lines[0]["fid"] != lines[1]["fid"], "the guidance must change the samples"


@pytest.mark.parametrize("options, message", [
    (dict(guidance_sweep="0,x"), "--guidance-sweep takes numbers separated by commas"),
    (dict(guidance_sweep="0,-1"), "guidance must be a finite number >= 0"),
    (dict(guidance=2.0), "--guidance needs --label"),
    (dict(label="12"), "--label must be a digit 0..9 or 'all'"),
    (dict(guidance_sweep="0,1", bpd=True), "--guidance-sweep samples a checkpoint"),
])
def test_bad_guidance_options_are_refused_in_one_line(tiny_conditional_checkpoint, capsys, options, message):
    assert ev.run_eval(_eval_args(path=str(tiny_conditional_checkpoint), **options)) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_a_label_for_an_unconditional_checkpoint_is_refused(tiny_checkpoint, reference, monkeypatch, capsys):
    monkeypatch.setattr(ev, "reference_statistics", lambda *a, **k: reference)
    assert ev.run_eval(_eval_args(path=str(tiny_checkpoint), n=4, steps=2, label="3")) == 1
    err = capsys.readouterr().err
    assert "holds an unconditional model" in err and err.count("\n") == 1


def test_a_checkpoint_given_as_samples_is_refused(tiny_checkpoint, capsys):
    assert ev.run_eval(_eval_args(samples=str(tiny_checkpoint))) == 1
    assert "is a checkpoint" in capsys.readouterr().err


# =============================================================================
# Hostile and foreign samples files: one line, bounded memory, other layouts, labels, progress
# =============================================================================

def _eval_samples(tmp_path, capsys, monkeypatch=None, reference=None, **arrays):
    """Run `tinyddpm eval --samples` on an .npz of `arrays`: (exit status, stdout, stderr)."""
    if monkeypatch is not None:
        monkeypatch.setattr(ev, "reference_statistics", lambda *a, **k: reference)
    path = tmp_path / "s.npz"
    np.savez(path, **arrays)
    status = ev.run_eval(_eval_args(samples=str(path)))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.mark.parametrize("arrays, words", [
    (dict(samples=np.zeros((1, 28, 28), np.uint8)), "holds 1 image; FID fits a covariance and needs at least 2"),
    (dict(samples=np.zeros((0, 1, 28, 28), np.float32)), "holds no images"),
    (dict(samples=np.zeros((5, 28, 28, 3), np.uint8)), "MNIST samples have 1 channel"),
    (dict(samples=np.zeros((5, 28, 28), np.int32)), "dtype int32 is not supported"),
    (dict(samples=np.full((5, 28, 28), np.nan, np.float32)), "3920 values are NaN or infinite"),
    (dict(samples=np.asfortranarray(np.zeros((5, 28, 28), np.float32))), "Fortran order"),
    (dict(samples=np.zeros((5, 28, 28), np.uint8), extra=np.zeros(3)), "unknown entries 'extra'"),
    (dict(samples=np.zeros((5, 28, 28), np.uint8), labels=np.zeros(4, np.int64)), "should be 5 integer labels"),
    (dict(samples=np.zeros((5, 28, 28), np.uint8), labels=np.full(5, 0.5)), "should be 5 integer labels"),
    (dict(samples=np.zeros((5, 28, 28), np.uint8), labels=np.full(5, 10)), "labels outside 0..9"),
    (dict(arr_0=np.zeros((5, 28, 28, 1), np.uint8), arr_1=np.full(5, -1)), "labels outside 0..9"),
], ids=["one image", "no image", "three channels", "int32", "NaN", "Fortran", "extra entry",
        "labels too few", "float labels", "label 10", "arr_1 label -1"])
def test_bad_samples_files_are_one_line_errors(tmp_path, capsys, monkeypatch, reference, arrays, words):
    status, out, err = _eval_samples(tmp_path, capsys, monkeypatch, reference, **arrays)
    assert status == 1 and out == "" and err.count("\n") == 1 and words in err, err
    assert str(tmp_path / "s.npz") in err


def _npz_declaring(path, shape, dtype="|u1", chunk=2**20):
    """An .npz whose single deflated entry 'samples' holds zeros of `shape`, written a chunk at a time."""
    header = {"descr": dtype, "fortran_order": False, "shape": shape}
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        with zf.open("samples.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, header)
            for start in range(0, nbytes, chunk):
                f.write(bytes(min(chunk, nbytes - start)))


def test_more_than_the_limit_is_refused_from_the_header_alone(tmp_path, capsys):
    # 700,000 images in a file of about 0.5 MB: np.load of it took 11 GB.
    path = tmp_path / "many.npz"
    _npz_declaring(path, (700_000, 28, 28))
    assert path.stat().st_size < 2**20
    assert peak_bytes(ev.SamplesFile, path, refusal=ev.SamplesError) < 2**20
    assert ev.run_eval(_eval_args(samples=str(path))) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds 700,000 images; eval scores at most 100,000 per call" in err
    assert ev.run_eval(_eval_args(path=str(tmp_path / "x.npz"), n=100_001)) == 2
    assert "--n must be at most 100,000" in capsys.readouterr().err


def fake_classify(model, images, batch_size=1000):
    """A stand-in for the classifier that costs nothing: features and probabilities from the pixels."""
    flat = images.reshape(len(images), -1).astype(np.float64)
    probs = np.exp(flat[:, :10]) / np.exp(flat[:, :10]).sum(axis=1, keepdims=True)
    return flat[:, 100:228].copy(), probs


def test_scoring_a_file_takes_memory_of_a_block_not_of_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(clf, "classify", fake_classify)
    reference = (np.zeros(128), np.eye(128))

    def score(path):
        with ev.SamplesFile(path) as samples:
            return ev.score_samples_file(samples, None, reference)

    peaks = {}
    for n in (2000, 10_000):
        path = tmp_path / f"{n}.npz"
        np.savez(path, samples=np.random.default_rng(0).uniform(-1, 1, (n, 1, 28, 28)))   # float64
        peaks[n] = peak_bytes(score, path)
        assert score(path)["n"] == n
    # Five times the samples: the same peak, give or take their probabilities (80 bytes each),
    # and well under one copy of the larger file's 63 MB.
    assert peaks[10_000] < peaks[2000] + 2**20
    assert peaks[10_000] < 25 * 2**20


def test_improved_diffusions_layout_gives_the_same_scores_as_tinyddpms(tmp_path, capsys, monkeypatch,
                                                                     reference, digits):
    u8 = np.round((digits[1][:200, 0] + 1) * 127.5).astype(np.uint8)          # (200, 28, 28)
    labels = load_mnist("test")[1][:200]
    results = []
    for arrays in (dict(arr_0=u8[..., None], arr_1=labels), dict(samples=u8[:, None], labels=labels)):
        status, out, _ = _eval_samples(tmp_path, capsys, monkeypatch, reference, **arrays)
        assert status == 0
        results.append(json.loads(out))
    ours, theirs = results[1], results[0]
    assert theirs.pop("format") == "uint8 [0, 255] (N, 28, 28, 1)"
    assert ours.pop("format") == "uint8 [0, 255] (N, 1, 28, 28)"
    assert theirs == ours


def test_labels_give_the_fraction_classified_as_asked_overall_and_per_digit(tmp_path, capsys, monkeypatch,
                                                                          reference, digits):
    images, labels = digits[1][:500], load_mnist("test")[1][:500]
    status, out, _ = _eval_samples(tmp_path, capsys, monkeypatch, reference, samples=images, labels=labels)
    right = json.loads(out)
    # The shipped classifier gets 99% of real test digits right.
    assert status == 0 and right["label_accuracy"] > 0.97
    assert len(right["label_accuracy_per_digit"]) == 10 and min(right["label_accuracy_per_digit"]) > 0.9
    wrong = (labels + 1) % 10
    status, out, _ = _eval_samples(tmp_path, capsys, monkeypatch, reference, samples=images, labels=wrong)
    assert json.loads(out)["label_accuracy"] < 0.05
    only_sevens = np.full(500, 7)
    _, out, _ = _eval_samples(tmp_path, capsys, monkeypatch, reference, samples=images, labels=only_sevens)
    per_digit = json.loads(out)["label_accuracy_per_digit"]
    assert per_digit[:7] == [None] * 7 and per_digit[7] == pytest.approx(np.mean(labels == 7), abs=0.02)
    _, out, _ = _eval_samples(tmp_path, capsys, monkeypatch, reference, samples=images)
    assert "label_accuracy" not in json.loads(out)


def test_eval_says_now_and_then_that_it_is_working_when_stderr_is_a_log(tmp_path, capsys, monkeypatch,
                                                                      reference):
    monkeypatch.setattr(ev, "PROGRESS_SECONDS", 0.0)
    monkeypatch.setattr(clf, "classify", fake_classify)
    images = np.random.default_rng(0).integers(0, 256, (2500, 28, 28), np.uint8)
    status, out, err = _eval_samples(tmp_path, capsys, monkeypatch, reference, samples=images)
    assert status == 0 and json.loads(out)["n"] == 2500
    lines = err.splitlines()
    assert [line.split("  ")[0] for line in lines] == [
        "tinyddpm eval: samples scored: 1000/2500 (40%)", "tinyddpm eval: samples scored: 2000/2500 (80%)",
        "tinyddpm eval: samples scored: 2500/2500 (100%)"]
    assert all("elapsed" in line for line in lines)


@pytest.mark.parametrize("eta", [float("nan"), float("inf"), -1.0])
def test_non_finite_or_negative_eta_is_refused(tmp_path, capsys, eta):
    assert ev.run_eval(_eval_args(path=str(tmp_path / "checkpoint.npz"), sampler="ddim", eta=eta)) == 2
    assert "--eta must be a finite number >= 0" in capsys.readouterr().err


def test_gaussian_fit_block_by_block_equals_the_fit_of_all_at_once():
    features = np.random.default_rng(0).standard_normal((2500, 16)) * 3 + 100     # a large mean
    fit = ev.GaussianFit(16)
    for size in (1, 999, 1000, 500):
        fit.add(features[fit.n:fit.n + size])
    mu, cov = fit.stats()
    expected_mu, expected_cov = ev.gaussian_stats(features)
    np.testing.assert_allclose(mu, expected_mu, rtol=1e-13)
    np.testing.assert_allclose(cov, expected_cov, rtol=1e-10, atol=1e-12)
