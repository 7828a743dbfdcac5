"""The training loop, one flat function, and its command line:

    python -m smol_diffusion.train --preset demo [--lr 1e-3 --steps 2000 ...]
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .checkpoint import (Checkpoint, check_same_model, load_weights, read_checkpoint,
                         save_checkpoint)
from .config import PRESETS, Config, all_fields, get_preset
from .data import batches, make_dataset, to_device
from .diffusion import simple_loss
from .evaluate import SAMPLE_METRICS, evaluate
from .hardware import autocast, compile_model, pick_device, use_bf16
from .schedule import NoiseSchedule
from .unet import UNet
from .viz import display_inline, save_grid


def lr_at(step: int, cfg) -> float:
    """Linear warmup over `cfg.warmup` steps, then constant or cosine decay to 10% of lr."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.lr_schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def ema_decay_at(step: int, decay: float) -> float:
    """EMA decay with warmup, min(decay, (1 + n) / (10 + n)), so early averages forget fast."""
    return min(decay, (1 + step) / (10 + step))


def train(cfg: Config, progress: bool = True) -> dict:
    """Train a DDPM as `cfg` describes; returns the history {"step", "loss", "lr", "img_per_s",
    "eval"} ("eval": a dict of metrics for each `eval_every` steps, see `evaluate`).

    Writes `out_dir/ckpt.pt` (atomically) every `checkpoint_every` steps and at the end, and a
    sample grid from the EMA model to `out_dir/samples_<step>.png` every `sample_every` steps
    and at the end (shown inline in a notebook). Resumes from `cfg.train.resume` if set.
    """
    tc, mc = cfg.train, cfg.model
    if tc.lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {tc.lr_schedule!r}")
    device = pick_device(tc.device)
    bf16 = use_bf16(tc.precision, device)
    torch.manual_seed(tc.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    images = make_dataset(cfg.data, mc.image_size, mc.in_channels, progress).images
    if len(images) < tc.batch_size:
        raise ValueError(f"the dataset has {len(images)} images, fewer than one batch of "
                         f"{tc.batch_size}; lower batch_size")
    steps_per_epoch = len(images) // tc.batch_size
    schedule = NoiseSchedule.from_name(cfg.diffusion.schedule, cfg.diffusion.T,
                                       cfg.diffusion.zero_terminal_snr)
    fmt = torch.channels_last if tc.channels_last else torch.contiguous_format
    model = UNet(mc).to(device, memory_format=fmt)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    net = compile_model(model, tc.compile)  # the training forward; `model` holds the weights
    # one fused kernel for the whole update where PyTorch has it (CUDA, CPU), else foreach
    fused = device.type in ("cuda", "cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay,
                            fused=fused, foreach=None if fused else True)
    step, history = 0, {"step": [], "loss": [], "lr": [], "img_per_s": [], "eval": []}
    if tc.resume:
        state = read_checkpoint(tc.resume)
        check_same_model(state, cfg, tc.resume)
        load_weights(model, state["model"], tc.resume)
        load_weights(ema, state["ema"], tc.resume)
        opt.load_state_dict(state["optimizer"])
        step, history = int(state["step"]), history | state.get("history", {})
        torch.set_rng_state(state["rng"]["torch"])
        if device.type == "cuda" and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"])

    out_dir = Path(tc.out_dir)
    params, ema_params = list(model.parameters()), list(ema.parameters())

    def write_samples() -> None:
        x = Checkpoint(ema, schedule, cfg, step, history).sample(
            tc.sample_n, generator=torch.Generator().manual_seed(tc.seed), bf16=bf16)
        display_inline(save_grid(x, out_dir / f"samples_{step:07d}.png"))

    def run_eval() -> dict:
        rows = evaluate(Checkpoint(ema, schedule, cfg, step, history), tc.eval_n,
                        metrics=SAMPLE_METRICS if cfg.data.dataset == "mnist" else ("fid", "kid"),
                        seed=tc.seed, progress=False)
        return {"step": step} | {r["metric"]: r["value"] for r in rows}

    def write_checkpoint() -> None:
        rng = {"torch": torch.get_rng_state()}
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state()
        save_checkpoint(out_dir / "ckpt.pt", {
            "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
            "step": step, "config": dataclasses.asdict(cfg), "rng": rng, "history": history})

    model.train()
    # Resume mid-epoch: the same order as an uninterrupted run, minus the batches already seen.
    epoch, skip = divmod(step, steps_per_epoch)
    bar = tqdm(total=tc.steps, initial=step, disable=not progress, desc="train")
    loss_sum, n_sum, t_last, step_last = torch.zeros((), device=device), 0, time.time(), step
    while step < tc.steps:
        for batch in batches(images, tc.batch_size, tc.seed, epoch, skip):
            x0 = to_device(batch, device, cfg.data.hflip)  # (B, C, H, W) in [-1, 1]
            x0 = x0.contiguous(memory_format=fmt)
            # 1. learning rate
            lr = lr_at(step, tc)
            for group in opt.param_groups:
                group["lr"] = lr
            # 2. forward / backward
            with autocast(device, bf16):
                loss = simple_loss(net, schedule, x0, cfg.diffusion.min_snr_gamma,
                                   cfg.diffusion.prediction)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            # 3. clip, 4. step
            torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
            opt.step()
            # 5. EMA: ema <- ema + (1 - decay) (params - ema)
            torch._foreach_lerp_(ema_params, params, 1.0 - ema_decay_at(step, tc.ema_decay))
            step += 1
            loss_sum += loss.detach()
            n_sum += 1
            bar.update(1)
            # 6. log: the only place the loss is read back from the device
            if step % tc.log_every == 0 or step == tc.steps:
                now = time.time()
                rate = (step - step_last) * tc.batch_size / max(now - t_last, 1e-9)
                history["step"].append(step)
                history["loss"].append(loss_sum.item() / n_sum)
                history["lr"].append(lr)
                history["img_per_s"].append(rate)
                bar.set_postfix(loss=f"{history['loss'][-1]:.4f}", img_s=f"{rate:.0f}")
                loss_sum.zero_()
                n_sum, t_last, step_last = 0, now, step
            # 7. sample and evaluate, 8. checkpoint
            if tc.sample_every and step % tc.sample_every == 0 and step < tc.steps:
                write_samples()
            if tc.eval_every and (step % tc.eval_every == 0 or step == tc.steps):
                history["eval"].append(run_eval())
                bar.set_postfix(loss=f"{history['loss'][-1]:.4f}",
                                fid=f"{history['eval'][-1]['fid']:.3g}")
            if tc.checkpoint_every and step % tc.checkpoint_every == 0 and step < tc.steps:
                write_checkpoint()
            if step >= tc.steps:
                break
        epoch, skip = epoch + 1, 0
    bar.close()
    write_checkpoint()
    if tc.sample_n:
        write_samples()
    return history


def parse_args(argv: list[str] | None = None) -> Config:
    """A Config from `--preset NAME` plus `--field value` overrides of any config field."""
    parser = argparse.ArgumentParser(prog="python -m smol_diffusion.train",
                                     description="Train a DDPM (Ho et al. 2020).")
    parser.add_argument("--preset", default="demo", choices=sorted(PRESETS))
    for name, f in sorted(all_fields().items()):
        parser.add_argument(f"--{name}", type=str, default=None, help=f"({f.type})")
    args = vars(parser.parse_args(argv))
    cfg = get_preset(args.pop("preset"))
    fields = all_fields()
    return cfg.override(**{name: _parse_value(name, text, fields[name].type)
                           for name, text in args.items() if text is not None})


def _parse_value(name: str, text: str, type_name: str):
    """Parse `text` for field `name` as the type of its annotation (tuples comma-separated)."""
    try:
        if "tuple" in type_name:
            return tuple(int(v) for v in text.split(",") if v.strip())
        if text.lower() == "none" and "None" in type_name:
            return None
        if type_name.startswith("bool"):
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError("expected true or false")
            return text.lower() in ("true", "1")
        if type_name.startswith("int"):
            return int(float(text)) if "e" in text.lower() else int(text)
        if type_name.startswith("float"):
            return float(text)
        return text
    except ValueError as e:
        raise SystemExit(f"--{name} {text!r}: {e} (the field is {type_name})")


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    t0 = time.time()
    try:
        cfg = parse_args(argv)
        history = train(cfg)
    except (ValueError, FileNotFoundError) as e:  # bad input: the message says how to fix it
        raise SystemExit(f"error: {e}") from None
    print(f"done: {cfg.train.steps} steps in {time.time() - t0:.0f}s, final loss "
          f"{history['loss'][-1]:.4f}; checkpoint and samples in {cfg.train.out_dir}/")


if __name__ == "__main__":
    main()
