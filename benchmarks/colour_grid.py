"""A checkpoint's samples beside real images it did not train on, as one figure: the README's
colour grid (assets/icons32_samples.png).

    python benchmarks/colour_grid.py --checkpoint RUN/ckpt.pt --out assets/icons32_samples.png

Left: n held-out images of the run's own data (its test split), drawn at random; right: n
samples of its EMA model with its own sampler and steps, from one seed; each pixel drawn as
--scale x --scale pixels. An existing --out is refused unless --overwrite is given.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torchvision.utils import save_image

from smol_diffusion import load_checkpoint
from smol_diffusion.data import held_out, random_images
from smol_diffusion.viz import to_grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--out", required=True, help="PNG file")
    parser.add_argument("--n", type=int, default=48, help="images a side")
    parser.add_argument("--nrow", type=int, default=8)
    parser.add_argument("--scale", type=int, default=3, help="pixels a pixel (nearest)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise SystemExit(f"error: {out} exists already; name another --out, or --overwrite")
    ckpt = load_checkpoint(args.checkpoint, device="cpu")
    split, data = held_out(ckpt.config, at_least=args.n)
    real = random_images(data, args.n, args.seed)
    samples = ckpt.sample(args.n, generator=torch.Generator().manual_seed(args.seed))
    left, right = to_grid(real, args.nrow), to_grid(samples, args.nrow)  # (C, H, W) in [0, 1]
    gap = torch.ones(left.shape[0], left.shape[1], 16)
    gap[:, :, 7:9] = 0.5  # a grey line between the two: both have white grounds
    both = torch.cat([left, gap, right], dim=2)
    both = both.repeat_interleave(args.scale, 1).repeat_interleave(args.scale, 2)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_image(both, out)
    d = ckpt.config.diffusion
    print(f"{out}: left, {len(real)} {split} images; right, {args.n} samples (step {ckpt.step}, "
          f"{d.sampler}, {d.sample_steps} steps, seed {args.seed})")


if __name__ == "__main__":
    main()
