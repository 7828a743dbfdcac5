"""The run log: out_dir/log.jsonl holds a row per loss reading and evaluation, readable while
the run goes and after a resume (the steps a resume trained again appear once), TensorBoard
gets the same numbers and the sample grids where it is installed, and the notebook's loss plot
reads the log."""
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import matplotlib
import pytest

import smol_diffusion
from smol_diffusion import viz
from smol_diffusion.checkpoint import read_checkpoint
from smol_diffusion.runlog import RunLog, read_log

matplotlib.use("Agg")


def test_each_reading_and_evaluation_is_a_row(tiny_cfg, monkeypatch):
    train_module = sys.modules["smol_diffusion.trainstate"]
    monkeypatch.setattr(train_module, "evaluate", lambda *a, **k: [
        {"metric": "fid", "value": 12.5}, {"metric": "kid", "value": 0.01}])
    monkeypatch.setattr(train_module, "optional_extractor", lambda *a, **k: None)
    cfg = tiny_cfg.override(steps=20, log_every=5, eval_every=10, sample_n=0)
    history = smol_diffusion.train(cfg, progress=False)
    lines = (Path(cfg.train.out_dir) / "log.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [(r["kind"], r["step"]) for r in rows] == [
        ("start", 0), ("train", 5), ("train", 10), ("eval", 10), ("train", 15), ("train", 20),
        ("eval", 20)]
    train = [r for r in rows if r["kind"] == "train"]
    assert {"loss", "lr", "img_per_s", "grad_norm", "skipped", "time"} <= set(train[0])
    assert [r["loss"] for r in train] == history["loss"]
    assert [r["grad_norm"] for r in train] == history["grad_norm"]
    assert all(r["grad_norm"] > 0 for r in train)
    assert rows[3]["fid"] == 12.5 and rows[3]["kid"] == 0.01
    assert rows[0]["config"]["train"]["steps"] == 20 and rows[0]["precision"] in ("fp32", "bf16")


def test_a_resume_replays_once_the_steps_it_trained_again(tiny_cfg, tmp_path):
    """A run killed after its log reached step 20 but its checkpoint only step 10: the resume
    trains 10..20 again; read_log keeps its rows, not the lost ones."""
    cfg = tiny_cfg.override(steps=10, log_every=5, sample_n=0, lr_schedule="constant")
    out = Path(cfg.train.out_dir)
    smol_diffusion.train(cfg, progress=False)
    shutil.copy(out / "ckpt.pt", tmp_path / "step10.pt")
    smol_diffusion.train(cfg.override(steps=20, resume=str(out / "ckpt.pt")), progress=False)
    lost = read_log(out)["train"]
    shutil.copy(tmp_path / "step10.pt", out / "ckpt.pt")  # the kill: back to step 10
    with open(out / "log.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 25, "lo')  # a line the kill cut short
    history = smol_diffusion.train(cfg.override(steps=20, resume=str(out / "ckpt.pt"),
                                                seed=1), progress=False)
    log = read_log(out)
    assert [r["step"] for r in log["train"]] == [5, 10, 15, 20]
    assert [r["step"] for r in log["start"]] == [0, 10, 10]
    assert log["train"][:2] == lost[:2] and log["train"][2:] != lost[2:]
    assert [r["loss"] for r in log["train"]] == history["loss"]
    assert read_checkpoint(out / "ckpt.pt")["history"]["loss"] == history["loss"]


def test_a_log_with_a_broken_line_in_the_middle_names_it(tmp_path):
    (tmp_path / "log.jsonl").write_text('{"kind": "train", "step": 1, "loss": 1.0}\nnot json\n'
                                        '{"kind": "train", "step": 2, "loss": 0.5}\n')
    with pytest.raises(ValueError, match=r"log.jsonl, line 2, is not JSON"):
        read_log(tmp_path)
    with pytest.raises(FileNotFoundError, match="no run log at .*nothing; training writes one"):
        read_log(tmp_path / "nothing")


def test_non_finite_numbers_are_written_as_null(tmp_path):
    log = RunLog(tmp_path)
    log.write("train", 1, loss=float("nan"), lr=float("inf"), grad_norm=1.0)
    log.write("start", 0, config={"train": {"grad_clip": float("inf"), "lr": 2e-4}})
    log.close()
    strict = {"parse_constant": lambda name: pytest.fail(f"{name} in the log")}
    train, start = map(lambda line: json.loads(line, **strict),
                       (tmp_path / "log.jsonl").read_text().splitlines())
    assert train["loss"] is None and train["lr"] is None and train["grad_norm"] == 1.0
    assert start["config"] == {"train": {"grad_clip": None, "lr": 2e-4}}


def test_the_loss_plot_reads_the_log(tiny_cfg):
    cfg = tiny_cfg.override(steps=10, log_every=5, sample_n=0)
    history = smol_diffusion.train(cfg, progress=False)
    ax = viz.plot_loss(cfg.train.out_dir)
    x, y = ax.lines[0].get_data()
    assert list(x) == [5, 10] and list(y) == history["loss"]


def test_without_tensorboard_nothing_else_is_written(tiny_cfg, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboard" else real(name, *a))
    cfg = tiny_cfg.override(steps=5, log_every=5, sample_n=0)
    smol_diffusion.train(cfg, progress=False)
    assert not (Path(cfg.train.out_dir) / "tensorboard").exists()
    assert (Path(cfg.train.out_dir) / "log.jsonl").is_file()


def test_tensorboard_gets_the_scalars_and_the_sample_grids(tiny_cfg):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_cfg.override(steps=10, log_every=5, sample_every=5, sample_n=4)
    history = smol_diffusion.train(cfg, progress=False)
    events = EventAccumulator(str(Path(cfg.train.out_dir) / "tensorboard"),
                              size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()
    assert {"train/loss", "train/lr", "train/img_per_s", "train/grad_norm"} <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("train/loss")] == [5, 10]
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(history["loss"])
    assert [e.step for e in events.Images("samples")] == [5, 10]
