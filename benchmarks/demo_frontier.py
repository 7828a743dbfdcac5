"""The demo's frontier: digit recipes trained to one time budget, then scored.

    python benchmarks/demo_frontier.py --budget 300 --threads 1 --n 2000 \
        --row "16px preset=" --row "28px=--image_size 28" [--json FILE]

Each row is NAME=ARGS: `smol-diffusion train --preset demo ARGS` (any training fields), in fp32
unless ARGS set --precision (the slow laptops the demo is for have no native bf16). For each
row, one job at a time:
1. the fp32 matmul peak (GFLOP/s) on `--threads` threads, measured just before the row;
2. a calibration run of `--calib-steps` steps: the seconds a step takes (from the median img/s
   of its loss readings after the first) and the rest of the command's wall time (start-up,
   the final sample grid, the checkpoint);
3. the run itself, with as many steps as fit the budget (`--steps` in ARGS is replaced), timed
   from the command's start to its exit: wall time and median img/s. With `--as-is`, steps 2
   and 3 become one run with the row's own steps (the preset's, unless ARGS give --steps);
4. `smol-diffusion evaluate` (on every core: it is not part of the budget) with the digits
   extractor at n samples: the share recognisable and FID (a conditional model is asked for
   each digit in turn, and the share drawn as the digit asked for is its class match); once
   per resolution, the same for n real digits (`--real`): the floor.
Training runs on `--threads` threads (OMP_NUM_THREADS): one thread of a fast machine stands in
for a slower 2-core one (docs/presets.md says how well).
Prints a table with each row's command; `--json` keeps every number.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import matmul_peak  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TRAIN = [sys.executable, "-m", "smol_diffusion", "train", "--preset"]


def without_steps(args: list[str]) -> list[str]:
    """ARGS with any --steps N removed (the budget sets it)."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == "--steps":
            skip = True
        elif not a.startswith("--steps="):
            out.append(a)
    return out


def train(args: list[str], out_dir: Path, threads: int | None = None,
          preset: str = "demo") -> tuple[float, float, dict]:
    """`smol-diffusion train --preset PRESET ARGS` into out_dir: (wall seconds, median img/s
    after the first reading, the checkpoint's config)."""
    env = os.environ | ({"OMP_NUM_THREADS": str(threads)} if threads else {})
    t0 = time.perf_counter()
    r = subprocess.run([*TRAIN, preset, *args, "--out_dir", str(out_dir), "--overwrite", "true"],
                       cwd=ROOT, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(f"training failed: {shlex.join(args)}\n{r.stderr[-3000:]}")
    state = torch.load(out_dir / "ckpt.pt", weights_only=True, map_location="cpu")
    rates = state["history"]["img_per_s"]
    return wall, statistics.median(rates[1:] or rates), state["config"]


def steps_for_budget(args: list[str], budget: float, calib_steps: int, out_dir: Path,
                     threads: int | None = None, preset: str = "demo") -> int:
    """How many steps of `train --preset PRESET ARGS` fit `budget` seconds from the command's
    start to its exit: a calibration run of calib_steps steps gives the seconds a step takes
    (its median img/s after the first reading) and the rest of its wall time (start-up, the
    final grid, the checkpoint)."""
    wall, rate, cfg = train([*args, "--steps", str(calib_steps), "--log_every", "10"], out_dir,
                            threads, preset)
    step = cfg["train"]["batch_size"] / rate
    fixed = max(0.0, wall - calib_steps * step)
    return max(1, math.floor((budget - fixed) / step))


def evaluate(checkpoint: Path, n: int, real: bool, conditional: bool) -> dict:
    """{metric: value} of `smol-diffusion evaluate` with the digits extractor. A conditional
    model is asked for each digit in turn, at guidance 1 (its plain conditional samples, as in
    its training grid)."""
    out = checkpoint.with_name("real.json" if real else "eval.json")
    extra = ["--real"] if real else ["--guidance", "1"] if conditional else []
    metrics = "fid,recognisable" + (",class_match" if conditional and not real else "")
    r = subprocess.run([sys.executable, "-m", "smol_diffusion", "evaluate", "--checkpoint",
                        str(checkpoint), "--n", str(n), "--metrics", metrics,
                        "--extractor", "digits", "--out", str(out), *extra],
                       cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"evaluation failed for {checkpoint}:\n{r.stderr[-3000:]}")
    return {row["metric"]: row["value"] for row in json.loads(out.read_text())["results"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--row", action="append", required=True,
                        help='NAME=ARGS, e.g. "28px v=--image_size 28 --prediction v"')
    parser.add_argument("--budget", type=float, default=300.0, help="seconds, start to grid")
    parser.add_argument("--threads", type=int, default=None,
                        help="training threads (default: all cores)")
    parser.add_argument("--calib-steps", type=int, default=150)
    parser.add_argument("--as-is", action="store_true",
                        help="no calibration: each row runs with its own steps (the preset's "
                             "unless ARGS give --steps), to time a preset as a user runs it")
    parser.add_argument("--n", type=int, default=2000, help="samples (and real digits) scored")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    results, floors = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, spec in enumerate(args.row):
            name, _, text = spec.partition("=")
            # fp32 unless the row says otherwise: the reference machine has no native bf16
            row_args = ["--precision", "fp32", *shlex.split(text)]
            if not args.as_is:
                row_args = without_steps(row_args)
            if args.threads:
                torch.set_num_threads(args.threads)
            peak = matmul_peak(torch.device("cpu"), torch.float32)
            out = Path(tmp) / f"row{i}"
            budget = [] if args.as_is else ["--steps", str(steps_for_budget(
                row_args, args.budget, args.calib_steps, out, args.threads))]
            command = shlex.join(["smol-diffusion", "train", "--preset", "demo", *row_args,
                                  *budget])
            wall, rate, cfg = train([*row_args, *budget], out, args.threads)
            steps = cfg["train"]["steps"]
            conditional = bool(cfg["model"]["num_classes"])
            scores = evaluate(out / "ckpt.pt", args.n, real=False, conditional=conditional)
            size = cfg["model"]["image_size"]
            if size not in floors:
                floors[size] = evaluate(out / "ckpt.pt", args.n, real=True, conditional=False)
            row = {"name": name, "image_size": size, "conditional": conditional,
                   "steps": steps, "wall_s": round(wall, 1),
                   "threads": args.threads, "img_per_s": round(rate, 1),
                   "recognisable": scores["recognisable"], "fid": scores["fid"],
                   "real_recognisable": floors[size]["recognisable"],
                   "class_match": scores.get("class_match"),
                   "real_fid": floors[size]["fid"], "peak_gflops": round(peak, 1),
                   "command": command}
            results.append(row)
            print(f"{name:24s} {size:3d}px {steps:5d} steps {wall:6.1f}s  {rate:6.0f} img/s  "
                  f"recognisable "
                  f"{row['recognisable']:.1%} (real {row['real_recognisable']:.1%})  FID "
                  f"{row['fid']:.2f} (real {row['real_fid']:.2f})  peak {peak:.0f} GFLOP/s"
                  + (f"  class match {row['class_match']:.1%}" if conditional else "")
                  + f"\n    {command}", flush=True)
            if args.json:  # after every row: a long search keeps what it has
                Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
