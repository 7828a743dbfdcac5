"""Editing measured on the digits: RePaint inpainting and SDEdit class edits of held-out digits,
scored by the package's digit classifier (the one `evaluate` uses).

    python benchmarks/editing_quality.py --conditional checkpoints/demo/ckpt.pt \
        --unconditional checkpoints/demo_uncond/ckpt.pt --n 1000 \
        --json benchmarks/results/editing_quality_cpu_<date>.json --figures assets

The held-out digits (the test split: 50 of each digit) are repeated to n, each copy with its
own noise. For each mask (bottom and right half) and model: the share of completions the
classifier assigns to the true digit, against RePaint's resampling count and the network calls
it costs (on the ancestral sampler, which resampling needs), and with each other sampler pasting
at its own steps (resample 1); the unconditional model, and the conditional one without a label
and told the true digit (no guidance). Beside them the floor (the masked inputs alone) and the ceiling (the real digits; the
classifier trained on all 5,000 digits, these included). Then SDEdit class edits with the
conditional model: each digit asked for another digit (its own + 1..9, at random), at strengths
0.2 to 1.0: the share classified as the target, as the original, and the mean pixel change
(of 0..1 pixels), the curve from "unchanged" to "a new sample". One job at a time, on the CPU.
"""
from __future__ import annotations

import argparse
import json
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
from smol_diffusion.hardware import resolve_precision
from smol_diffusion.samplers import SAMPLERS, repaint_calls
from train_throughput import machine


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
    parser.add_argument("--samplers", default=",".join(s for s in SAMPLERS if s != "ddpm"),
                        help="the others, each at resample 1")
    parser.add_argument("--masks", default="bottom,right")
    parser.add_argument("--strengths", default="0.2,0.4,0.6,0.8,1.0")
    parser.add_argument("--guidance", type=float, default=2.0, help="for the class edits")
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--cache_dir", default="data/cache")
    parser.add_argument("--json", required=True)
    parser.add_argument("--figures", default=None, help="folder for the two figures")
    parser.add_argument("--figures_only", action="store_true", help="draw them, measure nothing")
    args = parser.parse_args()
    cond, uncond = (load_checkpoint(p, device="cpu") for p in (args.conditional,
                                                               args.unconditional))
    cfg = cond.config
    split, data = held_out(cfg)
    if args.figures:
        figures(cond, uncond, data, Path(args.figures), args)
    if args.figures_only:
        return
    repeat = -(-args.n // len(data))
    images = to_model_range(data.images).repeat(repeat, 1, 1, 1)[:args.n]
    labels = data.labels.repeat(repeat)[:args.n]
    extractor = digit_extractor(cfg.model.image_size, args.cache_dir)
    steps = cfg.diffusion.sample_steps
    precision = resolve_precision(cfg.train.precision, torch.device("cpu"))
    print(f"{args.n} completions of the {len(data)} {split} digits, {steps} steps; "
          f"{machine(torch.device('cpu'))}, torch {torch.__version__}, {precision}", flush=True)
    out = {"n": args.n, "split": split, "held_out": len(data), "steps": steps,
           "jump_length": args.jump_length, "machine": machine(torch.device("cpu")),
           "precision": precision, "real": share(extractor, images, labels),
           "inpainting": [], "sdedit": []}
    print(f"real digits: {out['real']:.1%} classified as themselves", flush=True)
    for name in filter(None, args.masks.split(",")):  # --masks "": the class edits alone
        mask = named_mask(name, cfg.model.image_size)
        floor = share(extractor, mask * images, labels)
        print(f"{name}: masked inputs alone {floor:.1%}", flush=True)
        for model, ckpt, given in (("unconditional", uncond, None), ("conditional", cond, None),
                                   ("conditional, true digit", cond, labels)):
            runs = [("ddpm", int(r)) for r in args.resample.split(",")]
            for sampler, r in runs + [(s, 1) for s in args.samplers.split(",") if s]:
                t0 = time.time()
                filled = ckpt.inpaint(images, mask, resample=r, jump_length=args.jump_length,
                                      sampler=sampler, labels=given, batch_size=args.batch,
                                      generator=torch.Generator().manual_seed(r))
                row = {"mask": name, "model": model, "sampler": sampler, "resample": r,
                       "calls": repaint_calls(steps, args.jump_length, r),
                       "share": share(extractor, filled, labels), "floor": floor,
                       "seconds": round(time.time() - t0, 1)}
                out["inpainting"].append(row)
                print(f"  {model:24s} {sampler:11s} resample {r:2d} ({row['calls']:3d} calls): "
                      f"{row['share']:.1%} true digit, {row['seconds']:.0f}s", flush=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
    targets = (labels + torch.randint(1, 10, labels.shape,
                                      generator=torch.Generator().manual_seed(0))) % 10
    for s in map(float, args.strengths.split(",")):
        t0 = time.time()
        edited = cond.sdedit(images, s, labels=targets, guidance=args.guidance,
                             batch_size=args.batch, generator=torch.Generator().manual_seed(1))
        row = {"strength": s, "target": share(extractor, edited, targets),
               "original": share(extractor, edited, labels),
               "pixel_change": ((edited - images).abs().mean() / 2).item(),
               "calls": round(s * steps), "seconds": round(time.time() - t0, 1)}
        out["sdedit"].append(row)
        print(f"SDEdit strength {s:.1f}: {row['target']:.1%} the target, {row['original']:.1%} "
              f"the original, mean change {row['pixel_change']:.3f}", flush=True)
    Path(args.json).write_text(json.dumps(out, indent=1))


def figures(cond, uncond, data, folder: Path, args) -> None:
    """The two figures, from runs of their own on the first held-out digit of each class:
    bottom halves inpainted by the unconditional model at each resampling count, and a strip
    of class edits at each strength."""
    first = [data.labels.tolist().index(d) for d in range(10)]
    images, labels = to_model_range(data.images[first]), data.labels[first]
    mask = named_mask("bottom", images.shape[-1])
    resample = [int(r) for r in args.resample.split(",")]
    rows = [images, mask * images] + [
        uncond.inpaint(images, mask, resample=r, jump_length=args.jump_length, sampler="ddpm",
                       generator=torch.Generator().manual_seed(r)) for r in resample]
    fig, ax = plt.subplots(figsize=(6, 0.62 * len(rows) + 0.9))
    viz.show_grid(torch.cat(rows), nrow=10, ax=ax, title="held-out digits; bottom half "
                  "masked;\ninpainted (unconditional model), resample "
                  + ", ".join(map(str, resample)) + " from the top")
    viz.save_figure(fig, folder / "inpainting_demo.png")
    targets = (labels + 1 + torch.arange(10) % 9) % 10  # another digit for each
    strengths = [0.0] + [float(x) for x in args.strengths.split(",")]
    strip = [cond.sdedit(images, s, labels=targets, guidance=args.guidance,
                         generator=torch.Generator().manual_seed(1)) for s in strengths]
    grid = torch.stack(strip, dim=1).flatten(0, 1)  # a row a digit, a column a strength
    fig, ax = plt.subplots(figsize=(0.62 * len(strip) + 1.6, 6.6))
    viz.show_grid(grid, nrow=len(strip), ax=ax, title="SDEdit class edits, guidance "
                  f"{args.guidance:g}:\nstrength " + ", ".join(f"{s:g}" for s in strengths))
    ax.set_axis_on()  # the rows' labels: from a digit to its target
    ax.set_xticks([])
    ax.spines[:].set_visible(False)
    ax.set_yticks([1 + i * (grid.shape[-1] + 1) + grid.shape[-1] / 2 for i in range(10)],
                  [f"{int(a)} to {int(b)}" for a, b in zip(labels, targets)])
    viz.save_figure(fig, folder / "sdedit_demo.png")

if __name__ == "__main__":
    main()
