"""The two command lines, run as a user runs them."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import smol_diffusion
from smol_diffusion import checkpoint as checkpoint_module
from smol_diffusion import cli as cli_module
from smol_diffusion.cli import main as cli_main
from smol_diffusion.cli import parse_train, underscored
from smol_diffusion.export import export_weights

ROOT = Path(__file__).resolve().parents[1]


def run(*args):
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_train_then_sample(tmp_path):
    out = tmp_path / "run"
    r = run("smol_diffusion", "train", "--preset", "demo", "--image_size", "8", "--channels", "16",
            "--channel_mults", "1,2", "--steps", "6", "--batch_size", "8", "--warmup", "2",
            "--log_every", "3", "--sample_n", "4", "--sample_steps", "3", "--out_dir", str(out))
    assert r.returncode == 0, r.stderr
    assert "done: 6 steps" in r.stdout and "RuntimeWarning" not in r.stderr
    assert (out / "ckpt.pt").exists() and (out / "samples_0000006.png").exists()
    grid = tmp_path / "grid.png"
    r = run("smol_diffusion", "sample", "--checkpoint", str(out / "ckpt.pt"), "--n", "9",
            "--steps", "4", "--sampler", "dpm++2m", "--out", str(grid))
    assert r.returncode == 0, r.stderr
    assert "9 images, dpm++2m, 4 steps" in r.stdout
    assert Image.open(grid).size == (3 * 8 + 4, 3 * 8 + 4)  # 3x3 grid, 1-pixel padding


def test_bad_input_is_explained(tmp_path):
    fresh = ("--out_dir", str(tmp_path / "run"))  # not the demo's, which a user may have trained
    r = run("smol_diffusion", "train", "--steps", "many")
    assert r.returncode != 0 and "--steps 'many'" in r.stderr
    r = run("smol_diffusion", "train", "--sampler", "euler")
    assert r.returncode != 0 and "error: sampler must be one of" in r.stderr
    r = run("smol_diffusion", "train", "--dataset", "cars", "--root", str(tmp_path), *fresh)
    assert r.returncode != 0 and "vision/issues/7545" in r.stderr
    r = run("smol_diffusion", "sample", "--checkpoint", str(tmp_path / "nope.pt"))
    assert r.returncode != 0 and "no checkpoint at" in r.stderr
    r = run("smol_diffusion", "sample", "--checkpoint", str(tmp_path / "nope.pt"), "--batch", "0")
    assert r.returncode != 0 and "--n and --batch must be at least 1" in r.stderr
    r = run("smol_diffusion", "train", "--device", "tpu0", *fresh)
    assert r.returncode != 0 and "error: unknown device 'tpu0'" in r.stderr
    r = run("smol_diffusion", "train", "--T", "20")
    assert r.returncode != 0 and "sample_steps in [1, T]; got T=20, sample_steps=50" in r.stderr


def test_sample_shows_progress_and_takes_a_precision(tiny_cfg, tmp_path, monkeypatch):
    """The sample command line asks for progress bars, and for the checkpoint's precision
    unless --precision says otherwise."""
    import smol_diffusion
    from smol_diffusion.checkpoint import Checkpoint
    from smol_diffusion.cli import main

    smol_diffusion.train(tiny_cfg.override(steps=1, sample_n=0), progress=False)
    calls, real = [], Checkpoint.sample

    def sample(self, n, **kwargs):
        calls.append(kwargs)
        return real(self, n, **kwargs)

    monkeypatch.setattr(Checkpoint, "sample", sample)
    ckpt = str(tmp_path / "run" / "ckpt.pt")
    main(["sample", "--checkpoint", ckpt, "--n", "2", "--steps", "2", "--out",
          str(tmp_path / "a.png")])
    main(["sample", "--checkpoint", ckpt, "--n", "2", "--steps", "2", "--out",
          str(tmp_path / "b.png"), "--precision", "fp16"])
    assert [c["progress"] for c in calls] == [True, True]
    assert "precision" not in calls[0] and calls[1]["precision"] == "fp16"


def test_train_help_shows_every_field_with_its_default_and_comment(capsys):
    import dataclasses

    import pytest

    from smol_diffusion.cli import field_comments, main
    from smol_diffusion.config import all_fields

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    comments = field_comments()
    for name, f in all_fields().items():
        assert comments[name], f"{name} has no comment in config.py"
        first_words = " ".join(comments[name].split()[:4])
        assert f"--{name}" in text and first_words in text, name
        default = f.default if f.default is not dataclasses.MISSING else None
        assert f"(default {default!r})" in text, name
    assert '"cosine" decay to 10% of lr' in text  # a comment's "%" survives argparse


def test_one_command_line_in_every_form():
    """`python -m smol_diffusion COMMAND`, and the console script of an installed package."""
    import importlib.metadata
    import shutil

    import pytest

    r = run("smol_diffusion", "--help")
    assert r.returncode == 0 and all(c in r.stdout for c in ("train", "sample", "evaluate",
                                                             "export"))
    try:
        importlib.metadata.distribution("smol-diffusion")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the package is not installed (pip install -e .): no console script")
    script = shutil.which("smol-diffusion", path=str(Path(sys.executable).parent))
    assert script, "installed, yet no smol-diffusion script beside this Python"
    r = subprocess.run([script, "sample", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--checkpoint" in r.stdout


@pytest.fixture
def conditional_ckpt(tiny_cfg, tmp_path):
    """A one-step class-conditional checkpoint (10 digit classes)."""
    smol_diffusion.train(tiny_cfg.override(num_classes=10, steps=1, sample_n=0), progress=False)
    return tmp_path / "run" / "ckpt.pt"


def test_sample_asks_each_class_in_turn_across_batches(conditional_ckpt, tmp_path,
                                                       monkeypatch):
    """--n 12 --batch 5: labels 0..9, 0, 1 over the three batches, so that the grid's column k
    (ten columns) holds class k; --labels are repeated in turn the same way."""
    asked = []

    def sample(model, schedule, shape, labels=None, **kwargs):
        asked.append(labels.tolist())
        return torch.zeros(shape)
    monkeypatch.setattr(checkpoint_module, "sample", sample)
    grid = tmp_path / "grid.png"
    cli_main(["sample", "--checkpoint", str(conditional_ckpt), "--n", "12", "--batch", "5",
              "--out", str(grid)])
    assert asked == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [0, 1]]
    assert Image.open(grid).size == (10 * 9 + 1, 2 * 9 + 1)  # ten columns, 8 px and padding
    asked.clear()
    cli_main(["sample", "--checkpoint", str(conditional_ckpt), "--n", "5", "--batch", "2",
              "--labels", "7,3", "--out", str(grid)])
    assert asked == [[7, 3], [7, 3], [7]]


def test_every_multi_word_flag_takes_both_spellings_and_help_shows_one(capsys):
    assert underscored(["--cache-dir", "a-b", "--out-dir=x-y", "-n", "--n", "--bpd_n=-1"]) == [
        "--cache_dir", "a-b", "--out_dir=x-y", "-n", "--n", "--bpd_n=-1"]
    assert parse_train(["--out-dir", "x", "--cache-dir", "y", "--sample_n", "3"]) \
        == parse_train(["--out_dir", "x", "--cache_dir", "y", "--sample-n", "3"])
    for command in ("train", "evaluate"):
        with pytest.raises(SystemExit):
            cli_main([command, "--help"])
        text = capsys.readouterr().out
        assert "--cache_dir" in text and "--cache-dir" not in text


def test_evaluate_checks_where_it_writes_before_it_evaluates(conditional_ckpt, tmp_path,
                                                             monkeypatch, read_only_copy):
    ran = []
    monkeypatch.setattr(cli_module, "evaluate",
                        lambda *a, **k: ran.append(1) or [{"metric": "bpd", "value": 3.0,
                                                           "n": 2, "extractor": None,
                                                           "sampler": "bound", "steps": 1000,
                                                           "seconds": 0.1}])
    evaluate = ["evaluate", "--checkpoint", str(conditional_ckpt), "--metrics", "bpd"]
    (tmp_path / "file").write_text("")
    for out, error in ((tmp_path / "file" / "eval.json", r"file is a file, not a folder"),
                       (tmp_path, r"is a folder; give the path of a file")):
        with pytest.raises(SystemExit, match=error):
            cli_main([*evaluate, "--out", str(out)])
    kaggle = read_only_copy(conditional_ckpt)  # beside a checkpoint in a read-only folder
    with pytest.raises(SystemExit, match=r"cannot write --out .*disk/eval.json \(Read-only file "
                                         r"system\); choose another path"):
        cli_main(["evaluate", "--checkpoint", str(kaggle / "ckpt.pt"), "--metrics", "bpd"])
    assert not ran  # nothing was evaluated, to be lost
    cli_main([*evaluate, "--out", str(tmp_path / "new" / "folder" / "eval.json")])
    assert json.loads((tmp_path / "new" / "folder" / "eval.json").read_text())["step"] == 1
    export_weights(conditional_ckpt, tmp_path / "exported")
    cli_main(["evaluate", "--checkpoint", str(tmp_path / "exported"), "--metrics", "bpd"])
    assert (tmp_path / "exported" / "eval.json").is_file()  # in the export's folder
    assert not (tmp_path / "eval.json").exists() and len(ran) == 2


def test_sample_checks_its_out_before_it_samples(conditional_ckpt, tmp_path, monkeypatch,
                                                 read_only_disk):
    monkeypatch.setattr(checkpoint_module, "sample", lambda *a, **k: pytest.fail("sampled"))
    (tmp_path / "file").write_text("")
    for out, error in ((tmp_path, r"is a folder; give the path of a file"),
                       (tmp_path / "grid", r"grid does not end in a file type such as .*\.png.*"
                                           r"e\.g\. .*grid\.png"),
                       (tmp_path / "file" / "grid.png", r"file is a file, not a folder"),
                       (read_only_disk / "grid.png", r"cannot write --out .*grid.png \(Read-only "
                                                     r"file system\)")):
        with pytest.raises(SystemExit, match=error):
            cli_main(["sample", "--checkpoint", str(conditional_ckpt), "--out", str(out)])
