"""One prepared check for a lent CUDA GPU (run through benchmarks/gpu_check.sh).

1. Training, sampling, checkpointing and resuming run on CUDA: the cars64 model on synthetic
   64x64 images written to a temporary folder (the real image-folder loading path), bf16.
2. Every sampler and the evaluation run on CUDA with that checkpoint: ms per 64x64 image at
   20 NFE in bf16, FID/KID through the FID Inception (random weights in pytorch-fid's layout,
   since none can be downloaded: the code path and its speed, not a real FID) and bits/dim.
3. cars64 training throughput at batch 64 in fp32 (TF32) and bf16, optionally compiled:
   img/s, achieved TFLOP/s (counted with torch.utils.flop_counter), MFU against a bf16 matmul
   peak measured in the same run, and peak memory.

    python benchmarks/gpu_check.py [--parts e2e,sampling,throughput,compile]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import smol_diffusion as sd  # noqa: E402
from smol_diffusion.diffusion import simple_loss  # noqa: E402
from smol_diffusion.evaluate import evaluate, format_table  # noqa: E402
from smol_diffusion.features import FIDInception, inception_extractor  # noqa: E402
from smol_diffusion.samplers import SAMPLERS  # noqa: E402


def matmul_peak(dtype: torch.dtype, n: int = 8192, reps: int = 20) -> float:
    """Measured TFLOP/s of an n x n x n matmul in `dtype`."""
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def check_end_to_end(root: Path) -> None:
    """Train, sample, checkpoint and resume cars64 on CUDA with synthetic images."""
    rng = np.random.default_rng(0)
    folder = root / "images"
    folder.mkdir()
    for i in range(512):  # smooth random blobs, 80x64 so the centre crop does something
        small = rng.integers(0, 255, (5, 6, 3), dtype=np.uint8)
        Image.fromarray(small).resize((80, 64), Image.BICUBIC).save(folder / f"{i:04d}.png")
    cfg = sd.get_preset("cars64").override(
        dataset="folder", root=str(folder), steps=300, warmup=50, log_every=50,
        sample_every=150, sample_n=16, sample_steps=25, checkpoint_every=150,
        out_dir=str(root / "run"))
    t0 = time.time()
    hist = sd.train(cfg, progress=False)
    print(f"[e2e] 300 steps in {time.time() - t0:.1f}s; loss {hist['loss'][0]:.4f} -> "
          f"{hist['loss'][-1]:.4f}; loop img/s (incl. data loading) "
          f"{[round(r) for r in hist['img_per_s']]}")
    hist = sd.train(cfg.override(steps=320, resume=str(root / "run" / "ckpt.pt")), progress=False)
    ckpt = sd.load_checkpoint(root / "run" / "ckpt.pt")
    x = ckpt.sample(8, generator=torch.Generator().manual_seed(0), steps=25)
    print(f"[e2e] resumed to step {ckpt.step}; sample {tuple(x.shape)} on {x.device}, "
          f"range [{x.min():.2f}, {x.max():.2f}], finite {bool(torch.isfinite(x).all())}; "
          f"files {sorted(p.name for p in (root / 'run').iterdir())}")


def check_sampling_and_evaluation(root: Path, n: int = 256) -> None:
    """Each sampler's speed, and FID/KID/bits-dim, with the end-to-end checkpoint (on CUDA)."""
    ckpt = sd.load_checkpoint(root / "run" / "ckpt.pt")
    device = next(ckpt.model.parameters()).device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for name in SAMPLERS:
        for bf16 in (False, True):
            gen = torch.Generator().manual_seed(0)
            ckpt.sample(8, sampler=name, steps=20, generator=gen, bf16=bf16)  # warm-up
            sync()
            t0 = time.perf_counter()
            x = ckpt.sample(n, sampler=name, steps=20, generator=gen, bf16=bf16)
            sync()
            ms = 1000 * (time.perf_counter() - t0) / n
            print(f"[sampling] {name:>8} 20 NFE, batch {n}, {'bf16' if bf16 else 'fp32'}: "
                  f"{ms:.2f} ms/image (50,000 for FID: {50_000 * ms / 60_000:.1f} min); "
                  f"finite {bool(torch.isfinite(x).all())}")
    torch.manual_seed(0)
    weights = root / "inception.pth"
    torch.save(FIDInception().state_dict(), weights)
    ext = inception_extractor(weights, device)
    images = torch.rand(2 * n, 3, 64, 64, device=device) * 2 - 1
    ext.features(images[:16])
    sync()
    t0 = time.perf_counter()
    feats = ext.features(images)
    sync()
    print(f"[inception] {feats.shape} features at {len(images) / (time.perf_counter() - t0):.0f} "
          "img/s")
    t0 = time.time()
    rows = evaluate(ckpt, 2 * n, metrics=("fid", "kid", "bpd"), extractor=ext, bpd_n=n // 4,
                    sampler="dpm++2m", steps=20, cache_dir=root / "cache", progress=False)
    print(f"[evaluate] on {device} in {time.time() - t0:.0f}s (random Inception weights: the "
          "code path and its speed, not a real FID)")
    print(format_table(rows))


def throughput(bf16: bool, compile_: bool, batch: int = 64, steps: int = 30) -> dict:
    """Steady-state img/s of the cars64 training step (forward, backward, fused AdamW)."""
    torch.manual_seed(0)
    cfg = sd.get_preset("cars64")
    model = sd.UNet(cfg.model).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4, fused=True)
    schedule = sd.NoiseSchedule.linear(1000)
    x = torch.randn(batch, 3, 64, 64, device="cuda")
    net = torch.compile(model) if compile_ else model

    def step() -> None:
        with torch.autocast("cuda", torch.bfloat16, enabled=bf16):
            loss = simple_loss(net, schedule, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    with FlopCounterMode(display=False) as counter:
        with torch.autocast("cuda", torch.bfloat16, enabled=bf16):
            loss = simple_loss(model, schedule, x)
        loss.backward()
    flops = counter.get_total_flops()
    t0 = time.time()
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    warm = time.time() - t0
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps // 3):
            step()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / (steps // 3))
    t = sorted(times)[1]
    return {"img_s": batch / t, "tflops": flops / t / 1e12, "warmup_s": warm,
            "mem_gib": torch.cuda.max_memory_allocated() / 2**30,
            "gflop_per_img": flops / batch / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description="The prepared check for a CUDA GPU.")
    parser.add_argument("--parts", default="e2e,sampling,throughput,compile")
    parts = parser.parse_args().parts.split(",")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, "
          f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    with tempfile.TemporaryDirectory() as tmp:
        if "e2e" in parts or "sampling" in parts:
            check_end_to_end(Path(tmp))
        if "sampling" in parts:
            check_sampling_and_evaluation(Path(tmp))
    if "throughput" not in parts:
        return
    peak_bf16, peak_tf32 = matmul_peak(torch.bfloat16), matmul_peak(torch.float32)
    print(f"[peak] measured 8192^3 matmul: bf16 {peak_bf16:.0f} TFLOP/s, "
          f"tf32 {peak_tf32:.0f} TFLOP/s")
    n_params = sum(p.numel() for p in sd.UNet(sd.get_preset("cars64").model).parameters())
    print(f"[params] cars64 {n_params / 1e6:.2f}M")
    for bf16, compile_ in ((False, False), (True, False), (True, True))[:3 if "compile" in parts
                                                                         else 2]:
        name = f"{'bf16' if bf16 else 'fp32/tf32'}{' + compile' if compile_ else ''}"
        try:
            r = throughput(bf16, compile_)
        except Exception as e:  # compile can fail on an image without a compiler
            print(f"[throughput] {name}: failed: {type(e).__name__}: {str(e)[:300]}")
            continue
        peak = peak_bf16 if bf16 else peak_tf32
        print(f"[throughput] cars64 B=64 {name}: {r['img_s']:.0f} img/s, {r['tflops']:.1f} "
              f"TFLOP/s ({r['gflop_per_img']:.1f} GFLOP/img fwd+bwd), MFU {r['tflops'] / peak:.1%} "
              f"of measured {peak:.0f}, peak mem {r['mem_gib']:.1f} GiB, "
              f"warmup {r['warmup_s']:.0f}s")
        print(f"[throughput] original's 6.1M images at this rate: "
              f"{6.1e6 / r['img_s'] / 3600:.2f} h")


if __name__ == "__main__":
    main()
