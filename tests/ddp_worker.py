"""Run by test_distributed.py under torchrun: `smol_diffusion.train` from command-line options,
then this process's EMA weights saved beside (not in) the run's folder, as ema_rank<r>.pt."""
import sys
from pathlib import Path

import torch

from smol_diffusion.hardware import distributed_env
from smol_diffusion.train import parse_args, train

if __name__ == "__main__":
    captured = {}
    lerp = torch._foreach_lerp_

    def spy(ema, params, weight):  # the EMA update: remember which tensors it updates
        captured["ema"] = ema
        return lerp(ema, params, weight)

    torch._foreach_lerp_ = spy
    cfg = parse_args(sys.argv[1:])
    train(cfg, progress=False)
    out = Path(cfg.train.out_dir).parent / f"ema_rank{distributed_env()[0]}.pt"
    torch.save([p.clone() for p in captured["ema"]], out)
