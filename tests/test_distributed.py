"""torchrun with two CPU processes (gloo) against one process with the same global batch."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import smol_diffusion
from smol_diffusion.cli import parse_train as parse_args

ROOT = Path(__file__).resolve().parents[1]
# the tiny digits model of conftest, 6 steps of 16 images, the loss logged every step; fp32,
# since on a CPU with bf16 hardware `auto` picks bf16, whose rounding differs between batch splits
ARGS = ["--preset", "demo", "--image_size", "8", "--channels", "16", "--channel_mults", "1,2",
        "--attn_resolutions", "4", "--heads", "2", "--batch_size", "16", "--warmup", "5",
        "--log_every", "1", "--sample_every", "0", "--sample_n", "4", "--sample_steps", "5",
        "--checkpoint_every", "0", "--channels_last", "false", "--precision", "fp32"]


def torchrun(nproc: int, *args: str) -> None:
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={nproc}", str(ROOT / "tests" / "ddp_worker.py"),
                           *ARGS, *args], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: 6 steps in this process."""
    out = tmp_path_factory.mktemp("one") / "run"
    history = smol_diffusion.train(parse_args([*ARGS, "--steps", "6", "--out_dir", str(out)]),
                                   progress=False)
    return history, torch.load(out / "ckpt.pt", weights_only=True), out


def assert_same_weights(a: dict, b: dict, atol: float = 1e-5) -> None:
    for part in ("model", "ema"):
        for k in a[part]:
            torch.testing.assert_close(a[part][k], b[part][k], atol=atol, rtol=1e-4)


def test_two_processes_match_one_with_the_same_global_batch(one_process, tmp_path):
    """8 images a process, in 2 accumulated micro-batches of 4: the same losses and weights as
    16 images in one process; the EMA is identical on both ranks; only rank 0 writes."""
    history, state, out_one = one_process
    out = tmp_path / "run"
    torchrun(2, "--steps", "6", "--grad_accum", "2", "--out_dir", str(out))
    two = torch.load(out / "ckpt.pt", weights_only=True)
    assert two["history"]["loss"] == pytest.approx(history["loss"], rel=1e-5)
    assert_same_weights(two, state)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert all(torch.equal(a, b) for a, b in zip(rank0["ema"], rank1["ema"]))
    for a, b in zip(rank0["ema"], state["ema"].values()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert rank0["writes"] == 2 and rank1["writes"] == 0  # the checkpoint and the grid
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in out_one.iterdir())


def test_resume_a_two_process_checkpoint_in_one_process(one_process, tmp_path):
    history, state, _ = one_process
    out = tmp_path / "run"
    torchrun(2, "--steps", "3", "--out_dir", str(out))
    # the command line's resume: the checkpoint's own settings, only the step count changed
    resumed = smol_diffusion.train(parse_args(["--steps", "6", "--resume", str(out / "ckpt.pt")]),
                                   progress=False)
    assert resumed["loss"] == pytest.approx(history["loss"], rel=1e-5)
    assert_same_weights(torch.load(out / "ckpt.pt", weights_only=True), state)


def test_bad_training_settings_are_refused(tiny_cfg):
    with pytest.raises(ValueError, match="batch_size 16 does not split into 3 accumulation steps"):
        smol_diffusion.train(tiny_cfg.override(grad_accum=3), progress=False)
    with pytest.raises(ValueError, match="grad_accum must be an integer >= 1"):
        smol_diffusion.train(tiny_cfg.override(grad_accum=0), progress=False)
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*64\); got -1"):
        smol_diffusion.train(tiny_cfg.override(seed=-1), progress=False)
    with pytest.raises(ValueError, match="log_every must be an integer >= 1; got 0"):
        smol_diffusion.train(tiny_cfg.override(log_every=0), progress=False)
    with pytest.raises(ValueError, match="grad_clip must be a number > 0 .*; got 0.0"):
        smol_diffusion.train(tiny_cfg.override(grad_clip=0.0), progress=False)
