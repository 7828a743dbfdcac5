"""The two command lines, run as a user runs them."""
import subprocess
import sys
from pathlib import Path

from PIL import Image

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
    r = run("smol_diffusion", "train", "--steps", "many")
    assert r.returncode != 0 and "--steps 'many'" in r.stderr
    r = run("smol_diffusion", "train", "--sampler", "euler")
    assert r.returncode != 0 and "error: sampler must be one of" in r.stderr
    r = run("smol_diffusion", "train", "--dataset", "cars", "--root", str(tmp_path))
    assert r.returncode != 0 and "vision/issues/7545" in r.stderr
    r = run("smol_diffusion", "sample", "--checkpoint", str(tmp_path / "nope.pt"))
    assert r.returncode != 0 and "no checkpoint at" in r.stderr
    r = run("smol_diffusion", "sample", "--checkpoint", str(tmp_path / "nope.pt"), "--batch", "0")
    assert r.returncode != 0 and "--n and --batch must be at least 1" in r.stderr
    r = run("smol_diffusion", "train", "--device", "tpu0")
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
