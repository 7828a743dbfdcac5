"""The training loop, one flat function (its command line: `smol-diffusion train`, cli.py)."""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from .batches import DROPOUT, batch_indices, step_randomness, stream_seed, to_device
from .checkpoint import (Checkpoint, check_out_dir, class_columns, resume_from,
                         save_checkpoint)
from .config import Config
from .data import make_dataset
from .diffusion import simple_loss
from .evaluate import default_metrics, evaluate, get_extractor
from .files import lock_folder, shown
from .hardware import (DTYPES, autocast, compile_model, distributed_env, grad_scaler,
                       resolve_precision, setup_device)
from .interrupts import Interrupts
from .runlog import RunLog
from .schedule import NoiseSchedule
from .unet import UNet
from .viz import display_inline, save_grid, to_grid


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
    "grad_norm", "eval", "skipped"} ("eval": a dict of metrics for each `eval_every` steps, see
    `evaluate`; "skipped": how many steps were skipped).

    Writes `out_dir/ckpt.pt` (atomically) every `checkpoint_every` steps and at the end, and a
    sample grid from the EMA model to `out_dir/samples_<step>.png` every `sample_every` steps
    and at the end (shown inline in a notebook); appends each loss reading and evaluation to
    `out_dir/log.jsonl` (and TensorBoard, where installed: `runlog`). Resumes from
    `cfg.train.resume` if set. Autocasts to the `precision` that `resolve_precision` picks; in
    fp16 the loss is scaled (`grad_scaler`), and the scale is saved with the checkpoint.

    A run owns its folder: a new run into one that holds a checkpoint is refused unless
    `overwrite`, and so is a second live run there. A step whose gradient is not finite (one
    bad batch) is skipped and counted in `history["skipped"]`; when over half the steps between
    two loss readings are, the run has diverged and stops with `TrainingDiverged` before it
    writes another checkpoint. Ctrl-C (a notebook's Interrupt) or SIGTERM writes a checkpoint
    at the step reached and returns the history so far; `resume` goes on from exactly there.

    Under torchrun (several processes) this is distributed data-parallel training: each
    process takes its share of every global batch of `batch_size` images, gradients are averaged
    (NCCL on CUDA, gloo on CPU), and only rank 0 writes files. The noise, timesteps, flips and
    dropped labels of each step are drawn for the whole global batch from a generator seeded by
    (seed, step), so without dropout a run gives the same result on any number of processes and
    resumes on another number where it stopped; dropout is seeded by (seed, step, rank), so a
    resume on the same number of processes is exact with it too.
    """
    tc = cfg.train  # every field was checked when cfg was built (config.py)
    rank, world, _ = distributed_env()
    with (lock_folder(Path(tc.out_dir)) if rank == 0 else contextlib.nullcontext()), \
            Interrupts(at_once=world == 1) as interrupts:
        check_out_dir(tc)
        with contextlib.closing(RunLog(tc.out_dir, enabled=rank == 0)) as log:
            return _train(cfg, progress, interrupts, log)


class TrainingDiverged(RuntimeError):
    """The loss or the gradients stopped being finite; the message says what to try."""


def _train(cfg: Config, progress: bool, interrupts: Interrupts, log: RunLog) -> dict:
    """`train` once its output folder is its own: setup, then the numbered loop."""
    tc, mc = cfg.train, cfg.model
    rank, world, local_rank = distributed_env()
    out_dir = Path(tc.out_dir)
    ours = out_dir / "ckpt.pt"
    local, micro = tc.per_process(world)  # images per process, per micro-batch
    device, own_group = setup_device(tc.device, world, local_rank)
    precision = resolve_precision(tc.precision, device)
    amp = DTYPES[precision]  # autocast's dtype: bf16, fp16 or None (fp32)
    if rank > 0:
        dist.barrier()  # rank 0 builds the image cache first
    dataset = make_dataset(cfg.data, mc.image_size, mc.in_channels, progress and rank == 0)
    if rank == 0 and world > 1:
        dist.barrier()
    images, labels = dataset.images, dataset.labels
    cfg.check_dataset(len(images), dataset.classes)
    steps_per_epoch = len(images) // tc.batch_size
    schedule = NoiseSchedule.from_name(cfg.diffusion.schedule, cfg.diffusion.T,
                                       cfg.diffusion.zero_terminal_snr)
    torch.manual_seed(tc.seed)  # the same initial weights on every process
    fmt = torch.channels_last if tc.channels_last else torch.contiguous_format
    model = UNet(mc).to(device, memory_format=fmt)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world > 1 else model
    net = compile_model(ddp, tc.compile, device)  # the training forward; `model` holds the weights
    # one fused kernel for the whole update where PyTorch has it (CUDA, CPU), else foreach
    fused = device.type in ("cuda", "cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay,
                            fused=fused, foreach=None if fused else True)
    scaler = grad_scaler(device, amp)  # fp16 only: loss scaling, off otherwise
    step, history = 0, {"step": [], "loss": [], "lr": [], "img_per_s": [], "grad_norm": [],
                        "eval": [], "skipped": 0}
    if tc.resume:
        step, stored = resume_from(tc.resume, cfg, model, ema, opt, scaler)
        history |= stored

    # built now, so that missing Inception weights stop the run before it trains, not after
    extractor = get_extractor(None, cfg, cfg.data.cache_dir, device=device) \
        if rank == 0 and tc.eval_every else None
    params, ema_params = list(model.parameters()), list(ema.parameters())
    classes = dataset.classes if mc.num_classes else None

    def write_samples() -> None:
        ckpt = Checkpoint(ema, schedule, cfg, step, history, classes)
        # a conditional model: each class in turn (Checkpoint.sample)
        x = ckpt.sample(tc.sample_n, generator=torch.Generator().manual_seed(tc.seed))
        nrow = class_columns(tc.sample_n, mc.num_classes)
        display_inline(save_grid(x, out_dir / f"samples_{step:07d}.png", nrow))
        log.image("samples", to_grid(x, nrow), step)

    def run_eval() -> dict:
        rows = evaluate(Checkpoint(ema, schedule, cfg, step, history, classes), tc.eval_n,
                        metrics=tuple(m for m in default_metrics(cfg, extractor) if m != "bpd"),
                        extractor=extractor, seed=tc.seed, cache_dir=cfg.data.cache_dir,
                        progress=False)
        return {"step": step} | {r["metric"]: r["value"] for r in rows}

    def write_checkpoint() -> None:
        save_checkpoint(ours, {
            "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
            "scaler": scaler.state_dict(), "step": step, "config": dataclasses.asdict(cfg),
            "history": history, "classes": classes})

    def take_reading() -> None:
        """Read the loss back (the one synchronisation), record and log it; stop a run whose
        steps since the last judgement, once they number log_every, were over half skipped
        (in fp16, once the loss scale has also fallen to 1: the scaler's own skips, as it
        lowers the scale, are no divergence); share a stop request between processes."""
        nonlocal n_sum, t_last, step_last, stop
        if world > 1:
            sums[3] = float(interrupts.pending)
            dist.all_reduce(sums)
        loss_total, bad, norm_total, stop = sums.tolist()
        loss_total, bad, norm_total, stop = (loss_total / world, bad / world, norm_total / world,
                                             stop > 0)
        now = time.time()
        rate = (step - step_last) * tc.batch_size / max(now - t_last, 1e-9)
        loss = loss_total / (n_sum - bad) if n_sum > bad else math.nan
        norm = norm_total / (n_sum - bad) if n_sum > bad else math.nan
        scale = scaler.get_scale()  # 1.0 unless fp16
        for name, value in (("step", step), ("loss", loss), ("lr", lr), ("img_per_s", rate),
                            ("grad_norm", norm)):
            history[name].append(value)
        history["skipped"] += int(bad)
        log.write("train", step, loss=loss, lr=lr, img_per_s=rate, grad_norm=norm,
                  skipped=int(bad), **({"loss_scale": scale} if scaler.is_enabled() else {}))
        bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{rate:.0f}",
                        **({"skipped": history["skipped"]} if history["skipped"] else {}))
        window[0], window[1] = window[0] + bad, window[1] + n_sum
        if window[0] > window[1] / 2 and window[1] >= tc.log_every and scale <= 1 \
                or not math.isfinite(loss_total):
            kept = f"{shown(ours)} was left as it was" if ours.is_file() else "nothing was saved"
            raise TrainingDiverged(
                f"training diverged at step {step}: {window[0]:.0f} of the last {window[1]} steps "
                f"had a non-finite loss or gradient; {kept}. Try a lower lr (it is {tc.lr:g}), "
                f"a longer warmup ({tc.warmup}) or a smaller grad_clip ({tc.grad_clip:g})"
                + (f", resuming with --resume {shown(ours)}" if ours.is_file() else ""))
        if window[1] >= tc.log_every:
            window[0] = window[1] = 0
        sums.zero_()
        n_sum, t_last, step_last = 0, now, step

    log.write("start", step, resume=tc.resume, precision=precision, device=str(device),
              processes=world, config=dataclasses.asdict(cfg))
    model.train()
    # Resume mid-epoch: the same order as an uninterrupted run, minus the batches already seen.
    epoch, skip = divmod(step, steps_per_epoch)
    mine = slice(rank * local, (rank + 1) * local)  # this process's share of a global batch
    bar = tqdm(total=tc.steps, initial=step, disable=not progress or rank > 0,
               desc=f"train ({precision})")
    # over the steps that were finite: the loss and gradient norm summed; the steps that were
    # not; a stop request
    sums, n_sum, t_last, step_last = torch.zeros(4, device=device), 0, time.time(), step
    window = [0, 0]  # skipped and all steps since divergence was last judged
    saved, stop, interrupted, error = step, False, False, None  # `saved`: the step on disk
    try:
        while step < tc.steps:
            for idx in batch_indices(len(images), tc.batch_size, tc.seed, epoch, skip, rank,
                                     world):
                torch.manual_seed(stream_seed(tc.seed, DROPOUT, step, rank))  # per process
                # 1. learning rate
                lr = lr_at(step, tc)
                for group in opt.param_groups:
                    group["lr"] = lr
                # 2. this step's randomness, drawn for the global batch, and this process's data
                t, noise, u = step_randomness(tc.seed, step, (tc.batch_size, *images.shape[1:]),
                                              schedule.T, device)
                t, noise, u = t[mine], noise[mine], u[mine]
                x0 = to_device(images[idx], device, u[:, 0] < 0.5 if cfg.data.hflip else None)
                x0 = x0.contiguous(memory_format=fmt)  # (B_local, C, H, W) in [-1, 1]
                y = None
                if mc.num_classes:  # classifier-free guidance: some labels become "no label"
                    y = torch.where(u[:, 1] < tc.label_dropout, mc.num_classes,
                                    labels[idx].to(device, non_blocking=True))
                # 3. forward / backward, in `grad_accum` micro-batches; DDP averages at the last
                opt.zero_grad(set_to_none=True)
                step_loss = torch.zeros((), device=device)
                for k in range(tc.grad_accum):
                    part = slice(k * micro, (k + 1) * micro)
                    sync = contextlib.nullcontext() if world == 1 or k == tc.grad_accum - 1 \
                        else ddp.no_sync()
                    with sync:
                        with autocast(device, amp):
                            loss = simple_loss(net, schedule, x0[part],
                                               cfg.diffusion.min_snr_gamma,
                                               cfg.diffusion.prediction, t=t[part],
                                               noise=noise[part],
                                               y=None if y is None else y[part])
                        scaler.scale(loss / tc.grad_accum).backward()
                    step_loss += loss.detach() / tc.grad_accum
                # a signal waits while the weights, optimizer, EMA, step and log change together
                with interrupts.held():
                    # 4. clip, step: a step whose gradient is not finite (one bad batch, or an
                    # fp16 overflow) is skipped on the device, without a synchronisation, and
                    # counted. fp16: the gradients are unscaled first, and the scaler, told of
                    # the overflow by unscale_, lowers its scale (GradScaler.step would skip the
                    # same steps: its found_inf is ours, as the gradients are the same tensors)
                    scaler.unscale_(opt)
                    norm = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
                    bad = ~torch.isfinite(norm)  # the same on every process (DDP averaged)
                    if fused:  # the fused AdamW kernel skips the update where found_inf is 1
                        opt.found_inf = bad.float()
                        opt.step()
                    elif not bad:  # MPS: one synchronisation a step
                        opt.step()
                    scaler.update()
                    # 5. EMA: ema <- ema + (1 - decay) (params - ema); the same on every process
                    torch._foreach_lerp_(ema_params, params,
                                         1.0 - ema_decay_at(step, tc.ema_decay))
                    sums[:3] += torch.stack([torch.where(bad, 0.0, step_loss), bad.float(),
                                             torch.where(bad, 0.0, norm.float())])
                    step += 1
                    n_sum += 1
                    bar.update(1)
                    # 6. log, and before each checkpoint: the only reads from the device
                    save_due = (tc.checkpoint_every and step % tc.checkpoint_every == 0
                                and step < tc.steps)
                    if step % tc.log_every == 0 or step == tc.steps or save_due:
                        take_reading()
                if stop:  # torchrun: every process stops at this step
                    raise KeyboardInterrupt
                # 7. sample and evaluate, 8. checkpoint: rank 0 only
                if (rank == 0 and tc.sample_every and tc.sample_n
                        and step % tc.sample_every == 0 and step < tc.steps):
                    write_samples()
                if rank == 0 and tc.eval_every and (step % tc.eval_every == 0
                                                    or step == tc.steps):
                    history["eval"].append(run_eval())
                    log.write("eval", step, **{k: v for k, v in history["eval"][-1].items()
                                               if k != "step"})
                    bar.set_postfix(loss=f"{history['loss'][-1]:.4f}",
                                    fid=f"{history['eval'][-1]['fid']:.3g}")
                if rank == 0 and save_due:
                    with interrupts.held():
                        write_checkpoint()
                        saved = step
                if step >= tc.steps:
                    break
            epoch, skip = epoch + 1, 0
    except KeyboardInterrupt:  # Ctrl-C, a notebook's Interrupt, SIGTERM: keep what was trained
        interrupted = True
    except Exception as e:  # out of memory while sampling, say: keep what was trained, then say
        error = e
    bar.close()
    # the end, an interrupt or an error outside an update (a diverged run ends inside one)
    if rank == 0 and step > saved and not interrupts.torn:
        try:
            with contextlib.suppress(KeyboardInterrupt), interrupts.held():  # Ctrl-C again waits
                if interrupted or error:
                    tqdm.write(f"writing a checkpoint at step {step} to {shown(ours)}")
                if n_sum and world == 1:
                    take_reading()  # the steps since the last reading
                write_checkpoint()
        except Exception as e:
            raise e from error
    if error:
        raise error
    if interrupted:
        if rank == 0:
            tqdm.write(f"interrupted at step {step}: " + (
                f"continue with --resume {shown(ours)} (resume='{shown(ours)}')"
                if ours.is_file() else "nothing was saved"))
    elif rank == 0 and tc.sample_n:
        write_samples()
    if world > 1:
        dist.barrier()
        if own_group:
            dist.destroy_process_group()
    return history

