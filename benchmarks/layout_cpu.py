"""Where a CPU training step's time goes in each memory layout: convolutions pass by pass,
and GroupNorm.

    python benchmarks/layout_cpu.py [--models demo,cars64]

Convolutions take 70-90% of a CPU training step, GroupNorm most of the rest
(train_throughput.py --profile). For every convolution and GroupNorm in a preset's UNet (its
shape recorded by a forward hook, at the CPU batch train_throughput.py uses), this times each
alone, in NCHW and in channels_last: a convolution's three passes (the forward, the gradient
of the input, the gradient of the weights with the bias's), as GFLOP/s summed over the
network against the fp32 matmul peak measured in the same run; GroupNorm's forward and
backward together, as ms a step. Each time is the median of several.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script
import smol_diffusion as sd  # noqa: E402
from train_throughput import PLAN, machine, matmul_peak, median_seconds  # noqa: E402

PASSES = {"forward": None, "input grad": [True, False, False], "weight grad": [False, True, True]}
LAYOUTS = {"NCHW": torch.contiguous_format, "channels_last": torch.channels_last}


def layers(preset: str, batch: int) -> list[tuple[nn.Module, tuple, float]]:
    """(module, input shape, FLOPs of one pass) of every convolution and GroupNorm that one
    forward pass runs, in order (the FLOPs of a GroupNorm are 0)."""
    cfg = sd.get_preset(preset).model
    model, seen = sd.UNet(cfg), []

    def record(m, inputs, out):
        flops = 2 * out.numel() * m.weight[0].numel() if isinstance(m, nn.Conv2d) else 0
        seen.append((m, tuple(inputs[0].shape), flops))
    hooks = [m.register_forward_hook(record) for m in model.modules()
             if isinstance(m, (nn.Conv2d, nn.GroupNorm))]
    with torch.no_grad():
        model(torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size),
              torch.zeros(batch, dtype=torch.long))
    for h in hooks:
        h.remove()
    return seen


def conv_passes(conv: nn.Conv2d, x_shape: tuple, layout: torch.memory_format,
                input_grad: bool) -> dict[str, float]:
    """Seconds of each pass of one convolution (training skips the input gradient of the
    first, whose input is the image)."""
    x = torch.randn(x_shape).to(memory_format=layout)
    w, b = conv.weight.detach().to(memory_format=layout), conv.bias.detach()
    g = torch.randn_like(nn.functional.conv2d(x, w, b, conv.stride, conv.padding))
    out = {"forward": median_seconds(
        lambda: nn.functional.conv2d(x, w, b, conv.stride, conv.padding))}
    for name, mask in PASSES.items():
        if mask and (input_grad or name != "input grad"):
            out[name] = median_seconds(lambda: torch.ops.aten.convolution_backward(
                g, x, w, [w.shape[0]], list(conv.stride), list(conv.padding), [1, 1], False,
                [0, 0], 1, mask))
    return out


def group_norm_seconds(norm: nn.GroupNorm, x_shape: tuple, layout: torch.memory_format) -> float:
    """Seconds of one GroupNorm's forward and backward."""
    x = torch.randn(x_shape).to(memory_format=layout).requires_grad_()
    g = torch.randn_like(norm(x))
    return median_seconds(lambda: torch.autograd.grad(norm(x), [x, *norm.parameters()], g))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="demo,cars64")
    args = parser.parse_args()
    peak = matmul_peak(torch.device("cpu"), torch.float32)
    print(f"{machine(torch.device('cpu'))}; torch {torch.__version__}; "
          f"{time.strftime('%Y-%m-%d')}\nmeasured fp32 matmul peak: {peak:.0f} GFLOP/s\n")
    print(f"{'model':7s} {'batch':>5s} {'layout':14s} {'op':23s} {'GFLOP/s':>8s} {'% peak':>6s} "
          f"{'ms a step':>9s}")
    for preset in args.models.split(","):
        batch = PLAN["cpu"][preset][0]
        found = layers(preset, batch)
        convs = [(m, shape, f) for m, shape, f in found if isinstance(m, nn.Conv2d)]
        for label, layout in LAYOUTS.items():
            total = dict.fromkeys(PASSES, 0.0)
            for i, (conv, shape, _) in enumerate(convs):
                for name, sec in conv_passes(conv, shape, layout, input_grad=i > 0).items():
                    total[name] += sec
            for name, sec in total.items():
                flops = sum(f for i, (_, _, f) in enumerate(convs)
                            if i > 0 or name != "input grad")
                print(f"{preset:7s} {batch:5d} {label:14s} {'conv ' + name:23s} "
                      f"{flops / sec / 1e9:8.0f} {flops / sec / 1e9 / peak:6.0%} "
                      f"{sec * 1e3:9.1f}", flush=True)
            norms = sum(group_norm_seconds(m, shape, layout) for m, shape, _ in found
                        if isinstance(m, nn.GroupNorm))
            print(f"{preset:7s} {batch:5d} {label:14s} {'GroupNorm fwd + bwd':23s} {'':8s} "
                  f"{'':6s} {norms * 1e3:9.1f}", flush=True)


if __name__ == "__main__":
    main()
