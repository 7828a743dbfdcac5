"""Training throughput, measured side by side in one run, against the device's own peak.

    python benchmarks/train_throughput.py [--models demo,cars64] [--variants fp32,bf16,...]
                                          [--peers] [--profile] [--device auto] [--json FILE]

For each preset's model and each variant (fp32, or bf16 or fp16 autocast, "+cl" channels_last,
"+compile" torch.compile), the trainer itself (`smol_diffusion.train`) runs on a folder of
synthetic images through the real input pipeline (image cache, batches, device-side flips),
each variant in a fresh process. Printed: img/s (median over the logged intervals after the
first, which holds warm-up and compilation), FLOPs per image (forward + backward, counted with
torch.utils.flop_counter), achieved GFLOP/s and its share of a large matmul's rate measured in
this run in the same precision (fp32 variants use TF32 on CUDA, as training does), the speedup
over fp32, and peak memory (CUDA: allocated tensors; CPU: the process's resident set).
Then the input pipeline alone: decoding into the cache, and cached batches delivered to the
device (gather, pinned copy, conversion, flips), against the fastest training rate measured.
With --peers (pip install -r benchmarks/requirements-peers.txt): diffusers' UNet2DModel and
lucidrains' denoising-diffusion-pytorch Unet configured like cars64, and ours, timed through
one identical training step (loss, backward, clip, fused AdamW, EMA), compared at equal FLOPs.
With --profile, instead of the table: each variant's img/s, its device time by kind of kernel,
its top kernels and the ops that ask for copies (torch.profiler, after a warm-up run).
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script
import smol_diffusion as sd  # noqa: E402
from smol_diffusion.batches import batch_indices, to_device  # noqa: E402
from smol_diffusion.data import make_dataset  # noqa: E402
from smol_diffusion.diffusion import simple_loss  # noqa: E402
from smol_diffusion.hardware import autocast, pick_device  # noqa: E402

# Per device type: batch, steps and log interval per preset (the cars64 CPU batch is small so
# that a run ends in minutes). A CPU without native bf16 runs bf16 at batch 1 for 2 steps.
PLAN = {"cuda": {"demo": (64, 200, 40), "cars64": (64, 60, 10)},
        "cpu": {"demo": (64, 100, 20), "cars64": (4, 4, 1)}}
DEFAULT_VARIANTS = {"cuda": "fp32,bf16,fp32+cl,bf16+cl,bf16+compile,bf16+cl+compile,"
                            "bf16+compile@256",
                    "cpu": "fp32,bf16,fp32+cl,fp32+compile"}


def synthetic_images(folder: Path, n: int, size: int) -> Path:
    """n smooth random colour images (PNG, 5:4 so the centre crop does something)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        small = rng.integers(0, 255, (5, 6, 3), dtype=np.uint8)
        Image.fromarray(small).resize((size * 5 // 4, size), Image.BICUBIC).save(
            folder / f"{i:05d}.png")
    return folder


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """GFLOP/s of a large square matmul in `dtype` (TF32 allowed on CUDA for float32), the
    median of several; a size that takes under a second where the dtype is slow (bf16 on a
    CPU without native bf16 kernels)."""
    n = 512
    while True:
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        a @ b
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        t = time.perf_counter() - t0
        if t > 0.2 or n >= (8192 if device.type == "cuda" else 2048):
            break
        n *= 2
    reps = max(3, min(50, int(1.0 / max(t, 1e-4))))
    return 2 * n**3 / median_seconds(lambda: a @ b, reps, device) / 1e9


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so a timer reads what it ran."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn, reps: int = 7, device: torch.device = torch.device("cpu")) -> float:
    """The median time of `reps` calls of fn() after a warm-up call, each waited for on
    `device`."""
    fn()
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# torch's FLOP counter has formulas for SDPA's CUDA kernels but none for its CPU kernel, where
# attention would count 0 (0.9% of cars64's FLOPs): the CPU kernel gets the CUDA formulas (the
# backward recomputes the scores, as flash attention does, so it counts one matmul more than
# the math path's autograd would).
CPU_ATTENTION = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *args, out_shape=None, **kwargs: flop_counter.sdpa_flop_count(q, k, v),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad_out, q, k, v, *args, out_shape=None, **kwargs:
            flop_counter.sdpa_backward_flop_count(grad_out, q, k, v)}


def flops_per_image(model, batch: int, shape: tuple, device: torch.device, call=None) -> float:
    """Forward + backward FLOPs of the training loss per image (counted, not estimated)."""
    x = torch.randn(batch, *shape, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as counter:
        out = (call or model)(x, t)
        out.float().pow(2).mean().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch


def peak_memory_gib(device: torch.device) -> float:
    """CUDA: the most memory tensors held; CPU: this process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def slow_bf16(device: torch.device) -> bool:
    """A CPU without native bf16 kernels (no AVX512-BF16 or AMX): bf16 runs 10-100x slower."""
    return device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported()


def parse_variant(variant: str) -> tuple[list[str], int | None]:
    """("bf16+cl+compile@256") -> (["bf16", "cl", "compile"], 256); the batch is None without
    @N. Raises ValueError on anything else."""
    name, _, size = variant.partition("@")
    parts = name.split("+")
    if parts[0] not in ("fp32", "bf16", "fp16") or not set(parts[1:]) <= {"cl", "compile"} \
            or not (size or "1").isdigit():
        raise ValueError(f"variant {variant!r}: expected fp32, bf16 or fp16, then +cl and/or "
                         "+compile, then @N for a batch of N, e.g. bf16+compile@256")
    return parts, int(size) if size else None


def train_config(preset: str, variant: str, device: torch.device, folder: str,
                 out: str) -> sd.Config:
    """The preset's config for one variant ("bf16+cl+compile@256") on the synthetic folder."""
    batch, steps, log_every = PLAN[device.type][preset]
    parts, size = parse_variant(variant)
    if parts[0] == "bf16" and slow_bf16(device) and preset == "cars64" and size is None:
        batch, steps, log_every = 1, 2, 1
    batch = batch if size is None else size
    return sd.get_preset(preset).override(
        dataset="folder", root=folder, cache_dir=str(Path(folder) / "cache"),
        batch_size=batch, steps=steps, log_every=log_every, warmup=1, sample_every=0,
        sample_n=0, checkpoint_every=0, eval_every=0, out_dir=out, device=str(device),
        precision=parts[0], channels_last="cl" in parts, compile="compile" in parts)


def train_job(preset: str, variant: str, device: torch.device, folder: str) -> dict:
    """The trainer's own img/s for one variant on the synthetic folder."""
    with tempfile.TemporaryDirectory() as out:
        cfg = train_config(preset, variant, device, folder, out)
        m, tc = cfg.model, cfg.train
        per_image = flops_per_image(sd.UNet(m).to(device), min(tc.batch_size, 8),
                                    (m.in_channels, m.image_size, m.image_size), device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.time()
        history = sd.train(cfg, progress=False)
        rates = history["img_per_s"][1:]
        return {"model": preset, "variant": variant, "batch": tc.batch_size, "steps": tc.steps,
                "img_s": statistics.median(rates), "flops_per_img": per_image,
                "first_interval_s": tc.log_every * tc.batch_size / history["img_per_s"][0],
                "wall_s": time.time() - t0, "mem_gib": peak_memory_gib(device)}


# Kernel name fragments -> what the time went to (the first match wins: compiled kernels are
# named after the ops they fuse, "convolution" among them).
KERNEL_KINDS = [("conv / matmul", ("triton_tem",)),  # max-autotune's generated templates
                ("fused elementwise / norms (compiled)", ("triton",)),
                ("attention", ("flash", "fmha", "attention", "softmax")),
                ("optimizer, clip, EMA", ("adam", "multi_tensor", "foreach", "lerp",
                                          "lpnorm")),
                ("copies (layout, dtype)", ("nchwtonhwc", "nhwctonchw", "memcpy", "memset",
                                            "direct_copy", "copy_kernel", "aten::copy_")),
                ("conv / matmul", ("conv", "xmma", "cudnn", "gemm", "cutlass", "sm80", "sm90",
                                   "implicit", "winograd", "nvjet")),
                ("elementwise / norms (eager)", ("elementwise", "reduce", "norm", "moments",
                                                 "fusedparams", "gammabeta", "internalgrad",
                                                 "silu", "dropout", "fill", "upsample", "index",
                                                 "cat"))]


def profile_job(preset: str, variant: str, device: torch.device, folder: str) -> dict:
    """Where the device's time goes in training steps: a warm-up run of two log intervals
    (compilation and cuDNN's algorithm search in the first; the second gives img/s unprofiled),
    then a profiled run as long; kernel time by kind, the top kernels, the ops behind copies,
    and the share of the wall time the device was busy."""
    from torch.profiler import ProfilerActivity, profile
    on_cuda = device.type == "cuda"
    with tempfile.TemporaryDirectory() as out:
        cfg = train_config(preset, variant, device, folder, out)
        cfg = cfg.override(steps=2 * cfg.train.log_every)
        img_s = sd.train(cfg, progress=False)["img_per_s"][-1]
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
        with profile(activities=activities, record_shapes=True) as prof:
            t0 = time.perf_counter()
            sd.train(cfg.override(overwrite=True), progress=False)  # the warm-up's folder
            wall = time.perf_counter() - t0
    events = [e for e in prof.key_averages() if not e.is_user_annotation and (
        e.device_type.name == "CUDA" and e.self_device_time_total > 0 if on_cuda
        else e.key.startswith("aten::"))]
    times = {e.key: (e.self_device_time_total if on_cuda else e.self_cpu_time_total) / 1e6
             for e in events}
    kinds: dict[str, float] = {}
    for name, sec in times.items():
        kind = next((k for k, frags in KERNEL_KINDS if any(f in name.lower() for f in frags)),
                    "other")
        kinds[kind] = kinds.get(kind, 0.0) + sec
    top = sorted(times.items(), key=lambda kv: -kv[1])[:12]
    return {"model": preset, "variant": variant, "steps": cfg.train.steps, "wall_s": wall,
            "img_s": img_s, "batch": cfg.train.batch_size,
            "busy_s": sum(times.values()), "kinds": kinds, "top": top,
            "copies": copy_sources(prof.events(), on_cuda)}


COPY_OPS = ("aten::copy_", "aten::clone", "aten::contiguous", "aten::to", "aten::_to_copy")


def copy_sources(events, on_cuda: bool, n: int = 8) -> list[tuple[str, str, float]]:
    """Who asks for the copies: the time of aten::copy_'s own kernels (CPU: its own time)
    summed by the nearest enclosing op that is not itself a copy, and the copied shape. Copies
    made otherwise (inside cuDNN, or by compiled kernels) are not among them."""
    found: dict[tuple[str, str], float] = {}
    for e in events:
        if e.name != "aten::copy_" or e.device_type.name != "CPU":
            continue
        sec = (e.self_device_time_total if on_cuda else e.self_cpu_time_total) / 1e6
        parent = e.cpu_parent
        while parent is not None and parent.name in COPY_OPS:
            parent = parent.cpu_parent
        key = (parent.name if parent is not None else "(top level)",
               str(e.input_shapes[0]) if e.input_shapes else "?")
        found[key] = found.get(key, 0.0) + sec
    return [(op, shape, sec) for (op, shape), sec in
            sorted(found.items(), key=lambda kv: -kv[1])[:n] if sec > 0]


def pipeline_job(preset: str, device: torch.device, folder: str, seconds: float = 2.0) -> dict:
    """The input pipeline alone: decoding into a fresh cache, then cached batches delivered to
    the device as floats with flips (what the trainer does before each step)."""
    cfg = sd.get_preset(preset)
    batch = PLAN[device.type][preset][0]
    with tempfile.TemporaryDirectory() as cache:
        data = sd.DataConfig(dataset="folder", root=folder, cache_dir=cache)
        t0 = time.perf_counter()
        images = make_dataset(data, cfg.model.image_size, cfg.model.in_channels, False).images
        decode = len(images) / (time.perf_counter() - t0)
        n, epoch, t0 = 0, 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for idx in batch_indices(len(images), batch, seed=0, epoch=epoch):
                x = to_device(images[idx], device, torch.rand(len(idx), device=device) < 0.5)
                n += len(x)
            epoch += 1
        sync(device)
        return {"model": preset, "batch": batch, "decode_img_s": decode,
                "deliver_img_s": n / (time.perf_counter() - t0)}


def peer_model(name: str, device: torch.device):
    """(model, call(x, t) -> eps_hat) for ours and the peers, each configured like cars64:
    64x64, channels 128-256-256-256, 2 blocks a level, attention at 16 and 8 (4 heads),
    dropout 0.1."""
    if name == "smol":
        model = sd.UNet(sd.get_preset("cars64").model)
        return model.to(device), model
    if name == "diffusers":
        from diffusers import UNet2DModel
        model = UNet2DModel(
            sample_size=64, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
            layers_per_block=2, down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D",
                                                  "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
            attention_head_dim=64, dropout=0.1).to(device)
        return model, lambda x, t: model(x, t).sample
    if name == "lucidrains":
        from denoising_diffusion_pytorch import Unet
        model = Unet(dim=128, dim_mults=(1, 2, 2, 2), channels=3, dropout=0.1, attn_heads=4,
                     attn_dim_head=64, full_attn=(False, False, True, True),
                     flash_attn=device.type == "cuda").to(device)
        return model, model
    raise ValueError(name)


def peer_job(name: str, device: torch.device, bf16: bool) -> dict:
    """img/s of one identical training step around each network: the L_simple loss, backward,
    gradient clipping, fused AdamW and an EMA update."""
    batch, _, _ = PLAN[device.type]["cars64"]
    steps = 30 if device.type == "cuda" else 4
    torch.manual_seed(0)
    model, call = peer_model(name, device)
    per_image = flops_per_image(model, min(batch, 8), (3, 64, 64), device, call)
    params = list(model.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=2e-4, fused=device.type in ("cuda", "cpu"))
    schedule = sd.NoiseSchedule.linear(1000)
    x0 = torch.rand(batch, 3, 64, 64, device=device) * 2 - 1

    def step() -> None:
        with autocast(device, torch.bfloat16 if bf16 else None):
            loss = simple_loss(call, schedule, x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        torch._foreach_lerp_(ema, params, 1e-4)
    return {"model": name, "variant": "bf16" if bf16 else "fp32", "batch": batch,
            "img_s": batch / median_seconds(step, steps, device), "flops_per_img": per_image,
            "params_m": sum(p.numel() for p in params) / 1e6, "mem_gib": peak_memory_gib(device)}


def run_job(job: dict) -> dict:
    """Run one job in a fresh Python process (clean memory peak, no compiled state kept)."""
    proc = subprocess.run([sys.executable, __file__, "--job", json.dumps(job)],
                          capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]}


def num(x: float, width: int) -> str:
    """x with three significant digits (0.0091, 1.01, 732) or thousands separators."""
    return f"{x:{width},.0f}" if abs(x) >= 100 else f"{x:{width}.3g}"


def machine(device: torch.device) -> str:
    """The GPU's name, or the CPU's model and thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    return f"{cpu}, {torch.get_num_threads()} threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="demo,cars64")
    parser.add_argument("--variants", default=None,
                        help="comma-separated: fp32, bf16 or fp16, with +cl (channels_last) and/or "
                             "+compile, and @N for a batch of N; default: "
                             + "; ".join(f"{k}: {v}" for k, v in DEFAULT_VARIANTS.items()))
    parser.add_argument("--peers", action="store_true",
                        help="also time diffusers' and lucidrains' UNets (optional installs)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the peer comparison")
    parser.add_argument("--profile", action="store_true",
                        help="instead of timing: where the time goes in each variant's steps")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", default=None, help="also write every result to this file")
    parser.add_argument("--job", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = pick_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.job:
        job = json.loads(args.job)
        kind = job.pop("kind")
        jobs = {"train": train_job, "pipeline": pipeline_job, "peer": peer_job,
                "profile": profile_job}
        result = jobs[kind](device=device, **job)
        print("RESULT " + json.dumps(result))
        return
    results = {"machine": machine(device), "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d"), "train": [], "pipeline": [], "peers": []}
    print(f"{results['machine']}; torch {torch.__version__}; {results['date']}")
    variants = (args.variants or DEFAULT_VARIANTS[device.type]).split(",")
    for v in variants:
        try:
            parse_variant(v)
        except ValueError as e:
            parser.error(str(e))
    models = [m for m in args.models.split(",") if m]  # --models "" for the peers alone
    if args.profile:
        return print_profiles(models, variants)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    peaks = {name: matmul_peak(device, dtypes[name])
             for name in dtypes if any(v.startswith(name) for v in variants) or name != "fp16"}
    results["peak_gflops"] = peaks
    print(f"measured matmul peak: fp32{'/tf32' if device.type == 'cuda' else ''} "
          f"{num(peaks['fp32'], 1)} GFLOP/s, bf16 {num(peaks['bf16'], 1)} GFLOP/s"
          + (f", fp16 {num(peaks['fp16'], 1)} GFLOP/s" if "fp16" in peaks else "")
          + (" (no native bf16 on this CPU: reference kernels)" if slow_bf16(device) else ""))
    with tempfile.TemporaryDirectory() as tmp:
        if models:
            print(f"\n{'model':7s} {'variant':20s} {'batch':>5s} {'img/s':>8s} {'GFLOP/img':>9s} "
                  f"{'GFLOP/s':>9s} {'% peak':>6s} {'vs fp32':>7s} {'mem GiB':>7s}  "
                  "first interval")
        for preset in models:
            size = sd.get_preset(preset).model.image_size
            folder = synthetic_images(Path(tmp) / f"img{size}", 512, size)
            base = None
            for variant in variants:
                r = run_job({"kind": "train", "preset": preset, "variant": variant,
                             "folder": str(folder)}) | {"model": preset, "variant": variant}
                results["train"].append(r)
                if "error" in r:
                    print(f"{preset:7s} {variant:20s} failed: {r['error']}")
                    continue
                base = base or (r if variant == "fp32" else None)
                gflops = r["img_s"] * r["flops_per_img"] / 1e9
                r["gflops"], r["share_of_peak"] = gflops, gflops / peaks[variant[:4]]
                speedup = f"{r['img_s'] / base['img_s']:7.2f}" if base else f"{'':7s}"
                print(f"{preset:7s} {variant:20s} {r['batch']:5d} {num(r['img_s'], 8)} "
                      f"{r['flops_per_img'] / 1e9:9.2f} {num(gflops, 9)} "
                      f"{r['share_of_peak']:6.1%} {speedup} {r['mem_gib']:7.2f}  "
                      f"{r['first_interval_s']:.1f}s", flush=True)
                save(results, args.json)
            rates = [r["img_s"] for r in results["train"] if r["model"] == preset and "img_s" in r]
            if preset == "cars64" and rates:
                print(f"the original's 6.1M images (40 GPU-hours there) at the fastest cars64 "
                      f"rate, {max(rates):,.4g} img/s: {6.1e6 / max(rates) / 3600:,.1f} hours")
        if models:
            print(f"\n{'input pipeline':16s} {'batch':>5s} {'decode img/s':>12s} "
                  f"{'deliver img/s':>13s} {'x fastest training':>18s}")
        for preset in models:
            size = sd.get_preset(preset).model.image_size
            r = run_job({"kind": "pipeline", "preset": preset,
                         "folder": str(Path(tmp) / f"img{size}")})
            results["pipeline"].append(r)
            save(results, args.json)
            fastest = max((t["img_s"] for t in results["train"]
                           if t.get("model") == preset and "img_s" in t), default=float("nan"))
            r["x_training"] = r.get("deliver_img_s", float("nan")) / fastest
            print(f"{preset:16s} {r.get('batch', 0):5d} {r.get('decode_img_s', 0):12,.0f} "
                  f"{r.get('deliver_img_s', 0):13,.0f} {r['x_training']:18,.0f}"
                  + (f"  failed: {r['error']}" if "error" in r else ""), flush=True)
    if args.peers:
        print(f"\n{'cars64-like UNet':16s} {'variant':7s} {'params':>7s} {'img/s':>7s} "
              f"{'GFLOP/img':>9s} {'GFLOP/s':>9s} {'img/s at our FLOPs':>18s} {'mem GiB':>7s}"
              f"  (median of {args.rounds} interleaved rounds)")
        for bf16 in ([False, True] if device.type == "cuda" else [False]):
            runs = {name: [] for name in ("smol", "diffusers", "lucidrains")}
            for _ in range(args.rounds):  # interleaved, so a slow spell hits every model
                for name in runs:
                    runs[name].append(run_job({"kind": "peer", "name": name, "bf16": bf16}))
            ours = None
            for name, rs in runs.items():
                ok = [r for r in rs if "error" not in r]
                if not ok or (ours is None and name != "smol"):
                    print(f"{name:16s} failed: {rs[0].get('error', 'ours failed')}")
                    continue
                r = ok[0] | {"img_s": statistics.median(x["img_s"] for x in ok),
                             "img_s_rounds": [x["img_s"] for x in ok]}
                results["peers"].append(r)
                save(results, args.json)
                ours = r if name == "smol" else ours
                gflops = r["img_s"] * r["flops_per_img"] / 1e9
                r["img_s_at_our_flops"] = gflops * 1e9 / ours["flops_per_img"]
                print(f"{name:16s} {r['variant']:7s} {r['params_m']:6.1f}M {num(r['img_s'], 7)} "
                      f"{r['flops_per_img'] / 1e9:9.2f} {num(gflops, 9)} "
                      f"{num(r['img_s_at_our_flops'], 18)} {r['mem_gib']:7.2f}", flush=True)
    save(results, args.json)


def print_profiles(models: list[str], variants: list[str]) -> None:
    """--profile: each variant's unprofiled img/s, its device time by kind of kernel, its top
    kernels and the ops behind its copies."""
    with tempfile.TemporaryDirectory() as tmp:
        for preset in models:
            size = sd.get_preset(preset).model.image_size
            folder = synthetic_images(Path(tmp) / f"img{size}", 512, size)
            for variant in variants:
                r = run_job({"kind": "profile", "preset": preset, "variant": variant,
                             "folder": str(folder)})
                if "error" in r:
                    print(f"\n{preset} {variant}: failed: {r['error']}")
                    continue
                print(f"\n{preset} {variant}, {r['img_s']:,.0f} img/s unprofiled; profiled: "
                      f"{r['steps']} steps of {r['batch']} in {r['wall_s']:.2f} s, kernels "
                      f"{r['busy_s']:.2f} s ({r['busy_s'] / r['wall_s']:.0%} busy)")
                for kind, sec in sorted(r["kinds"].items(), key=lambda kv: -kv[1]):
                    print(f"  {kind:38s} {sec:7.3f} s {sec / r['busy_s']:6.1%}")
                print("  top kernels:")
                for name, sec in r["top"]:
                    print(f"  {sec / r['busy_s']:6.1%}  {name[:110]}")
                if r["copies"]:
                    print("  aten copies, by the op that asked for them, and the shape:")
                for op, shape, sec in r["copies"]:
                    print(f"  {sec / r['busy_s']:6.1%}  {op[:60]:60s}  {shape}")


def save(results: dict, path: str | None) -> None:
    """Write the results so far (after every row: a run cut short keeps what it measured)."""
    if path:
        Path(path).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
