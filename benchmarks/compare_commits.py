"""The same training command at two commits, interleaved, on this machine: wall time and img/s.

    python benchmarks/compare_commits.py --before 9941140 --after HEAD --rounds 3
    python benchmarks/compare_commits.py --before A --after B -- --preset demo --steps 500

Each commit is checked out in a temporary git worktree and the command (default: the README's
demo, `--preset demo`) runs there as `python -m smol_diffusion train ARGS --out_dir TMP`
(`python -m smol_diffusion.train` at commits before the one command line),
alternating the order each round (A B, B A, ...) so that drift of a shared, noisy machine
falls on both. Per run: the wall time the command reports ("done: N steps in Ts") and the
median img/s of its loss readings after the first (which holds the start-up). Prints each
run, then the medians and their ratio after/before.
"""
from __future__ import annotations

import argparse
import platform
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def run(worktree: Path, args: list[str], out_dir: Path) -> tuple[float, float]:
    """(wall seconds, median img/s) of one training run in `worktree`."""
    command = (["smol_diffusion", "train"] if (worktree / "smol_diffusion" / "__main__.py").exists()
               else ["smol_diffusion.train"])
    r = subprocess.run([sys.executable, "-m", *command, *args,
                        "--out_dir", str(out_dir)], cwd=worktree, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"the run in {worktree} failed:\n{r.stderr[-3000:]}")
    seconds = float(re.search(r"done: \d+ steps in (\d+)s", r.stdout).group(1))
    rates = torch.load(out_dir / "ckpt.pt", weights_only=True)["history"]["img_per_s"]
    return seconds, statistics.median(rates[1:] or rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", required=True, help="a commit (the baseline)")
    parser.add_argument("--after", default="HEAD", help="a commit (the change)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("train_args", nargs="*", default=["--preset", "demo"],
                        help="after --: the training command's arguments")
    args = parser.parse_args()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor()) \
        if Path("/proc/cpuinfo").exists() else platform.processor()
    print(f"machine: {cpu}, torch {torch.__version__}; command: python -m smol_diffusion train "
          f"{' '.join(args.train_args)}")
    results = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        trees = {}
        for name in ("before", "after"):
            rev = subprocess.run(["git", "rev-parse", "--short", getattr(args, name)], cwd=ROOT,
                                 capture_output=True, text=True, check=True).stdout.strip()
            trees[name] = tmp / name
            subprocess.run(["git", "worktree", "add", "--detach", str(trees[name]), rev],
                           cwd=ROOT, capture_output=True, check=True)
            print(f"{name}: {rev}")
        try:
            for i in range(args.rounds):
                for name in (("before", "after") if i % 2 == 0 else ("after", "before")):
                    seconds, rate = run(trees[name], args.train_args, tmp / f"out_{name}_{i}")
                    results[name].append((seconds, rate))
                    print(f"round {i + 1} {name:>6}: {seconds:5.0f} s, {rate:7.1f} img/s",
                          flush=True)
        finally:
            for tree in trees.values():
                subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT,
                               capture_output=True)
    med = {k: (statistics.median(s for s, _ in v), statistics.median(r for _, r in v))
           for k, v in results.items()}
    for k, (s, r) in med.items():
        print(f"median {k:>6}: {s:5.0f} s, {r:7.1f} img/s")
    print(f"after / before: wall time {med['after'][0] / med['before'][0]:.3f}, img/s "
          f"{med['after'][1] / med['before'][1]:.3f}")


if __name__ == "__main__":
    main()
