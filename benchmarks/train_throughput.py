"""Training throughput of the presets' models, fp32 against bf16 autocast, side by side.

    python benchmarks/train_throughput.py [--models demo,cars64] [--repeats 3]
                                          [--variants fp32,bf16,fp32+cl,bf16+cl]

One training step is forward, backward and AdamW on random images at the preset's resolution.
Prints img/s (median of the timed steps after a warm-up step) and achieved GFLOP/s, counted
with torch.utils.flop_counter, for each model and precision, plus the bf16/fp32 ratio.
"""
from __future__ import annotations

import argparse
import sys
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script
import smol_diffusion as sd  # noqa: E402
from smol_diffusion.diffusion import simple_loss  # noqa: E402
from smol_diffusion.hardware import autocast, pick_device  # noqa: E402

# CPU batches are small so a bf16 step on a CPU without native bf16 still ends in minutes.
CPU_BATCH = {"demo": 64, "cars64": 2}


def step_fn(model, opt, schedule, x, device, bf16):
    def step() -> None:
        with autocast(device, bf16):
            loss = simple_loss(model, schedule, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def measure(preset: str, variant: str, repeats: int, device: torch.device) -> dict:
    """img/s and GFLOP/s of one model in one variant: "fp32" or "bf16" (autocast), with
    "+cl" for channels_last weights and inputs."""
    bf16, channels_last = variant.startswith("bf16"), variant.endswith("+cl")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    torch.manual_seed(0)
    m = sd.get_preset(preset).model
    batch = CPU_BATCH[preset] if device.type == "cpu" else 64
    model = sd.UNet(m).to(device, memory_format=fmt)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    schedule = sd.NoiseSchedule.linear(1000)
    x = torch.randn(batch, m.in_channels, m.image_size, m.image_size, device=device)
    x = x.contiguous(memory_format=fmt)
    step = step_fn(model, opt, schedule, x, device, bf16)
    with FlopCounterMode(display=False) as counter:
        step()  # also the warm-up step
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    return {"batch": batch, "img_s": batch / t, "gflops": counter.get_total_flops() / t / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="demo,cars64")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--variants", default="fp32,bf16",
                        help="comma-separated: fp32, bf16, fp32+cl, bf16+cl (cl: channels_last)")
    args = parser.parse_args()
    device = pick_device(args.device)
    print(f"torch {torch.__version__} on {device}, {torch.get_num_threads()} threads")
    print(f"{'model':8s} {'variant':9s} {'batch':>5s} {'img/s':>8s} {'GFLOP/s':>8s} "
          f"{'vs fp32':>7s}")
    for preset in args.models.split(","):
        fp32 = measure(preset, "fp32", args.repeats, device)
        for name in args.variants.split(","):
            r = fp32 if name == "fp32" else measure(preset, name, args.repeats, device)
            print(f"{preset:8s} {name:9s} {r['batch']:5d} {r['img_s']:8.2f} {r['gflops']:8.1f} "
                  f"{r['img_s'] / fp32['img_s']:7.2f}", flush=True)


if __name__ == "__main__":
    main()
