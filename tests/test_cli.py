"""Tests for the `tinyddpm` command line: a real train + sample run on MNIST
through `python -m tinyddpm`, and every kind of user mistake ending in one
line on stderr, a non-zero status and no traceback, before any work."""
import json
import math
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from helpers import skip_unless_ci
from PIL import Image

import tinyddpm
from autograd import backend
from tinyddpm import unet
from tinyddpm.cli import main
from tinyddpm.data import load_mnist

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory):
    """An environment whose MNIST cache is private to this module and already filled."""
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path_factory.mktemp("cache")),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", env["XDG_CACHE_HOME"])
        try:
            load_mnist("train")
        except Exception as exc:
            skip_unless_ci(f"MNIST is not available: {exc}")
    return env


@pytest.fixture
def private_cache(cache_env, monkeypatch):
    """The same private cache for commands run in this process."""
    monkeypatch.setenv("XDG_CACHE_HOME", cache_env["XDG_CACHE_HOME"])


def tinyddpm_command(env, *args):
    return subprocess.run([sys.executable, "-m", "tinyddpm", *map(str, args)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def test_train_then_sample_on_mnist(cache_env, tmp_path):
    run = tmp_path / "run"
    done = tinyddpm_command(cache_env, "train", "--preset", "mnist-tiny", "--steps", 3, "--batch-size", 2,
                            "--seed", 0, "--out", run, "--sample-n", 4, "--sample-steps", 2, "--log-every", 1)
    assert done.returncode == 0, done.stderr
    assert {"checkpoint.npz", "config.json", "metrics.csv", "samples-000003.png"} <= set(os.listdir(run))
    header, *rows = (run / "metrics.csv").read_text().splitlines()
    assert header == "step,loss,lr,grad_norm,images_per_s,elapsed_s" and len(rows) == 3

    grid, samples, strip = tmp_path / "grid.png", tmp_path / "samples.npz", tmp_path / "strip.png"
    done = tinyddpm_command(cache_env, "sample", run / "checkpoint.npz", "--n", 5, "--steps", 10,
                            "--out", grid, "--npz", samples, "--trajectory", strip)
    assert done.returncode == 0, done.stderr
    with np.load(samples, allow_pickle=False) as npz:
        assert npz.files == ["samples"]
        x = npz["samples"]
    assert x.shape == (5, 1, 28, 28) and x.dtype == np.float32
    assert x.min() >= -1 and x.max() <= 1
    with Image.open(grid) as im:
        assert im.size == (3 * 30 + 2, 2 * 30 + 2)
    with Image.open(strip) as im:                 # 5 rows; x_T, 9 more snapshots and x_0
        assert im.size == (11 * 30 + 2, 5 * 30 + 2)


@pytest.fixture
def micro_checkpoint(private_cache, tmp_path, monkeypatch):
    """A checkpoint of a model with a few thousand parameters, 2 steps into training."""
    monkeypatch.setitem(unet.PRESETS, "micro", dict(ch=8, ch_mult=(1, 2), num_res_blocks=1,
                                                    attn_resolutions=(), dropout=0.0, num_groups=4))
    run = tmp_path / "run"
    assert main(["train", "--preset", "micro", "--steps", "2", "--batch-size", "1", "--out", str(run),
                 "--lr", "0.01", "--warmup", "0", "--ema-decay", "0.5", "--sample-n", "1",
                 "--sample-steps", "1"]) == 0
    return run / "checkpoint.npz"


def draw(checkpoint, out, *options):
    assert main(["sample", str(checkpoint), "--n", "2", "--steps", "3", "--npz", str(out), *options]) == 0
    return np.load(out)["samples"]


def test_samples_are_determined_by_the_seed_and_the_weights(micro_checkpoint, tmp_path):
    ddim = ("--sampler", "ddim", "--eta", "1")
    first = draw(micro_checkpoint, tmp_path / "a.npz", "--seed", "0", *ddim)
    assert np.array_equal(first, draw(micro_checkpoint, tmp_path / "b.npz", "--seed", "0", *ddim))
    assert not np.array_equal(first, draw(micro_checkpoint, tmp_path / "c.npz", "--seed", "1", *ddim))
    assert not np.array_equal(first, draw(micro_checkpoint, tmp_path / "d.npz", "--seed", "0", "--no-ema", *ddim))
    assert not np.array_equal(first, draw(micro_checkpoint, tmp_path / "e.npz", "--seed", "0"))


@pytest.fixture
def conditional_checkpoint(micro_checkpoint):
    """A class-conditional checkpoint of the same micro model, 2 steps into training."""
    run = micro_checkpoint.parent.parent / "conditional"
    assert main(["train", "--preset", "micro", "--steps", "2", "--batch-size", "2", "--out", str(run),
                 "--class-cond", "--sample-n", "2", "--sample-steps", "1"]) == 0
    return run / "checkpoint.npz"


def test_sample_all_labels_stores_the_digits_asked_for_in_order(conditional_checkpoint, tmp_path):
    out = tmp_path / "s.npz"
    assert main(["sample", str(conditional_checkpoint), "--n", "12", "--steps", "2", "--label", "all",
                 "--guidance", "2", "--npz", str(out)]) == 0
    with np.load(out) as npz:
        assert npz["samples"].shape == (12, 1, 28, 28)
        assert npz["labels"].tolist() == [0, 0, 1, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert main(["sample", str(conditional_checkpoint), "--n", "2", "--steps", "2", "--npz", str(out)]) == 0
    with np.load(out) as npz:
        assert "labels" not in npz.files                  # no label asked: the unconditional model


@pytest.mark.parametrize("options, message", [
    (["--label", "10"], "--label must be a digit 0..9 or 'all', got '10'"),
    (["--label", "x"], "--label must be a digit 0..9 or 'all', got 'x'"),
    (["--label", "3", "--guidance", "-1"], "--guidance must be a finite number >= 0, got -1.0"),
    (["--label", "3", "--guidance", "nan"], "--guidance must be a finite number >= 0, got nan"),
    (["--guidance", "2"], "--guidance needs --label"),
])
def test_sample_refuses_bad_labels_and_guidance_in_one_line(conditional_checkpoint, tmp_path, capsys, options,
                                                             message):
    out = tmp_path / "s.npz"
    assert main(["sample", str(conditional_checkpoint), "--npz", str(out), *options]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not out.exists()


def test_sample_refuses_a_label_for_an_unconditional_checkpoint(micro_checkpoint, tmp_path, capsys):
    out = tmp_path / "s.npz"
    assert main(["sample", str(micro_checkpoint), "--label", "4", "--npz", str(out)]) == 2
    err = capsys.readouterr().err
    assert "holds an unconditional model" in err and err.count("\n") == 1 and not out.exists()


def test_sample_refuses_more_steps_than_the_checkpoint_has(micro_checkpoint, capsys):
    out = micro_checkpoint.parent / "x.npz"
    assert main(["sample", str(micro_checkpoint), "--steps", "1001", "--npz", str(out)]) == 2
    assert not out.exists()
    assert "steps must be an integer between 1 and T = 1000" in capsys.readouterr().err


def test_a_user_error_is_one_line_without_traceback_from_python_m(cache_env, tmp_path):
    done = tinyddpm_command(cache_env, "train", "--steps", -1, "--out", tmp_path / "run")
    assert done.returncode == 2
    assert done.stderr.strip() == "tinyddpm train: error: --steps: must be >= 1, got -1"
    assert not (tmp_path / "run").exists()


def corrupt_checkpoint(tmp_path):
    path = tmp_path / "broken.npz"
    path.write_bytes(b"PK\x03\x04 not really a zip")
    return path


CUDA_MISSING = backend.cuda_unavailable_reason()

BAD_COMMAND_LINES = [
    (["train", "--preset", "huge"], 2, "unknown preset 'huge'"),
    (["train", "--steps", "-5"], 2, "--steps: must be >= 1"),
    (["train", "--batch-size", "0"], 2, "--batch-size: must be >= 1"),
    (["train", "--save-every", "-1"], 2, "--save-every: must be >= 0"),
    (["train", "--ema-decay", "1.5"], 2, "--ema-decay: must be in [0, 1)"),
    (["train", "--dtype", "float64"], 2, "float64 is for gradient checks"),
    (["train", "--steps", "ten"], 2, "invalid int value"),
    (["train", "--batch-size", "60001"], 2, "larger than the 60000 training images"),
    (["train", "--resume"], 2, "--resume needs --out"),
    (["train", "--resume", "--out", "{tmp}/nothing-here"], 2, "no checkpoint at"),
    (["train", "--data-dir", "{tmp}"], 1, "no MNIST train files"),
    (["sample", "{tmp}/missing.npz"], 2, "no such file"),
    (["sample", "{broken}"], 1, "not a readable .npz"),
    (["sample", "{broken}", "--n", "0"], 2, "--n must be >= 1"),
    (["sample", "{broken}", "--eta", "0.5"], 2, "--eta applies to --sampler ddim only"),
    (["sample", "{broken}", "--sampler", "ddim", "--eta", "nan"], 2, "--eta must be a finite number >= 0, got nan"),
    (["sample", "{broken}", "--viewer", "view.png"], 2, "--viewer must end in .html"),
    (["sample", "{broken}", "--out", "grid.jpg"], 2, "--out must end in .png"),
    (["nonsense"], 2, "invalid choice"),
    ([], 2, "required: COMMAND"),
]
if CUDA_MISSING is not None:
    BAD_COMMAND_LINES.append((["train", "--device", "cuda"], 2, CUDA_MISSING))


@pytest.mark.parametrize("argv, status, words", BAD_COMMAND_LINES, ids=[" ".join(a[0]) or "empty"
                                                                        for a in BAD_COMMAND_LINES])
def test_bad_command_lines_fail_in_one_line_before_any_work(private_cache, tmp_path, monkeypatch, capsys,
                                                            argv, status, words):
    monkeypatch.chdir(tmp_path)
    broken = corrupt_checkpoint(tmp_path)
    before = sorted(os.listdir(tmp_path))
    argv = [a.format(tmp=tmp_path, broken=broken) for a in argv]
    assert main(argv) == status
    err = capsys.readouterr().err
    first, *rest = err.splitlines()
    assert words in first and "Traceback" not in err, err
    # Only the missing data set earns more lines: how to get it.
    assert not rest or rest[0] == "To get MNIST, do one of:", err
    assert sorted(os.listdir(tmp_path)) == before, "files were written before the error"


def fake_evaluate(monkeypatch, calls):
    module = types.ModuleType("tinyddpm.evaluate")
    module.add_eval_arguments = lambda parser: parser.add_argument("--samples")
    module.run_eval = lambda args: calls.append(("eval", args.samples)) or 0
    module.add_train_classifier_arguments = lambda parser: parser.add_argument("--epochs", type=int)
    module.run_train_classifier = lambda args: calls.append(("train-classifier", args.epochs)) or 3
    monkeypatch.setitem(sys.modules, "tinyddpm.evaluate", module)
    monkeypatch.setattr(tinyddpm, "evaluate", module, raising=False)


def test_eval_and_train_classifier_are_handed_to_the_evaluate_module(monkeypatch):
    calls = []
    fake_evaluate(monkeypatch, calls)
    assert main(["eval", "--samples", "x.npz"]) == 0
    assert main(["train-classifier", "--epochs", "2"]) == 3
    assert calls == [("eval", "x.npz"), ("train-classifier", 2)]


def test_eval_says_when_the_evaluate_module_is_missing(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tinyddpm.evaluate", None)
    monkeypatch.delattr(tinyddpm, "evaluate", raising=False)
    assert main(["eval", "--samples", "x.npz"]) == 2
    assert "not available" in capsys.readouterr().err


def test_download_mnist_defaults_to_the_data_folder(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    seen = {}

    def fake_download(to, progress):
        seen["to"] = to
        return [Path(to) / "train-images-idx3-ubyte.gz"]

    monkeypatch.setattr("tinyddpm.download.download_mnist", fake_download)
    assert main(["download-mnist"]) == 0
    assert seen["to"] == tmp_path / "tinyddpm" / "mnist"
    assert main(["download-mnist", "--to", str(tmp_path / "elsewhere")]) == 0
    assert seen["to"] == tmp_path / "elsewhere"
    assert "train-images-idx3-ubyte.gz" in capsys.readouterr().out


def test_info_describes_a_checkpoint_as_text_and_as_json(conditional_checkpoint, capsys):
    assert main(["info", str(conditional_checkpoint)]) == 0
    text = capsys.readouterr().out
    assert "preset micro" in text and "conditional  yes" in text
    assert main(["info", str(conditional_checkpoint), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["class_cond"] is True and info["step"] == 2 and info["ema"] and info["optimizer"]
    assert info["parameters"] == sum(math.prod(s) for s in info_shapes(conditional_checkpoint))


def info_shapes(path):
    with np.load(path, allow_pickle=False) as npz:
        return [npz[k].shape for k in npz.files if k.startswith("model/")]


def test_info_refuses_what_is_not_a_checkpoint_in_one_line(tmp_path, capsys):
    path = corrupt_checkpoint(tmp_path)
    assert main(["info", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"tinyddpm info: error: {path}") and err.count("\n") == 1


def test_sample_checks_its_output_paths_before_sampling(micro_checkpoint, tmp_path, capsys, monkeypatch):
    import tinyddpm.sample as sample_module

    def never(*args, **kwargs):
        raise AssertionError("sampling started before the outputs were checked")
    monkeypatch.setattr(sample_module, "sample_checkpoint", never)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    (tmp_path / "folder.png").mkdir()
    for option in (["--npz", str(blocker / "x.npz")], ["--out", str(tmp_path / "folder.png")],
                   ["--viewer", str(blocker / "v.html")]):
        assert main(["sample", str(micro_checkpoint), *option]) == 2
        err = capsys.readouterr().err
        assert "checked before sampling" in err and err.count("\n") == 1


def test_sample_viewer_writes_one_page_of_every_reverse_step(conditional_checkpoint, tmp_path):
    page = tmp_path / "view.html"
    assert main(["sample", str(conditional_checkpoint), "--viewer", str(page), "--n", "3", "--steps", "4",
                 "--label", "all"]) == 0
    text = page.read_text()
    data = json.loads(re.search(r'<script type="application/json" id="viewer-data">(.*?)</script>', text,
                                re.S).group(1))
    assert data["frames"] == 5 and data["samples"] == 3 and data["t"][0] == 1000 and data["t"][-1] == 0
    assert data["sigma"][-1] == 0 and data["sigma"][-2] == 0 and data["sigma"][0] > 0
    # Nothing to fetch: the only address in the page is the SVG namespace's name.
    assert set(re.findall(r"https?://[^\"' )]+", text)) <= {"http://www.w3.org/2000/svg"}
    assert "<script src" not in text and "<link" not in text and "fetch(" not in text
    assert not (tmp_path / "samples.png").exists(), "--viewer alone writes the page only"


def test_sample_viewer_refuses_a_page_over_5_mb_before_sampling(micro_checkpoint, tmp_path, capsys):
    assert main(["sample", str(micro_checkpoint), "--viewer", str(tmp_path / "v.html"), "--n", "64"]) == 2
    err = capsys.readouterr().err
    assert "over the 5 MB limit" in err and err.count("\n") == 1 and not (tmp_path / "v.html").exists()


# =============================================================================
# train --config
# =============================================================================

def test_train_config_takes_a_runs_settings_and_flags_win(micro_checkpoint, tmp_path):
    first = json.loads((micro_checkpoint.parent / "config.json").read_text())
    assert main(["train", "--config", str(micro_checkpoint.parent / "config.json"), "--steps", "3",
                 "--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "config.json").read_text())
    assert again == dict(first, steps=3)


@pytest.mark.parametrize("content, message", [
    ('{"stepz": 3}', "unknown setting 'stepz'"),
    ('{"steps": "ten"}', "steps must be an integer, got \"ten\""),
    ('{"steps": 2.5}', "steps must be an integer, got 2.5"),
    ('{"lr": "fast"}', "lr must be a number, got \"fast\""),
    ('{"class_cond": 1}', "class_cond must be true or false, got 1"),
    ('{"data_dir": 7}', "data_dir must be a string or null, got 7"),
    ('[1, 2]', "expected a JSON object of settings"),
    ('{"steps": ', "not valid JSON"),
])
def test_train_config_refuses_what_is_not_a_config_in_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "run.json"
    path.write_text(content)
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tinyddpm train: error: --config {path}: ") and message in err
    assert err.count("\n") == 1 and not (tmp_path / "run").exists()


def test_train_config_names_a_missing_file(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "nothing.json")]) == 2
    err = capsys.readouterr().err
    assert "nothing.json: No such file or directory" in err and err.count("\n") == 1
