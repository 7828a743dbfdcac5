"""A checkpoint's samples beside real images it did not train on, as one figure: the README's
colour grid (assets/icons32_samples.png).

    python benchmarks/colour_grid.py --checkpoint RUN/ckpt.pt --out assets/icons32_samples.png

Left: n held-out images of the run's own data (its test split), drawn at random; right: n
samples of its EMA model with its own sampler and steps, from one seed. An existing --out is
refused unless --overwrite is given.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from smol_diffusion import load_checkpoint, viz
from smol_diffusion.data import held_out, random_images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--out", required=True, help="PNG file")
    parser.add_argument("--n", type=int, default=48, help="images a side")
    parser.add_argument("--nrow", type=int, default=8)
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
    d = ckpt.config.diffusion
    rows = -(-args.n // args.nrow)
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.4 * rows / args.nrow + 0.5))
    viz.show_grid(real, title=f"{len(real)} real images ({split} split: not trained on)",
                  nrow=args.nrow, ax=axes[0])
    viz.show_grid(samples, title=f"{args.n} samples: step {ckpt.step}, {d.sampler}, "
                  f"{d.sample_steps} steps, seed {args.seed}", nrow=args.nrow, ax=axes[1])
    fig.tight_layout()
    print(viz.save_figure(fig, out))


if __name__ == "__main__":
    main()
