"""The colour frontier: recipes for a folder of colour images trained to one time budget on
this machine's cores, then scored with the metrics that need no network.

    python benchmarks/colour_frontier.py --budget 600 --root data/icons32 --n 400 \
        --row "preset=" --row "16 ch=--channels 16" [--json FILE] [--grids FOLDER]

Each row is NAME=ARGS: `smol-diffusion train --preset icons32 --root ROOT ARGS` (any training
fields), in fp32 unless ARGS set --precision (a laptop has no native bf16), on every core.
For each row, one job at a time:
1. the fp32 matmul peak (GFLOP/s) on every core, measured just before the row;
2. a calibration run of `--calib-steps` steps, which gives how many steps fit the budget
   (demo_frontier.steps_for_budget; `--steps` in ARGS is replaced);
3. the run itself, timed from the command's start to its exit: wall time and median img/s;
   its final sample grid is copied into `--grids` as NAME.png;
4. `smol-diffusion evaluate --metrics swd,copies` at n samples (not part of the budget): the
   sliced Wasserstein distance to the held-out images, level by level, beside the real floor,
   and the share of samples that are near-copies of training images.
Prints a table with each row's command; `--json` keeps every number, after every row.
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_frontier import ROOT, steps_for_budget, train, without_steps  # noqa: E402
from train_throughput import matmul_peak  # noqa: E402

PRESET = "icons32"


def evaluate(checkpoint: Path, n: int) -> dict:
    """The swd and copies rows of `smol-diffusion evaluate` at n samples, by metric."""
    out = checkpoint.with_name("eval.json")
    r = subprocess.run([sys.executable, "-m", "smol_diffusion", "evaluate", "--checkpoint",
                        str(checkpoint), "--n", str(n), "--metrics", "swd,copies", "--out",
                        str(out)], cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"evaluation failed for {checkpoint}:\n{r.stderr[-3000:]}")
    return {row["metric"]: row for row in json.loads(out.read_text())["results"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--row", action="append", required=True,
                        help='NAME=ARGS, e.g. "16 ch=--channels 16 --lr 4e-3"')
    parser.add_argument("--root", default="data/icons32", help="the image folder")
    parser.add_argument("--budget", type=float, default=600.0, help="seconds, start to grid")
    parser.add_argument("--calib-steps", type=int, default=40)
    parser.add_argument("--n", type=int, default=400, help="samples scored")
    parser.add_argument("--json", default=None)
    parser.add_argument("--grids", default=None, help="folder for each row's final grid")
    parser.add_argument("--runs", default=None,
                        help="keep each row's run folder (checkpoint, grids, eval.json) here")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, spec in enumerate(args.row):
            name, _, text = spec.partition("=")
            slug = re.sub(r"[^A-Za-z0-9]+", "_", name)
            row_args = without_steps(["--precision", "fp32", "--root", args.root,
                                      *shlex.split(text)])
            peak = matmul_peak(torch.device("cpu"), torch.float32)
            out = Path(args.runs or tmp) / (slug if args.runs else f"row{i}")
            steps = steps_for_budget(row_args, args.budget, args.calib_steps, out,
                                     preset=PRESET)
            command = shlex.join(["smol-diffusion", "train", "--preset", PRESET, *row_args,
                                  "--steps", str(steps)])
            wall, rate, cfg = train([*row_args, "--steps", str(steps)], out, preset=PRESET)
            if args.grids:
                Path(args.grids).mkdir(parents=True, exist_ok=True)
                grid = max(out.glob("samples_*.png"))  # the final grid
                shutil.copy(grid, Path(args.grids) / f"{slug}.png")
            scores = evaluate(out / "ckpt.pt", args.n)
            swd, found = scores["swd"], scores["copies"]
            row = {"name": name, "steps": steps, "wall_s": round(wall, 1),
                   "img_per_s": round(rate, 1), "swd": swd["value"], "swd_levels": swd["levels"],
                   "swd_floor": swd["floor"], "swd_floor_levels": swd["floor_levels"],
                   "swd_n": swd["swd_n"], "copies": found["value"],
                   "copies_real": found["real_share"], "copy_threshold": found["threshold"],
                   "median_distance": found["median"], "real_median_distance": found["real_median"],
                   "peak_gflops": round(peak, 1), "command": command}
            results.append(row)
            levels = ", ".join(f"{s} px {v:.0f}" for s, v in swd["levels"].items())
            print(f"{name:20s} {steps:5d} steps {wall:6.0f}s {rate:6.1f} img/s  swd "
                  f"{swd['value']:.0f} (real {swd['floor']:.0f}; {levels})  copies "
                  f"{found['value']:.1%} (real {found['real_share']:.1%})  peak {peak:.0f} "
                  f"GFLOP/s\n    {command}", flush=True)
            if args.json:  # after every row: a long search keeps what it has
                Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
