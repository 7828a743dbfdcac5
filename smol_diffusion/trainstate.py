"""A training run's state in one place (`Run`): what `setup` builds before the loop, how far
the run has got, and what the loop writes between steps (samples, evaluations, checkpoints)."""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from .checkpoint import Checkpoint, class_columns, resume_from, save_checkpoint
from .config import Config
from .data import TensorImages, make_dataset
from .evaluate import FEATURE_METRICS, default_metrics, evaluate, optional_extractor
from .features import Extractor
from .hardware import (DTYPES, compile_model, distributed_env, grad_scaler, resolve_precision,
                       setup_device)
from .runlog import RunLog
from .schedule import NoiseSchedule
from .unet import UNet
from .viz import display_inline, save_grid, to_grid

EMPTY_HISTORY = {"step": [], "loss": [], "lr": [], "img_per_s": [], "grad_norm": [], "eval": [],
                 "skipped": 0}


@dataclass
class Run:
    """A training run: its settings, what it trains with, and how far it has got (`step`,
    `saved`, `history`). The training loop advances it."""

    cfg: Config
    rank: int  # this process, of `world` (torchrun; 0 of 1 otherwise)
    world: int
    own_group: bool  # `setup_device` started the process group, so the run ends it
    device: torch.device
    precision: str  # "bf16", "fp16" or "fp32" (resolve_precision)
    dataset: TensorImages
    schedule: NoiseSchedule
    model: UNet  # the weights
    ema: UNet
    net: torch.nn.Module  # the training forward: `model` under DDP and compile, where asked
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # fp16: loss scaling; off otherwise
    log: RunLog
    progress: bool  # progress bars
    extractor: Extractor | None  # for evaluations (eval_every > 0, on rank 0)
    step: int = 0
    saved: int = 0  # the step of the checkpoint on disk
    history: dict = dataclasses.field(default_factory=lambda: copy.deepcopy(EMPTY_HISTORY))

    @property
    def ckpt_path(self) -> Path:
        return Path(self.cfg.train.out_dir) / "ckpt.pt"

    @property
    def classes(self) -> list[str] | None:
        """A conditional model's class names (None for an unconditional one)."""
        return self.dataset.classes if self.cfg.model.num_classes else None

    def checkpoint(self) -> Checkpoint:
        """The EMA model as a loaded checkpoint would give it."""
        return Checkpoint(self.ema, self.schedule, self.cfg, self.step, self.history, self.classes)

    def write_samples(self) -> None:
        """A grid from the EMA model into out_dir (inline in a notebook) and the run log."""
        tc = self.cfg.train
        x = self.checkpoint().sample(tc.sample_n, generator=torch.Generator().manual_seed(tc.seed))
        nrow = class_columns(tc.sample_n, self.cfg.model.num_classes)
        display_inline(save_grid(x, Path(tc.out_dir) / f"samples_{self.step:07d}.png", nrow))
        self.log.image("samples", to_grid(x, nrow), self.step)

    def evaluate(self) -> dict:
        """The EMA model's metrics (`evaluate`, but bits/dim), recorded in history and log."""
        tc = self.cfg.train
        metrics = tuple(m for m in default_metrics(self.cfg, self.extractor) if m != "bpd"
                        and (self.extractor or m not in FEATURE_METRICS))
        rows = evaluate(self.checkpoint(), tc.eval_n, metrics=metrics, extractor=self.extractor,
                        seed=tc.seed, cache_dir=self.cfg.data.cache_dir, progress=False)
        values = {r["metric"]: r["value"] for r in rows}
        for r in rows:  # the real floor the distance is read against
            if r["metric"] == "swd":
                values["swd_floor"] = r["floor"]
        self.history["eval"].append({"step": self.step} | values)
        self.log.write("eval", self.step, **values)
        return values

    def write_checkpoint(self) -> None:
        """Everything a resume needs, to out_dir/ckpt.pt (atomically: `save_checkpoint`)."""
        save_checkpoint(self.ckpt_path, {
            "model": self.model.state_dict(), "ema": self.ema.state_dict(),
            "optimizer": self.opt.state_dict(), "scaler": self.scaler.state_dict(),
            "step": self.step, "config": dataclasses.asdict(self.cfg), "history": self.history,
            "classes": self.classes})
        self.saved = self.step


def setup(cfg: Config, progress: bool, log: RunLog) -> Run:
    """The device, data, model, EMA and optimizer of a run, and (resuming) its state so far."""
    tc, mc = cfg.train, cfg.model
    rank, world, local_rank = distributed_env()
    device, own_group = setup_device(tc.device, world, local_rank)
    if rank > 0:
        dist.barrier()  # rank 0 builds the image cache first
    dataset = make_dataset(cfg.data, mc.image_size, mc.in_channels, progress and rank == 0)
    if rank == 0 and world > 1:
        dist.barrier()
    cfg.check_dataset(len(dataset.images), dataset.classes)
    torch.manual_seed(tc.seed)  # the same initial weights on every process
    fmt = torch.channels_last if tc.channels_last else torch.contiguous_format
    model = UNet(mc).to(device, memory_format=fmt)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world > 1 else model
    # one fused kernel for the whole update where PyTorch has it (CUDA, CPU), else foreach
    fused = device.type in ("cuda", "cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay,
                            fused=fused, foreach=None if fused else True)
    precision = resolve_precision(tc.precision, device)
    # built now, so that missing Inception weights are said before the run trains, not after
    extractor = optional_extractor(cfg, cfg.data.cache_dir, device=device) \
        if rank == 0 and tc.eval_every else None
    schedule = NoiseSchedule.from_name(cfg.diffusion.schedule, cfg.diffusion.T,
                                       cfg.diffusion.zero_terminal_snr)
    run = Run(cfg, rank, world, own_group, device, precision, dataset, schedule, model, ema,
              compile_model(ddp, tc.compile, device), opt, grad_scaler(device, DTYPES[precision]),
              log, progress, extractor)
    if tc.resume:
        run.step, stored = resume_from(tc.resume, cfg, model, ema, opt, run.scaler)
        run.history |= stored
    run.saved = run.step
    return run
