"""Training: the loss falls on a few images, checkpoints round-trip, resume continues."""
import dataclasses
import os
import sys

import pytest
import torch

import smol_diffusion
from smol_diffusion import load_checkpoint
from smol_diffusion.checkpoint import read_checkpoint, save_checkpoint
from smol_diffusion.config import Config
from smol_diffusion.data import TensorImages
from smol_diffusion.hardware import compile_model, pick_device
from smol_diffusion.cli import parse_train as parse_args
from smol_diffusion.training import ema_decay_at, lr_at


def test_overfits_a_few_images(tiny_cfg, monkeypatch):
    """Four fixed images: the loss at low noise levels falls by a large factor."""
    images = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8).repeat(64, 1, 1, 1)
    monkeypatch.setattr(sys.modules["smol_diffusion.trainstate"], "make_dataset",
                        lambda *a: TensorImages(images))
    cfg = tiny_cfg.override(steps=300, lr=3e-3, warmup=20, log_every=20, sample_every=0,
                            checkpoint_every=0, sample_n=0, ema_decay=0.99)
    history = smol_diffusion.train(cfg, progress=False)
    first, last = history["loss"][0], min(history["loss"][-3:])
    assert last < first / 5, history["loss"]


def test_checkpoint_round_trip_and_resume(tiny_cfg, tmp_path):
    history = smol_diffusion.train(tiny_cfg, progress=False)
    out = tmp_path / "run"
    written = {p.name for p in out.iterdir()} - {"tensorboard"}  # there when it is installed
    assert sorted(written) == [".lock", "ckpt.pt", "log.jsonl", "samples_0000020.png",
                               "samples_0000040.png"]
    ckpt = load_checkpoint(out / "ckpt.pt", device="cpu")
    assert ckpt.step == 40 and ckpt.config == tiny_cfg
    assert not ckpt.model.training
    assert ckpt.history["loss"] == history["loss"]
    x = ckpt.sample(3, generator=torch.Generator().manual_seed(0))
    assert x.shape == (3, 1, 8, 8) and x.abs().max() <= 1
    state = read_checkpoint(out / "ckpt.pt")
    ema = {k: v for k, v in state["ema"].items()}
    for k, v in ckpt.model.state_dict().items():
        torch.testing.assert_close(v, ema[k])
    # resume: the step count continues and the history grows
    resumed = smol_diffusion.train(tiny_cfg.override(steps=60, resume=str(out / "ckpt.pt")),
                                   progress=False)
    assert resumed["step"][-1] == 60 and resumed["step"][:4] == history["step"]
    assert load_checkpoint(out / "ckpt.pt").step == 60


def test_resume_is_exact(tiny_cfg, tmp_path):
    """40 steps, then resume to 60, equals 60 steps straight (same data order, noise and dropout).
    A constant learning rate, since a cosine decay depends on the total step count."""
    cfg = tiny_cfg.override(sample_every=0, sample_n=0, checkpoint_every=0, lr_schedule="constant",
                            dropout=0.1)
    a = smol_diffusion.train(cfg.override(steps=60, out_dir=str(tmp_path / "a")), progress=False)
    smol_diffusion.train(cfg.override(steps=40, out_dir=str(tmp_path / "b")), progress=False)
    b = smol_diffusion.train(cfg.override(steps=60, out_dir=str(tmp_path / "b"),
                                          resume=str(tmp_path / "b" / "ckpt.pt")), progress=False)
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)


def test_a_checkpoint_from_before_a_model_field_existed_resumes(tiny_cfg, tmp_path):
    """Checkpoints written before num_classes existed lack it: it counts as its default, 0."""
    smol_diffusion.train(tiny_cfg.override(steps=5, sample_n=0), progress=False)
    path = tmp_path / "run" / "ckpt.pt"
    state = read_checkpoint(path)
    del state["config"]["model"]["num_classes"]
    save_checkpoint(path, state)
    resumed = smol_diffusion.train(tiny_cfg.override(steps=7, sample_n=0, resume=str(path)),
                                   progress=False)
    assert resumed["step"][-1] == 7


def test_resume_with_another_architecture_or_objective_is_refused(tiny_cfg, tmp_path):
    smol_diffusion.train(tiny_cfg.override(steps=5, sample_n=0), progress=False)
    other = tiny_cfg.override(channels=32, steps=10, resume=str(tmp_path / "run" / "ckpt.pt"))
    with pytest.raises(ValueError, match="another architecture.*channels: checkpoint 16 vs "
                                         "config 32"):
        smol_diffusion.train(other, progress=False)
    # the same network asked to learn v instead of eps; the sampler may change freely
    v = tiny_cfg.override(prediction="v", steps=10, resume=str(tmp_path / "run" / "ckpt.pt"))
    with pytest.raises(ValueError, match="another task.*prediction: checkpoint 'eps' vs "
                                         "config 'v'"):
        smol_diffusion.train(v, progress=False)
    # ... and so may the optimisation: the resumed run uses the config's weight decay
    resumed = smol_diffusion.train(tiny_cfg.override(
        sampler="ddim", sample_steps=3, weight_decay=0.05, steps=6, sample_n=0,
        resume=str(tmp_path / "run" / "ckpt.pt")), progress=False)
    assert resumed["step"][-1] == 6
    groups = read_checkpoint(tmp_path / "run" / "ckpt.pt")["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.05]


def test_cli_resume_goes_on_with_the_checkpoints_settings_and_folder(tiny_cfg, tmp_path):
    smol_diffusion.train(tiny_cfg.override(steps=5, sample_n=0, lr=1e-3,
                                           out_dir=str(tmp_path / "cond")), progress=False)
    path = str(tmp_path / "cond" / "ckpt.pt")
    cfg = parse_args(["--resume", path, "--steps", "9"])
    assert cfg == tiny_cfg.override(steps=9, sample_n=0, lr=1e-3, resume=path,
                                    out_dir=str(tmp_path / "cond"))
    with pytest.raises(ValueError, match="drop --preset"):
        parse_args(["--preset", "demo", "--resume", path])
    # through train(), a resume never overwrites another run's checkpoint
    smol_diffusion.train(tiny_cfg.override(steps=2, sample_n=0), progress=False)
    with pytest.raises(ValueError, match=r"would overwrite .*run/ckpt.pt, another checkpoint; "
                                         r"move that one away, or set out_dir to another "
                                         r"folder \(.*cond: beside it\)"):
        smol_diffusion.train(tiny_cfg.override(steps=9, resume=path), progress=False)
    assert load_checkpoint(tmp_path / "run" / "ckpt.pt").step == 2
    # an older copy in the same folder: no circular advice
    (tmp_path / "cond" / "ckpt.pt").rename(tmp_path / "cond" / "ckpt_5.pt")
    smol_diffusion.train(tiny_cfg.override(steps=2, sample_n=0, out_dir=str(tmp_path / "cond")),
                         progress=False)
    with pytest.raises(ValueError, match="another folder$"):
        smol_diffusion.train(parse_args(["--resume", str(tmp_path / "cond" / "ckpt_5.pt")]),
                             progress=False)


def test_settings_are_checked_before_training(tiny_cfg, tmp_path):
    for change, message in [({"steps": 0}, "steps must be an integer >= 1; got 0"),
                            ({"batch_size": -64}, "batch_size must be an integer >= 1; got -64"),
                            ({"sample_every": -1}, "sample_every must be an integer >= 0"),
                            ({"eval_every": 5, "eval_n": 1}, "eval_n must be an integer >= 2")]:
        with pytest.raises(ValueError, match=message):
            smol_diffusion.train(tiny_cfg.override(**change), progress=False)
    assert not (tmp_path / "run").exists()
    for change, message in [({"T": 4}, "sample_steps in \\[1, T\\]; got T=4, sample_steps=5"),
                            ({"sample_steps": 0}, "sample_steps in"),
                            ({"min_snr_gamma": 0.0}, "min_snr_gamma must be above 0"),
                            ({"min_snr_gamma": -5.0}, "min_snr_gamma must be above 0")]:
        with pytest.raises(ValueError, match=message):
            tiny_cfg.override(**change)
    assert tiny_cfg.override(T=10, sample_steps=3).diffusion.T == 10  # changed together
    # sample_n=0: no grids, also at the sample interval
    smol_diffusion.train(tiny_cfg.override(steps=20, sample_every=10, sample_n=0), progress=False)
    assert not list((tmp_path / "run").glob("samples_*.png"))


def test_bad_checkpoints_give_clear_errors(tmp_path):
    bare = tmp_path / "bare.pt"
    torch.save({"conv.weight": torch.zeros(1)}, bare)
    with pytest.raises(ValueError, match="not a smol_diffusion checkpoint"):
        load_checkpoint(bare)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not read checkpoint"):
        load_checkpoint(junk)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


def test_weights_that_do_not_fit_their_config(tiny_cfg, tmp_path):
    smol_diffusion.train(tiny_cfg.override(steps=2, sample_n=0), progress=False)
    path = tmp_path / "run" / "ckpt.pt"
    state = read_checkpoint(path)
    state["config"]["model"]["channels"] = 32
    save_checkpoint(path, state)
    with pytest.raises(ValueError, match="do not fit the model"):
        load_checkpoint(path)
    state["config"]["model"]["channels"] = 16
    state["config"]["train"]["ema_warmup"] = 10  # a field this version does not know
    save_checkpoint(path, state)
    with pytest.raises(ValueError, match=r"unknown config fields \['train.ema_warmup'\]"):
        load_checkpoint(path)


def test_save_is_atomic(tmp_path, monkeypatch):
    """A crash while writing leaves the old checkpoint whole and no temporary file behind."""
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"step": 1})
    real_save = torch.save

    def crash(obj, f):
        real_save(obj, f)
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert list(tmp_path.iterdir()) == [path]
    # readable as any file the user writes (mkstemp alone would make it owner-only)
    umask = os.umask(0o022)
    try:
        save_checkpoint(path, {"step": 3})
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644


def test_schedules():
    tc = dataclasses.replace(Config().train, lr=1.0, warmup=10, steps=110, lr_schedule="cosine")
    assert lr_at(0, tc) == pytest.approx(0.1) and lr_at(9, tc) == pytest.approx(1.0)
    assert lr_at(60, tc) == pytest.approx(0.55) and lr_at(110, tc) == pytest.approx(0.1)
    assert lr_at(50, dataclasses.replace(tc, lr_schedule="constant")) == 1.0
    assert ema_decay_at(0, 0.999) == pytest.approx(0.1) and ema_decay_at(10**6, 0.999) == 0.999


def test_a_device_that_is_not_here_is_named(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("mps", "cuda:1"):
        with pytest.raises(ValueError, match=f"device '{name}' was asked for, but "
                                             f"{name[:4].rstrip(':').upper()} is not available"):
            pick_device(name)


def test_cli_overrides():
    cfg = parse_args(["--preset", "demo", "--lr", "1e-4", "--steps", "2000",
                      "--attn_resolutions", "8,4", "--resume", "none", "--dataset", "cars"])
    assert cfg.train.lr == 1e-4 and cfg.train.steps == 2000 and cfg.train.resume is None
    assert cfg.model.attn_resolutions == (8, 4) and cfg.data.dataset == "cars"
    with pytest.raises(SystemExit):
        parse_args(["--steps", "many"])
    with pytest.raises(ValueError, match="unknown config field"):
        Config().override(learning_rate=1.0)


def _speed_cfg(tiny_cfg):
    """Four steps of a one-level network, the loss read at each."""
    return tiny_cfg.override(channel_mults=(1,), num_res_blocks=1, attn_resolutions=(8,),
                             steps=4, log_every=1, sample_every=0, sample_n=0,
                             checkpoint_every=0, overwrite=True)


def test_compile_trains_exactly_like_eager(tiny_cfg):
    """torch.compile (inductor, a C++ toolchain on the CPU; ~1 minute) gives the same losses."""
    cfg = _speed_cfg(tiny_cfg)
    eager = smol_diffusion.train(cfg, progress=False)
    compiled = smol_diffusion.train(cfg.override(compile=True), progress=False)
    assert compiled["loss"] == pytest.approx(eager["loss"], rel=1e-4)


def _assert_compile_falls_back_to_eager(tiny_cfg, warning: str) -> None:
    """With the (broken) torch.compile in place, compile=True warns with `warning` and trains
    exactly like compile=False."""
    cfg = _speed_cfg(tiny_cfg)
    eager = smol_diffusion.train(cfg, progress=False)
    with pytest.warns(UserWarning, match=warning):
        fallback = smol_diffusion.train(cfg.override(compile=True), progress=False)
    assert fallback["loss"] == pytest.approx(eager["loss"], rel=1e-6)


def test_compile_that_fails_warns_and_trains_eagerly(tiny_cfg, monkeypatch):
    def broken_compile(model, **kwargs):
        def run(*args):
            raise RuntimeError("no C++ compiler found")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    _assert_compile_falls_back_to_eager(tiny_cfg, "torch.compile failed.*no C\\+\\+ compiler")


@pytest.mark.skipif(not torch._dynamo.is_dynamo_supported(), reason="no torch.compile here")
def test_compile_that_fails_in_the_backward_warns_and_trains_eagerly(tiny_cfg, monkeypatch):
    """A compiler that lowers the forward graph but fails on the backward: the failure shows
    in the first call (not in the first loss.backward()), and training goes on eagerly."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._dynamo.backends.debugging import boxed_nop

    def no_backward(graph, example_inputs):
        raise RuntimeError("cannot lower the backward graph")
    backend = aot_autograd(fw_compiler=boxed_nop, bw_compiler=no_backward)
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile",
                        lambda model, **kwargs: real_compile(model, backend=backend))
    _assert_compile_falls_back_to_eager(tiny_cfg,
                                        "(?s)torch.compile failed.*cannot lower the backward")


@pytest.mark.skipif(not torch._dynamo.is_dynamo_supported(), reason="no torch.compile here")
def test_compile_passes_force_layout_optimization_on_cuda_only(monkeypatch):
    """On CUDA compile_model asks inductor for channels_last convolutions in every graph
    (force_layout_optimization); elsewhere it passes no options; and this torch knows the
    option's name (torch.compile checks option names when called). Whether inductor then lays
    out the backward's convolutions so was measured on a GPU, not tested here."""
    seen = []
    with monkeypatch.context() as m:
        m.setattr(torch, "compile", lambda model, **kw: seen.append(kw.get("options")) or model)
        for device in ("cpu", "cuda", "mps"):
            compile_model(torch.nn.Conv2d(1, 1, 1), True, torch.device(device))
    assert seen == [None, {"force_layout_optimization": True}, None]
    torch.compile(torch.nn.Conv2d(1, 1, 1), options=seen[1])  # raises on an unknown option


def test_channels_last_trains_like_contiguous(tiny_cfg):
    cfg = _speed_cfg(tiny_cfg)
    plain = smol_diffusion.train(cfg, progress=False)
    cl = smol_diffusion.train(cfg.override(channels_last=True), progress=False)
    assert cl["loss"] == pytest.approx(plain["loss"], rel=1e-4)
