"""Run by test_distributed.py under torchrun: `smol-diffusion train` from command-line options,
then this process's EMA weights and the number of files it wrote saved beside (not in) the
run's folder, as rank<r>.pt."""
import sys
from pathlib import Path

import torch

import smol_diffusion.training as training
import smol_diffusion.trainstate as trainstate
from smol_diffusion.cli import parse_train
from smol_diffusion.hardware import distributed_env

if __name__ == "__main__":
    captured = {}
    lerp = torch._foreach_lerp_

    def spy(ema, params, weight):  # the EMA update: remember which tensors it updates
        captured["ema"] = ema
        return lerp(ema, params, weight)

    torch._foreach_lerp_ = spy
    writes = []
    for name in ("save_checkpoint", "save_grid"):  # count the files this process writes
        real = getattr(trainstate, name)
        setattr(trainstate, name, lambda *a, real=real, **k: writes.append(1) or real(*a, **k))
    cfg = parse_train(sys.argv[1:])
    training.train(cfg)  # the progress bar (rank 0) tells a test that steps are being taken
    out = Path(cfg.train.out_dir).parent / f"rank{distributed_env()[0]}.pt"
    torch.save({"ema": [p.clone() for p in captured["ema"]], "writes": len(writes)}, out)
