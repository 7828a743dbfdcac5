"""Command line for sampling a grid from a checkpoint:

    python -m smol_diffusion.sample --checkpoint checkpoints/demo/ckpt.pt --n 64 --out grid.png
"""
from __future__ import annotations

import argparse
import time

import torch

from .checkpoint import load_checkpoint
from .samplers import SAMPLERS
from .schedule import SPACINGS
from .viz import save_grid


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m smol_diffusion.sample",
                                     description="Sample a grid of images from a checkpoint.")
    parser.add_argument("--checkpoint", required=True, help="a ckpt.pt written by training")
    parser.add_argument("--n", type=int, default=64, help="number of images")
    parser.add_argument("--out", default="samples.png", help="PNG file for the grid")
    parser.add_argument("--sampler", default=None, choices=sorted(SAMPLERS),
                        help="default: the checkpoint's")
    parser.add_argument("--steps", type=int, default=None,
                        help="network calls per image, a respacing of the training schedule "
                             "(default: the checkpoint's sample_steps)")
    parser.add_argument("--spacing", default=None, choices=SPACINGS,
                        help="default: the checkpoint's")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM's noise (0: deterministic)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=256, help="images per network call")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error("--n must be at least 1")
    try:
        ckpt = load_checkpoint(args.checkpoint, device=args.device)
    except (ValueError, FileNotFoundError) as e:  # bad input: the message says how to fix it
        raise SystemExit(f"error: {e}") from None
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    options = {k: v for k, v in [("sampler", args.sampler), ("spacing", args.spacing),
                                 ("eta", args.eta)] if v}
    try:
        images = torch.cat([ckpt.sample(min(args.batch, args.n - i), generator=gen,
                                        steps=args.steps, **options)
                            for i in range(0, args.n, args.batch)])
    except ValueError as e:  # e.g. eta with a sampler other than DDIM
        raise SystemExit(f"error: {e}") from None
    path = save_grid(images, args.out)
    d = ckpt.config.diffusion
    print(f"{args.n} images, {args.sampler or d.sampler}, {args.steps or d.sample_steps} steps, "
          f"{time.time() - t0:.1f}s -> {path}")


if __name__ == "__main__":
    main()
