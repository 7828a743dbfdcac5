"""Editing measured on the digits: RePaint inpainting and SDEdit class edits of held-out digits,
scored by the package's digit classifier (the one `evaluate` uses).

    python benchmarks/editing_quality.py --conditional checkpoints/demo/ckpt.pt \
        --unconditional checkpoints/demo_uncond/ckpt.pt --n 1000 \
        --json benchmarks/results/editing_quality_cpu_<date>.json --figures assets

The held-out digits (the test split: 50 of each digit) are repeated to n, each copy with its
own noise. For each mask (bottom and right half) and model: the share of completions the
classifier assigns to the true digit, against RePaint's resampling count and the network calls
it costs; the unconditional model, and the conditional one without a label and told the true
digit. Beside them the floor (the masked inputs alone) and the ceiling (the real digits; the
classifier trained on all 5,000 digits, these included). Then SDEdit class edits with the
conditional model: each digit asked for another digit (its own + 1..9, at random), at strengths
0.2 to 1.0: the share classified as the target, as the original, and the mean pixel change
(of 0..1 pixels), the curve from "unchanged" to "a new sample". One job at a time, on the CPU.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from smol_diffusion import load_checkpoint, viz
from smol_diffusion.data import held_out, to_model_range
from smol_diffusion.editing import named_mask
from smol_diffusion.features import digit_extractor
from smol_diffusion.samplers import repaint_calls


def share(extractor, images: torch.Tensor, labels: torch.Tensor) -> float:
    """The share of images the digit classifier assigns to `labels` (its most likely class)."""
    predicted = torch.from_numpy(extractor.probs(images).argmax(axis=1))
    return (predicted == labels).double().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--conditional", required=True, help="a class-conditional digits ckpt")
    parser.add_argument("--unconditional", required=True, help="an unconditional digits ckpt")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--resample", default="1,5,10")
    parser.add_argument("--jump_length", type=int, default=10)
    parser.add_argument("--masks", default="bottom,right")
    parser.add_argument("--strengths", default="0.2,0.4,0.6,0.8,1.0")
    parser.add_argument("--guidance", type=float, default=2.0, help="for the class edits")
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--cache_dir", default="data/cache")
    parser.add_argument("--json", required=True)
    parser.add_argument("--figures", default=None, help="folder for the two figures")
    args = parser.parse_args()
    cond, uncond = (load_checkpoint(p, device="cpu") for p in (args.conditional,
                                                               args.unconditional))
    cfg = cond.config
    split, data = held_out(cfg)
    repeat = -(-args.n // len(data))
    images = to_model_range(data.images).repeat(repeat, 1, 1, 1)[:args.n]
    labels = data.labels.repeat(repeat)[:args.n]
    extractor = digit_extractor(cfg.model.image_size, args.cache_dir)
    steps = cfg.diffusion.sample_steps
    print(f"{args.n} completions of the {len(data)} {split} digits; {platform.processor()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}", flush=True)
    out = {"n": args.n, "split": split, "held_out": len(data), "steps": steps,
           "jump_length": args.jump_length, "real": share(extractor, images, labels),
           "inpainting": [], "sdedit": []}
    print(f"real digits: {out['real']:.1%} classified as themselves", flush=True)
    shown = {}
    for name in args.masks.split(","):
        mask = named_mask(name, cfg.model.image_size)
        floor = share(extractor, mask * images, labels)
        print(f"{name}: masked inputs alone {floor:.1%}", flush=True)
        for model, ckpt, given in (("unconditional", uncond, None), ("conditional", cond, None),
                                   ("conditional, true digit", cond, labels)):
            for r in map(int, args.resample.split(",")):
                t0 = time.time()
                filled = ckpt.inpaint(images, mask, resample=r, jump_length=args.jump_length,
                                      labels=given, batch_size=args.batch,
                                      generator=torch.Generator().manual_seed(r))
                row = {"mask": name, "model": model, "resample": r,
                       "calls": repaint_calls(steps, args.jump_length, r),
                       "share": share(extractor, filled, labels), "floor": floor,
                       "seconds": round(time.time() - t0, 1)}
                out["inpainting"].append(row)
                print(f"  {model:24s} resample {r:2d} ({row['calls']:3d} calls): "
                      f"{row['share']:.1%} true digit, {row['seconds']:.0f}s", flush=True)
                if name == "bottom" and model == "unconditional":
                    shown[r] = filled[:10]
        Path(args.json).write_text(json.dumps(out, indent=1))
    targets = (labels + torch.randint(1, 10, labels.shape,
                                      generator=torch.Generator().manual_seed(0))) % 10
    strip = [images[:8]]
    for s in map(float, args.strengths.split(",")):
        t0 = time.time()
        edited = cond.sdedit(images, s, labels=targets, guidance=args.guidance,
                             batch_size=args.batch, generator=torch.Generator().manual_seed(1))
        row = {"strength": s, "target": share(extractor, edited, targets),
               "original": share(extractor, edited, labels),
               "pixel_change": ((edited - images).abs().mean() / 2).item(),
               "calls": round(s * steps), "seconds": round(time.time() - t0, 1)}
        out["sdedit"].append(row)
        strip.append(edited[:8])
        print(f"SDEdit strength {s:.1f}: {row['target']:.1%} the target, {row['original']:.1%} "
              f"the original, mean change {row['pixel_change']:.3f}", flush=True)
    Path(args.json).write_text(json.dumps(out, indent=1))
    if args.figures:
        mask = named_mask("bottom", cfg.model.image_size)
        rows = [images[:10], mask * images[:10], *shown.values()]
        fig, ax = plt.subplots(figsize=(7, 0.75 * len(rows) + 0.6))
        viz.show_grid(torch.cat(rows), nrow=10, ax=ax, title="held-out digits; bottom half "
                      "masked; inpainted, unconditional model, resample " +
                      ", ".join(map(str, shown)))
        viz.save_figure(fig, Path(args.figures) / "inpainting_demo.png")
        fig, ax = plt.subplots(figsize=(0.75 * len(strip) + 0.6, 7))
        grid = torch.stack(strip, dim=1).flatten(0, 1)  # a row a digit, a column a strength
        viz.show_grid(grid, nrow=len(strip), ax=ax, title="SDEdit towards "
                      f"{', '.join(str(int(t)) for t in targets[:8])}: strength 0, "
                      + ", ".join(args.strengths.split(",")))
        viz.save_figure(fig, Path(args.figures) / "sdedit_demo.png")


if __name__ == "__main__":
    main()
