"""Which device to run on, and whether bf16 autocast pays off there."""
from __future__ import annotations

import contextlib

import torch


def pick_device(name: str = "auto") -> torch.device:
    """`auto` picks cuda, then mps, then cpu; any other name is passed to torch.device."""
    if name != "auto":
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {name!r} was asked for, but CUDA is not available here; "
                             "use device='auto' or 'cpu'")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def use_bf16(precision: str, device: torch.device) -> bool:
    """Resolve `precision` ("bf16", "fp32" or "auto") to whether bf16 autocast is used.

    "auto" means bf16 on CUDA devices that support it, and on CPUs only where oneDNN has native
    bf16 kernels (AVX512-BF16 or AMX). Elsewhere PyTorch falls back to slow reference kernels:
    on the 2-core AVX2 machine this repo is tested on, a bf16 training step of the demo UNet
    was 10x slower than fp32. fp32 on MPS.
    """
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision must be 'auto', 'bf16' or 'fp32', got {precision!r}")
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on `device` when `bf16`, otherwise a no-op context."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
