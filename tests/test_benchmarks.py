"""The benchmark scripts' own logic (their timings are never asserted)."""
import sys
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

import smol_diffusion as sd
from smol_diffusion.unet import Attention

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # the scripts import each other as they do when run
import demo_frontier  # noqa: E402
import layout_cpu  # noqa: E402
import train_throughput  # noqa: E402


def test_copies_are_charged_to_the_op_that_asked_for_them():
    """A reshape of a transposed tensor copies through clone -> copy_: the copy is charged to
    the reshape, past the copy ops in between, with the copied tensor's shape."""
    x = torch.randn(256, 512)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        x.t().reshape(-1)
        x.t().contiguous()
    found = {(op, shape): sec for op, shape, sec in
             train_throughput.copy_sources(prof.events(), on_cuda=False)}
    assert set(found) == {("aten::reshape", "[512, 256]"), ("(top level)", "[512, 256]")}


def test_layout_cpu_times_every_convolution_and_group_norm_the_network_runs():
    """The layers layout_cpu.py times are those a forward pass runs: its convolutions' FLOPs
    add up to what torch's FLOP counter counts for them, and every GroupNorm is there."""
    found = layout_cpu.layers("demo", 2)
    cfg = sd.get_preset("demo").model
    model = sd.UNet(cfg)
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(2, 1, cfg.image_size, cfg.image_size), torch.zeros(2, dtype=torch.long))
    conv_flops = counter.get_flop_counts()["Global"][torch.ops.aten.convolution]
    assert sum(f for m, _, f in found if isinstance(m, nn.Conv2d)) == conv_flops
    assert sum(isinstance(m, nn.GroupNorm) for m, _, _ in found) == \
        sum(isinstance(m, nn.GroupNorm) for m in model.modules())


def test_attention_flops_count_on_the_cpu_as_on_cuda():
    """The benchmark's FLOP count includes SDPA's CPU kernel, with the formulas torch uses for
    its CUDA kernels (forward: two matmuls; backward: five, scores recomputed); torch alone
    counts it as 0 on a CPU."""
    attn, x = Attention(64, 4), torch.randn(2, 64, 8, 8)
    per_image = train_throughput.flops_per_image(attn, 2, (64, 8, 8), torch.device("cpu"),
                                                 call=lambda x, t: attn(x))
    with FlopCounterMode(display=False) as counter:  # everything but attention's core
        attn(x.requires_grad_()).pow(2).mean().backward()
    counts = counter.get_flop_counts()["Global"]
    rest = sum(v for op, v in counts.items() if "scaled_dot_product" not in str(op))
    q = (2, 4, 64, 16)  # (B, heads, H*W, C/heads)
    core = flop_counter.sdpa_flop_count(q, q, q) + flop_counter.sdpa_backward_flop_count(q, q, q, q)
    assert per_image * 2 == rest + core


def test_the_frontier_budget_sets_the_step_count_whatever_a_row_says():
    row = ["--image_size", "28", "--steps", "50", "--lr", "1e-3", "--steps=9"]
    assert demo_frontier.without_steps(row) == ["--image_size", "28", "--lr", "1e-3"]
