"""One prepared check for a lent CUDA GPU (run through benchmarks/gpu_check.sh).

1. Training, sampling, checkpointing and resuming run on CUDA: the cars64 model on synthetic
   64x64 images written to a temporary folder (the real image-folder loading path and image
   cache), 300 steps in bf16 with torch.compile, then a resume; the UNet's attention runs on
   SDPA's flash or memory-efficient kernels (the math path is refused).
2. Every sampler and the evaluation run on CUDA with that checkpoint: ms per 64x64 image at
   20 NFE in bf16, FID/KID through the FID Inception (random weights in pytorch-fid's layout,
   since none can be downloaded: the code path and its speed, not a real FID) and bits/dim.
gpu_check.sh then runs train_throughput.py for cars64 (img/s, MFU, peak memory).

    python benchmarks/gpu_check.py [--parts e2e,sampling]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import smol_diffusion as sd  # noqa: E402
from smol_diffusion.evaluate import evaluate, format_table  # noqa: E402
from smol_diffusion.features import FIDInception, inception_extractor  # noqa: E402
from smol_diffusion.samplers import SAMPLERS  # noqa: E402
from smol_diffusion.unet import Attention  # noqa: E402
from train_throughput import sync, synthetic_images  # noqa: E402  (this folder)


def check_end_to_end(root: Path) -> None:
    """Train, sample, checkpoint and resume cars64 on CUDA with synthetic images."""
    folder = synthetic_images(root / "images", 512, 64)
    cfg = sd.get_preset("cars64").override(
        dataset="folder", root=str(folder), cache_dir=str(root / "cache"), precision="bf16",
        compile=True, steps=300, warmup=50, log_every=50,
        sample_every=150, sample_n=16, sample_steps=25, checkpoint_every=150,
        out_dir=str(root / "run"))
    t0 = time.time()
    hist = sd.train(cfg, progress=False)
    print(f"[e2e] 300 steps, bf16 + compile, in {time.time() - t0:.1f}s; loss "
          f"{hist['loss'][0]:.4f} -> {hist['loss'][-1]:.4f}; loop img/s (incl. data loading) "
          f"{[round(r) for r in hist['img_per_s']]}")
    hist = sd.train(cfg.override(steps=320, resume=str(root / "run" / "ckpt.pt")), progress=False)
    ckpt = sd.load_checkpoint(root / "run" / "ckpt.pt")
    x = ckpt.sample(8, generator=torch.Generator().manual_seed(0), steps=25)
    print(f"[e2e] resumed to step {ckpt.step}; sample {tuple(x.shape)} on {x.device}, "
          f"range [{x.min():.2f}, {x.max():.2f}], finite {bool(torch.isfinite(x).all())}; "
          f"files {sorted(p.name for p in (root / 'run').iterdir())}")


def check_attention(device: torch.device) -> None:
    """The UNet's attention (cars64's 256 channels, 4 heads, at 16x16) runs forward and backward
    in bf16 with SDPA limited to its fused kernels: an error here means the math fallback."""
    attn = Attention(256, 4).to(device)
    x = torch.randn(64, 256, 16, 16, device=device, requires_grad=True)
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        try:
            with sdpa_kernel(backend), torch.autocast(device.type, torch.bfloat16):
                attn(x).float().square().mean().backward()
            print(f"[attention] {backend.name}: forward and backward ran")
        except RuntimeError as e:
            print(f"[attention] {backend.name}: refused ({str(e).splitlines()[0]})")


def check_sampling_and_evaluation(root: Path, n: int = 256) -> None:
    """Each sampler's speed, and FID/KID/bits-dim, with the end-to-end checkpoint (on CUDA)."""
    ckpt = sd.load_checkpoint(root / "run" / "ckpt.pt")
    device = next(ckpt.model.parameters()).device
    for name in SAMPLERS:
        for precision in ("fp32", "bf16", "fp16"):
            gen = torch.Generator().manual_seed(0)
            # warm-up at the timed batch size: cuDNN picks its algorithms for each new shape
            ckpt.sample(n, sampler=name, steps=2, generator=gen, precision=precision)
            sync(device)
            t0 = time.perf_counter()
            x = ckpt.sample(n, sampler=name, steps=20, generator=gen, precision=precision)
            sync(device)
            ms = 1000 * (time.perf_counter() - t0) / n
            print(f"[sampling] {name:>8} 20 NFE, batch {n}, {precision}: "
                  f"{ms:.2f} ms/image (50,000 for FID: {50_000 * ms / 60_000:.1f} min); "
                  f"finite {bool(torch.isfinite(x).all())}")
    torch.manual_seed(0)
    weights = root / "inception.pth"
    torch.save(FIDInception().state_dict(), weights)
    ext = inception_extractor(weights, device)
    images = torch.rand(2 * n, 3, 64, 64, device=device) * 2 - 1
    ext.features(images)  # warm-up with the timed batches (cuDNN's algorithm search)
    sync(device)
    t0 = time.perf_counter()
    feats = ext.features(images)
    sync(device)
    print(f"[inception] {feats.shape} features at {len(images) / (time.perf_counter() - t0):.0f} "
          "img/s")
    t0 = time.time()
    rows = evaluate(ckpt, 2 * n, metrics=("fid", "kid", "bpd"), extractor=ext, bpd_n=16,
                    sampler="dpm++2m", steps=20, cache_dir=root / "cache", progress=False)
    print(f"[evaluate] on {device} in {time.time() - t0:.0f}s (random Inception weights: the "
          "code path and its speed, not a real FID)")
    print(format_table(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description="The prepared check for a CUDA GPU.")
    parser.add_argument("--parts", default="e2e,sampling")
    parts = parser.parse_args().parts.split(",")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, "
          f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    check_attention(torch.device("cuda"))
    with tempfile.TemporaryDirectory() as tmp:
        if "e2e" in parts or "sampling" in parts:
            check_end_to_end(Path(tmp))
        if "sampling" in parts:
            check_sampling_and_evaluation(Path(tmp))


if __name__ == "__main__":
    main()
