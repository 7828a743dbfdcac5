"""Sample quality against network calls (NFE) for each sampler, side by side in one run.

    python benchmarks/sampler_quality.py --checkpoint checkpoints/demo/ckpt.pt --n 1000

For every sampler and NFE: FID and KID against the training data (the checkpoint's default
extractor: the digit classifier for the demo) and, on digits, the share of recognisable
samples, from the same n samples per row (the same seed, so the same x_T), with wall time per
image on this machine. Then the spacings at one NFE. Prints a markdown table, writes JSON, and
plots FID against NFE with the 1,000-step ancestral sampler as the reference line.

By default both go to new dated files, benchmarks/results/sampler_quality_cpu_<date>.json and
.png (it samples on the CPU), beside the other results; an existing file, such as a committed
figure (assets/sampler_quality.png), is refused before any work unless --overwrite is given.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

import matplotlib
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script
from smol_diffusion import load_checkpoint  # noqa: E402
from smol_diffusion.evaluate import evaluate  # noqa: E402
from smol_diffusion.samplers import SAMPLERS  # noqa: E402
from smol_diffusion.schedule import SPACINGS  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def run(ckpt, n: int, sampler: str, nfe: int, spacing: str, cache_dir: str) -> dict:
    """One row: the metrics of n samples drawn with `sampler` in `nfe` network calls."""
    rows = evaluate(ckpt, n, metrics=("fid", "kid", "recognisable")
                    if ckpt.config.data.dataset == "mnist" else ("fid", "kid"),
                    sampler=sampler, steps=nfe, spacing=spacing, seed=0, cache_dir=cache_dir,
                    progress=False)
    row = {"sampler": sampler, "nfe": nfe, "spacing": spacing, "n": n,
           "ms_per_image": 1000 * rows[0]["sampling_seconds"] / n}
    for r in rows:
        row[r["metric"]] = r["value"]
        if r["metric"] == "kid":
            row["kid_std"] = r["std"]
    print(f"{sampler:>8} {nfe:>5} {spacing:>9}  fid {row['fid']:.3f}  kid {row['kid']:.3f}"
          + (f"  recognisable {row['recognisable']:.1%}" if "recognisable" in row else "")
          + f"  {row['ms_per_image']:.1f} ms/image", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default="checkpoints/demo/ckpt.pt")
    parser.add_argument("--n", type=int, default=1000, help="samples per row")
    parser.add_argument("--samplers", default=",".join(SAMPLERS))
    parser.add_argument("--nfe", default="5,10,15,20,50,100")
    parser.add_argument("--reference", default="ddpm:1000", help="sampler:NFE of the baseline")
    parser.add_argument("--spacing", default="trailing", choices=SPACINGS)
    parser.add_argument("--spacing_nfe", "--spacing-nfe", type=int, default=10,
                        help="NFE at which every spacing is compared (0: skip)")
    parser.add_argument("--cache_dir", "--cache-dir", default="data/cache")
    parser.add_argument("--out", default=None, help="JSON file (default: "
                        "benchmarks/results/sampler_quality_cpu_<today>.json, a new file)")
    parser.add_argument("--plot", default=None,
                        help="PNG file for the plot (default: --out with .png in place of .json)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out and --plot if they exist (else: refused at once)")
    args = parser.parse_args()
    # Samples on the CPU (below), so the machine in the name is "cpu": benchmarks/README.md's
    # <script>_<machine>_<date> naming, never a committed figure unless asked for by name.
    out = Path(args.out or f"benchmarks/results/sampler_quality_cpu_{datetime.date.today()}.json")
    plot = Path(args.plot) if args.plot else out.with_suffix(".png")
    existing = [str(p) for p in (out, plot) if p.exists()]
    if existing and not args.overwrite:
        verb = "exists" if len(existing) == 1 else "exist"
        raise SystemExit(f"error: {' and '.join(existing)} {verb} already; pass --out and "
                         "--plot naming new files, or --overwrite to replace them")
    for path in (out, plot):  # a missing folder fails now, not after the run
        path.parent.mkdir(parents=True, exist_ok=True)
    ckpt = load_checkpoint(args.checkpoint, device="cpu")
    samplers = args.samplers.split(",")
    ref_sampler, ref_nfe = args.reference.split(":")
    print(f"{args.checkpoint} (step {ckpt.step}), n={args.n}, "
          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    rows = [run(ckpt, args.n, ref_sampler, int(ref_nfe), args.spacing, args.cache_dir)]
    for sampler in samplers:
        for nfe in [int(k) for k in args.nfe.split(",")]:
            rows.append(run(ckpt, args.n, sampler, nfe, args.spacing, args.cache_dir))
    best = min((r for r in rows[1:] if r["nfe"] == args.spacing_nfe), key=lambda r: r["fid"],
               default=None)
    if best is not None:
        for spacing in SPACINGS:
            if spacing != args.spacing:
                rows.append(run(ckpt, args.n, best["sampler"], args.spacing_nfe, spacing,
                                args.cache_dir))

    ref = rows[0]
    print("\n| sampler | NFE | spacing | FID | KID | recognisable | ms/image |\n"
          "| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        rec = f"{r['recognisable']:.1%}" if "recognisable" in r else "-"
        print(f"| {r['sampler']} | {r['nfe']} | {r['spacing']} | {r['fid']:.2f} | "
              f"{r['kid']:.2f} +- {r['kid_std']:.2f} | {rec} | {r['ms_per_image']:.1f} |")
    within = [r for r in rows[1:] if r["nfe"] <= 15 and r["fid"] <= 1.1 * ref["fid"]]
    print(f"\nreference {ref['sampler']} at {ref['nfe']} NFE: FID {ref['fid']:.2f}; within 10% "
          "at <= 15 NFE: " + (", ".join(f"{r['sampler']}@{r['nfe']} ({r['spacing']}) "
                                        f"{r['fid']:.2f}" for r in within) or "none"))
    out.write_text(json.dumps({"checkpoint": args.checkpoint, "step": ckpt.step, "rows": rows},
                              indent=1) + "\n")
    fig, ax = plt.subplots(figsize=(6, 4))
    for sampler in samplers:
        pts = [(r["nfe"], r["fid"]) for r in rows[1:]
               if r["sampler"] == sampler and r["spacing"] == args.spacing]
        ax.plot(*zip(*pts), marker="o", label=sampler)
    ax.axhline(ref["fid"], color="grey", ls="--",
               label=f"{ref['sampler']}, {ref['nfe']} NFE")
    ax.axhline(1.1 * ref["fid"], color="grey", ls=":", label="+10%")
    space = "digit classifier" if ckpt.config.data.dataset == "mnist" else "Inception"
    ax.set(xscale="log", yscale="log", xlabel="network calls per image (NFE)",
           ylabel=f"FID ({space} features, n={args.n})",
           title=f"{Path(args.checkpoint).parent.name}: FID vs NFE")
    ax.legend()
    fig.tight_layout()
    fig.savefig(plot, dpi=120)
    print(f"-> {out}, {plot}")


if __name__ == "__main__":
    main()
