"""The training loop: `train`, then `_loop`, one step in numbered sections (its command line:
`smol-diffusion train`, cli.py; the run's state: trainstate.py)."""
from __future__ import annotations

import contextlib
import dataclasses
import math
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .batches import DROPOUT, batch_indices, step_randomness, stream_seed, to_device
from .checkpoint import check_out_dir
from .config import Config
from .diffusion import simple_loss
from .files import lock_folder, shown
from .hardware import DTYPES, autocast, distributed_env
from .interrupts import Interrupts
from .readings import Readings
from .runlog import RunLog
from .trainstate import EMPTY_HISTORY, Run, setup
from .viz import display_inline


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

    A run owns its folder. Where it holds the finished run of the same settings, there is
    nothing to do: its history is returned (`check_out_dir`); any other checkpoint there is
    refused unless `overwrite`, and so is a second live run there. A step whose gradient is not
    finite (one bad batch) is skipped and counted in `history["skipped"]`; when over half the
    steps between two loss readings are, the run has diverged and stops with `TrainingDiverged`
    before it writes another checkpoint. Ctrl-C (a notebook's Interrupt) or SIGTERM writes a
    checkpoint at the step reached and returns the history so far; `resume` goes on from
    exactly there.

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
        done = check_out_dir(cfg)
        if done is not None:  # this very run, finished: nothing to train
            if rank == 0:
                _show_finished(cfg, int(done["step"]))
            return EMPTY_HISTORY | done.get("history", {})
        with contextlib.closing(RunLog(tc.out_dir, enabled=rank == 0)) as log:
            return _train(setup(cfg, progress, log), interrupts)


class TrainingDiverged(RuntimeError):
    """The loss or the gradients stopped being finite; the message says what to try."""


def _show_finished(cfg: Config, step: int) -> None:
    """Say that out_dir holds this run, finished, and show its last sample grid inline."""
    out_dir = Path(cfg.train.out_dir)
    print(f"{shown(out_dir / 'ckpt.pt')} holds this run, finished at step {step}: nothing to "
          "train (overwrite=True, --overwrite true, trains it anew)")
    grid = out_dir / f"samples_{step:07d}.png"
    if grid.is_file():
        display_inline(grid)


def _take_reading(run: Run, readings: Readings, bar: tqdm, stop: bool = False) -> None:
    """Read the loss back (`Readings.read`), record it in the history, the log and the progress
    bar; raise TrainingDiverged, before another checkpoint is written, if the run diverged."""
    tc, ours = run.cfg.train, run.ckpt_path
    lr = run.opt.param_groups[0]["lr"]  # the last step's
    r = readings.read(run.step, stop, run.scaler.get_scale())
    for name, value in (("step", run.step), ("loss", r["loss"]), ("lr", lr),
                        ("img_per_s", r["img_per_s"]), ("grad_norm", r["grad_norm"])):
        run.history[name].append(value)
    run.history["skipped"] += r["skipped"]
    scale = {"loss_scale": run.scaler.get_scale()} if run.scaler.is_enabled() else {}
    run.log.write("train", run.step, loss=r["loss"], lr=lr, img_per_s=r["img_per_s"],
                  grad_norm=r["grad_norm"], skipped=r["skipped"], **scale)
    skipped = run.history["skipped"]
    bar.set_postfix(loss=f"{r['loss']:.4f}", img_s=f"{r['img_per_s']:.0f}",
                    **({"skipped": skipped} if skipped else {}))
    if readings.diverged:
        kept = f"{shown(ours)} was left as it was" if ours.is_file() else "nothing was saved"
        raise TrainingDiverged(
            f"training diverged at step {run.step}: {readings.diverged} had a non-finite loss "
            f"or gradient; {kept}. Try a lower lr (it is {tc.lr:g}), a longer warmup "
            f"({tc.warmup}) or a smaller grad_clip ({tc.grad_clip:g})"
            + (f", resuming with --resume {shown(ours)}" if ours.is_file() else ""))


def _loop(run: Run, interrupts: Interrupts, readings: Readings, bar: tqdm) -> None:
    """Train from `run.step` to `steps`, each step in the numbered sections below. Raises
    KeyboardInterrupt where a process was asked to stop (every process at the same step)."""
    cfg, tc, mc = run.cfg, run.cfg.train, run.cfg.model
    images, labels = run.dataset.images, run.dataset.labels
    local, micro = tc.per_process(run.world)  # images per process, per micro-batch
    mine = slice(run.rank * local, (run.rank + 1) * local)  # this process's share of a batch
    fmt = torch.channels_last if tc.channels_last else torch.contiguous_format
    amp = DTYPES[run.precision]  # autocast's dtype: bf16, fp16 or None (fp32)
    params, ema_params = list(run.model.parameters()), list(run.ema.parameters())
    fused = run.device.type in ("cuda", "cpu")  # as `setup` built the optimizer
    # Resume mid-epoch: the same order as an uninterrupted run, minus the batches already seen.
    epoch, skip = divmod(run.step, len(images) // tc.batch_size)
    while run.step < tc.steps:
        for idx in batch_indices(len(images), tc.batch_size, tc.seed, epoch, skip, run.rank,
                                 run.world):
            torch.manual_seed(stream_seed(tc.seed, DROPOUT, run.step, run.rank))  # per process
            # 1. learning rate
            for group in run.opt.param_groups:
                group["lr"] = lr_at(run.step, tc)
            # 2. this step's randomness, drawn for the global batch, and this process's data
            t, noise, u = step_randomness(tc.seed, run.step, (tc.batch_size, *images.shape[1:]),
                                          run.schedule.T, run.device)
            t, noise, u = t[mine], noise[mine], u[mine]
            x0 = to_device(images[idx], run.device, u[:, 0] < 0.5 if cfg.data.hflip else None)
            x0 = x0.contiguous(memory_format=fmt)  # (B_local, C, H, W) in [-1, 1]
            y = None
            if mc.num_classes:  # classifier-free guidance: some labels become "no label"
                y = torch.where(u[:, 1] < tc.label_dropout, mc.num_classes,
                                labels[idx].to(run.device, non_blocking=True))
            # 3. forward / backward, in `grad_accum` micro-batches; DDP averages at the last
            run.opt.zero_grad(set_to_none=True)
            step_loss = torch.zeros((), device=run.device)
            for k in range(tc.grad_accum):
                part = slice(k * micro, (k + 1) * micro)
                sync = contextlib.nullcontext() if run.world == 1 or k == tc.grad_accum - 1 \
                    else run.net.no_sync()
                with sync:
                    with autocast(run.device, amp):
                        loss = simple_loss(run.net, run.schedule, x0[part],
                                           cfg.diffusion.min_snr_gamma, cfg.diffusion.prediction,
                                           t=t[part], noise=noise[part],
                                           y=None if y is None else y[part])
                    run.scaler.scale(loss / tc.grad_accum).backward()
                step_loss += loss.detach() / tc.grad_accum
            # a signal waits while the weights, optimizer, EMA, step and log change together
            with interrupts.held():
                # 4. clip, step: a step whose gradient is not finite (one bad batch, or an fp16
                # overflow) is skipped on the device, without a synchronisation, and counted.
                # fp16: the gradients are unscaled first, and the scaler, told of the overflow
                # by unscale_, lowers its scale (GradScaler.step would skip the same steps: its
                # found_inf is ours, as the gradients are the same tensors)
                run.scaler.unscale_(run.opt)
                norm = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
                bad = ~torch.isfinite(norm)  # the same on every process (DDP averaged)
                if fused:  # the fused AdamW kernel skips the update where found_inf is 1
                    run.opt.found_inf = bad.float()
                    run.opt.step()
                elif not bad:  # MPS: one synchronisation a step
                    run.opt.step()
                run.scaler.update()
                # 5. EMA: ema <- ema + (1 - decay) (params - ema); the same on every process
                torch._foreach_lerp_(ema_params, params, 1.0 - ema_decay_at(run.step, tc.ema_decay))
                readings.add(step_loss, norm, bad)
                run.step += 1
                bar.update(1)
                # 6. log, and before each checkpoint: the only reads from the device
                save_due = (tc.checkpoint_every and run.step % tc.checkpoint_every == 0
                            and run.step < tc.steps)
                if run.step % tc.log_every == 0 or run.step == tc.steps or save_due:
                    _take_reading(run, readings, bar, interrupts.pending)
            if readings.stop:  # torchrun: every process stops at this step
                raise KeyboardInterrupt
            # 7. sample and evaluate, 8. checkpoint: rank 0 only
            if run.rank == 0 and tc.sample_every and tc.sample_n \
                    and run.step % tc.sample_every == 0 and run.step < tc.steps:
                run.write_samples()
            if run.rank == 0 and tc.eval_every and (run.step % tc.eval_every == 0
                                                    or run.step == tc.steps):
                values = run.evaluate()
                postfix = {m: f"{values[m]:.3g}" for m in ("fid", "swd") if m in values}
                if run.history["loss"]:  # none yet when eval_every < log_every
                    postfix["loss"] = f"{run.history['loss'][-1]:.4f}"
                bar.set_postfix(**postfix)
            if run.rank == 0 and save_due:
                with interrupts.held():
                    run.write_checkpoint()
            if run.step >= tc.steps:
                break
        epoch, skip = epoch + 1, 0


def _train(run: Run, interrupts: Interrupts) -> dict:
    """`train` once its output folder is its own and `run` is set up: the loop, then whatever
    ended it (the last step, an interrupt, an error) followed by a checkpoint of the step
    reached and, at the end, the final sample grid."""
    tc, ours = run.cfg.train, run.ckpt_path
    run.log.write("start", run.step, resume=tc.resume, precision=run.precision,
                  device=str(run.device), processes=run.world,
                  config=dataclasses.asdict(run.cfg))
    run.model.train()
    readings = Readings(run.step, tc.batch_size, tc.log_every, run.device, run.world)
    bar = tqdm(total=tc.steps, initial=run.step, disable=not run.progress or run.rank > 0,
               desc=f"train ({run.precision})")
    interrupted, error = False, None
    try:
        _loop(run, interrupts, readings, bar)
    except KeyboardInterrupt:  # Ctrl-C, a notebook's Interrupt, SIGTERM: keep what was trained
        interrupted = True
    except Exception as e:  # out of memory while sampling, say: keep what was trained, then say
        error = e
    bar.close()
    # the end, an interrupt or an error outside an update (a diverged run ends inside one)
    if run.rank == 0 and run.step > run.saved and not interrupts.torn:
        try:
            with contextlib.suppress(KeyboardInterrupt), interrupts.held():  # Ctrl-C again waits
                if interrupted or error:
                    tqdm.write(f"writing a checkpoint at step {run.step} to {shown(ours)}")
                if readings.pending and run.world == 1:
                    _take_reading(run, readings, bar)  # the steps since the last reading
                run.write_checkpoint()
        except Exception as e:
            raise e from error
    if error:
        raise error
    if interrupted:
        if run.rank == 0:
            tqdm.write(f"interrupted at step {run.step}: " + (
                f"continue with --resume {shown(ours)} (resume='{shown(ours)}')"
                if ours.is_file() else "nothing was saved"))
    elif run.rank == 0 and tc.sample_n:
        run.write_samples()
    if run.world > 1:
        dist.barrier()
        if run.own_group:
            dist.destroy_process_group()
    return run.history
