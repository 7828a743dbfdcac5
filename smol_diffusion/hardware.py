"""Which device to run on, and which autocast precision pays off there."""
from __future__ import annotations

import contextlib
import datetime
import os
import warnings
from collections.abc import Callable

import torch
import torch.distributed as dist

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}  # autocast's dtype
PRECISIONS = ("auto", *DTYPES)  # see resolve_precision


def pick_device(name: str = "auto") -> torch.device:
    """`auto` picks cuda, then mps, then cpu; any other name is passed to torch.device."""
    if name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError:
            raise ValueError(f"unknown device {name!r}; use 'auto', 'cpu', 'cuda', 'cuda:N' "
                             "or 'mps'") from None
        if (device.type == "cuda" and not torch.cuda.is_available()
                or device.type == "mps" and not torch.backends.mps.is_available()):
            raise ValueError(f"device {name!r} was asked for, but {device.type.upper()} is not "
                             "available here; use device 'auto' or 'cpu' (--device)")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def distributed_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) in a plain process."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def resolve_precision(precision: str, device: torch.device) -> str:
    """What `precision` ("auto", "bf16", "fp16" or "fp32") means on `device`: "bf16", "fp16"
    or "fp32" (`DTYPES` gives each one's autocast dtype).

    "auto" is bf16 on CUDA GPUs with native bf16 (compute capability >= 8.0: A100, RTX 30xx
    and later, H100) and fp16 on older ones (T4, V100, P100), whose tensor cores, where they
    have any, take fp16 only; fp16 needs loss scaling in training (`grad_scaler`). It is not
    `torch.cuda.is_bf16_supported()`: by default that answers True wherever a bf16 tensor can
    be made, emulated included, so a T4 would get bf16 without bf16 hardware. ROCm GPUs get
    bf16 (AMD's Instinct GPUs have it). On CPUs "auto" is bf16 only where oneDNN has native
    bf16 kernels (AVX512-BF16 or AMX); elsewhere PyTorch falls back to reference kernels many
    times slower than fp32 (docs/speed.md). fp32 on MPS. An explicit fp16 on a CPU warns: it
    runs the slow reference kernels everywhere.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if precision == "fp16" and device.type == "cpu":
        warnings.warn("fp16 on a CPU runs PyTorch's slow reference kernels (tens of times slower "
                      "than fp32): it is for older GPUs; use precision 'auto' or 'fp32' here",
                      stacklevel=3)
    if precision != "auto":
        return precision
    if device.type == "cuda":
        if torch.version.hip:
            return "bf16"
        return "bf16" if torch.cuda.get_device_capability(device) >= (8, 0) else "fp16"
    if device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "bf16"
    return "fp32"


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype `precision` means on `device` (`resolve_precision`): torch.bfloat16,
    torch.float16, or None for fp32."""
    return DTYPES[resolve_precision(precision, device)]


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to `dtype` on `device`, or a no-op context for None (fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def setup_device(name: str, world: int, local_rank: int) -> tuple[torch.device, bool]:
    """The device this process trains on (`pick_device(name)`; under torchrun on CUDA, the
    GPU of its local rank), with TF32 and cuDNN autotuning on for CUDA; and whether this call
    started the process group (NCCL on CUDA, gloo elsewhere), so the caller ends it."""
    device, own_group = pick_device(name), False
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        own_group = not dist.is_initialized()
        if own_group:  # generous: the others wait while rank 0 builds the cache or evaluates
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                    timeout=datetime.timedelta(minutes=60))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # the shapes repeat: time cuDNN's algorithms once
    return device, own_group


def grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """A loss scaler for fp16 training (Micikevicius et al. 2018), disabled otherwise.

    fp16 keeps 5 exponent bits, so small gradients underflow to zero; the loss is multiplied by
    a scale before the backward pass and the gradients divided by it before the step. A step
    whose scaled gradients overflow is skipped and the scale halved; after 2,000 steps without
    one it doubles. bf16 has fp32's exponent range and needs none of this."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def compile_model(model: torch.nn.Module, enabled: bool, device: torch.device) -> Callable:
    """`model` (on `device`) through `torch.compile` when `enabled`, else `model` itself.

    torch.compile needs a working compiler toolchain and a supported Python; where it cannot
    work, the failure shows at the first call. Then this warns, says why, and runs the model
    eagerly from then on, so training goes on. Errors after a successful first call are raised.
    The first call compiles the backward graph too (AOTAutograd otherwise leaves that to the
    first backward pass, beyond this fallback's reach).

    On CUDA this asks inductor to lay out the convolutions of every compiled graph
    channels_last. By itself it does so only in graphs holding forward convolutions, so the
    backward graph ran its convolutions NCHW on the forward's channels_last activations
    (pytorch/pytorch#189239), converting layouts at every one; forcing it removes those copies
    (measured in docs/speed.md). On ROCm inductor keeps it off.
    """
    if not enabled:
        return model
    if not torch._dynamo.is_dynamo_supported():
        warnings.warn("torch.compile is not supported with this Python or platform; "
                      "training without it (set compile=False to silence this)", stacklevel=2)
        return model
    force = (device.type == "cuda"
             and hasattr(torch._inductor.config, "force_layout_optimization"))
    options = {"force_layout_optimization": True} if force else None
    state = {"fn": torch.compile(model, options=options), "tried": False}
    config = torch._functorch.config
    backward_now = (config.patch(force_non_lazy_backward_lowering=True)
                    if hasattr(config, "force_non_lazy_backward_lowering")
                    else contextlib.nullcontext())

    def forward(*args, **kwargs):
        if state["tried"]:
            return state["fn"](*args, **kwargs)
        try:
            with backward_now:
                out = state["fn"](*args, **kwargs)
        except Exception as e:  # the compiler's many failure types: a toolchain, a Python
            torch._dynamo.reset()
            warnings.warn(f"torch.compile failed ({type(e).__name__}: {str(e)[:300]}); "
                          "training without it (set compile=False to silence this)",
                          stacklevel=2)
            state["fn"] = model
            out = model(*args, **kwargs)
        state["tried"] = True
        return out

    return forward
