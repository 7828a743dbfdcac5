"""Precision: what `auto` picks on each kind of GPU, and fp16 training with loss scaling, run end
to end on the CPU: a step whose scaled gradients overflow is skipped and the scale halved, the
run trains on, and a resume goes on at the saved scale, exactly."""
import sys
from pathlib import Path

import pytest
import torch

import smol_diffusion
from smol_diffusion.checkpoint import read_checkpoint
from smol_diffusion.hardware import autocast_dtype, grad_scaler
from smol_diffusion.runlog import read_log
from smol_diffusion.training import TrainingDiverged

CUDA = torch.device("cuda", 0)
# fp16 runs here on the CPU, where it is slow (and warns so): the tiny model takes seconds
pytestmark = pytest.mark.filterwarnings("ignore:fp16 on a CPU")


@pytest.mark.parametrize("capability, hip, expected", [
    ((6, 0), None, torch.float16),   # P100: no bf16 hardware (torch can emulate it)
    ((7, 0), None, torch.float16),   # V100
    ((7, 5), None, torch.float16),   # T4: fp16 tensor cores only
    ((8, 0), None, torch.bfloat16),  # A100
    ((8, 9), None, torch.bfloat16),  # L4, RTX 40xx
    ((9, 0), None, torch.bfloat16),  # H100
    ((9, 0), "6.4", torch.bfloat16),  # an AMD Instinct GPU under ROCm
])
def test_auto_picks_bf16_from_ampere_on_and_fp16_before(monkeypatch, capability, hip, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.version, "hip", hip)
    assert autocast_dtype("auto", CUDA) == expected


def test_explicit_precisions_are_taken_as_given():
    for device in (CUDA, torch.device("cpu")):
        assert autocast_dtype("bf16", device) == torch.bfloat16
        assert autocast_dtype("fp16", device) == torch.float16
        assert autocast_dtype("fp32", device) is None
    assert autocast_dtype("auto", torch.device("mps")) is None
    with pytest.raises(ValueError, match="precision must be one of auto, bf16, fp16, fp32"):
        autocast_dtype("half", CUDA)


def test_fp16_on_a_cpu_warns_that_it_is_slow(tiny_cfg):
    with pytest.warns(UserWarning, match="fp16 on a CPU runs PyTorch's slow reference kernels"):
        smol_diffusion.train(tiny_cfg.override(precision="fp16", steps=1, sample_n=0),
                             progress=False)


def test_only_fp16_scales_the_loss():
    cpu = torch.device("cpu")
    assert grad_scaler(cpu, torch.float16).is_enabled()
    assert not grad_scaler(cpu, torch.bfloat16).is_enabled()
    assert not grad_scaler(cpu, None).is_enabled()


def overflow_at(monkeypatch, call: int) -> None:
    """Make the loss of the `call`-th training step 10^5 times larger: at a loss scale of 2^16
    its fp16 gradients overflow, as the first steps of an fp16 run often do."""
    train_module = sys.modules["smol_diffusion.training"]
    real_loss, calls = train_module.simple_loss, []

    def loss(*args, **kwargs):
        calls.append(1)
        out = real_loss(*args, **kwargs)
        return out * 1e5 if len(calls) == call else out

    monkeypatch.setattr(train_module, "simple_loss", loss)


def test_fp16_skips_an_overflowing_step_halves_the_scale_and_trains_on(tiny_cfg, monkeypatch):
    overflow_at(monkeypatch, 7)
    cfg = tiny_cfg.override(precision="fp16", steps=30, log_every=5, sample_n=0)
    history = smol_diffusion.train(cfg, progress=False)
    assert history["skipped"] == 1
    rows = read_log(cfg.train.out_dir)["train"]
    assert [r["skipped"] for r in rows] == [0, 1, 0, 0, 0, 0]
    assert [r["loss_scale"] for r in rows] == [2.0**16] + [2.0**15] * 5  # halved at step 7
    assert all(r["loss"] is not None for r in rows) and rows[-1]["loss"] < rows[0]["loss"] / 2
    state = read_checkpoint(Path(cfg.train.out_dir) / "ckpt.pt")
    assert state["scaler"]["scale"] == 2.0**15
    assert read_log(cfg.train.out_dir)["start"][0]["precision"] == "fp16"


def test_an_fp16_resume_goes_on_at_the_saved_scale_exactly(tiny_cfg, tmp_path, monkeypatch):
    overflow_at(monkeypatch, 7)  # the scale is 2^15 at the checkpoint of step 10
    cfg = tiny_cfg.override(precision="fp16", steps=20, log_every=5, sample_n=0,
                            checkpoint_every=10, dropout=0.0, lr_schedule="constant")
    smol_diffusion.train(cfg.override(out_dir=str(tmp_path / "straight")), progress=False)
    overflow_at(monkeypatch, 7)
    half = cfg.override(out_dir=str(tmp_path / "resumed"))
    smol_diffusion.train(half.override(steps=10), progress=False)
    smol_diffusion.train(half.override(resume=str(tmp_path / "resumed" / "ckpt.pt")),
                         progress=False)
    a, b = (read_checkpoint(tmp_path / run / "ckpt.pt") for run in ("straight", "resumed"))
    assert a["step"] == b["step"] == 20 and a["scaler"] == b["scaler"]
    for part in ("model", "ema"):
        for name, tensor in a[part].items():
            assert torch.equal(tensor, b[part][name]), (part, name)


def test_sampling_uses_the_precision_training_used(tiny_cfg, monkeypatch):
    smol_diffusion.train(tiny_cfg.override(precision="fp16", steps=2, sample_n=0),
                         progress=False)
    ckpt = smol_diffusion.load_checkpoint(Path(tiny_cfg.train.out_dir) / "ckpt.pt")
    seen = []
    ckpt.model.register_forward_hook(lambda m, args, out: seen.append(out.dtype))
    ckpt.sample(2, steps=2)
    ckpt.sample(2, steps=2, precision="fp32")
    assert seen == [torch.float16] * 2 + [torch.float32] * 2


def test_the_scalers_own_skips_are_no_divergence(tiny_cfg, monkeypatch):
    """With a reading every step, the first step's overflow is all its window: over half
    skipped, yet the scale (2^15) says the scaler is at work, not that the run diverged."""
    overflow_at(monkeypatch, 1)
    history = smol_diffusion.train(tiny_cfg.override(precision="fp16", steps=4, log_every=1,
                                                     sample_n=0), progress=False)
    assert history["skipped"] == 1 and history["step"] == [1, 2, 3, 4]


def test_a_diverged_fp16_run_still_stops(tiny_cfg):
    with pytest.raises(TrainingDiverged, match="of the last 5 steps had a non-finite"):
        smol_diffusion.train(tiny_cfg.override(precision="fp16", lr=1e3, steps=80, log_every=5,
                                               sample_n=0, checkpoint_every=0), progress=False)
    assert not (Path(tiny_cfg.train.out_dir) / "ckpt.pt").exists()
