"""Command line for sampling a grid from a checkpoint:

    python -m smol_diffusion.sample --checkpoint checkpoints/demo/ckpt.pt --n 64 --out grid.png
"""
from __future__ import annotations

import argparse
import time

import torch

from .checkpoint import load_checkpoint
from .hardware import PRECISIONS
from .samplers import SAMPLERS
from .schedule import SPACINGS
from .viz import save_grid


def parse_labels(text: str, classes: list[str] | None, n: int) -> torch.Tensor:
    """n labels from "7" or "0,1,2" or class names ("BMW M3 Coupe 2012"), repeated in turn."""
    if not classes:
        raise ValueError("--labels needs a class-conditional checkpoint (trained with "
                         "num_classes > 0); this one is unconditional")
    index = {name.lower(): i for i, name in enumerate(classes)}
    wanted = []
    for token in (t.strip() for t in text.split(",") if t.strip()):
        if token.lower() in index:
            wanted.append(index[token.lower()])
        elif token.lstrip("-").isdigit():
            wanted.append(int(token))
        else:
            raise ValueError(f"no class named {token!r}; classes are indices 0..{len(classes) - 1}"
                             f" or names such as {', '.join(classes[:3])}")
    return torch.tensor(wanted).repeat(n // len(wanted) + 1)[:n]


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
    parser.add_argument("--labels", default=None,
                        help="conditional models: class indices or names, comma-separated, "
                             "repeated over the n images (--labels 7: all sevens)")
    parser.add_argument("--guidance", type=float, default=1.0,
                        help="classifier-free guidance scale (0: unconditional, 1: conditional)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=256, help="images per network call")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default=None, choices=PRECISIONS,
                        help="autocast precision (default: the checkpoint's, as in training)")
    args = parser.parse_args(argv)
    if args.n < 1 or args.batch < 1:
        parser.error("--n and --batch must be at least 1")
    try:
        ckpt = load_checkpoint(args.checkpoint, device=args.device)
    except (ValueError, FileNotFoundError) as e:  # bad input: the message says how to fix it
        raise SystemExit(f"error: {e}") from None
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    options = {k: v for k, v in [("sampler", args.sampler), ("spacing", args.spacing),
                                 ("eta", args.eta), ("precision", args.precision)] if v}
    if args.guidance != 1.0:
        options["guidance"] = args.guidance
    try:
        labels = parse_labels(args.labels, ckpt.classes, args.n) if args.labels else None
        images = torch.cat([ckpt.sample(min(args.batch, args.n - i), generator=gen,
                                        steps=args.steps, progress=True, **options,
                                        **({} if labels is None else
                                           {"labels": labels[i:i + args.batch]}))
                            for i in range(0, args.n, args.batch)])
    except ValueError as e:  # e.g. eta with a sampler other than DDIM
        raise SystemExit(f"error: {e}") from None
    path = save_grid(images, args.out)
    d = ckpt.config.diffusion
    steps = d.sample_steps if args.steps is None else args.steps
    print(f"{args.n} images, {args.sampler or d.sampler}, {steps} steps, "
          f"{time.time() - t0:.1f}s -> {path}")


if __name__ == "__main__":
    main()
