"""The training loop's loss readings: what it sums on the device between two of them, what a
reading reports, when a run has diverged, and (torchrun) a stop request shared by processes."""
from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist


class Readings:
    """Sums of the loss and gradient norm over the steps since the last reading, kept on the
    device so that a step needs no synchronisation; `read` brings them back every `log_every`
    steps (the loop's one synchronisation) and judges divergence.

    A step whose gradient was not finite is skipped by the optimizer and counted here, not
    summed. A run has diverged when, over at least `log_every` steps since divergence was last
    judged, over half were skipped (in fp16, once the loss scale has also fallen to 1: the
    scaler's own skips, as it lowers the scale, are no divergence), or when a sum is no longer
    finite. Under torchrun the sums are averaged over processes and a stop request (Ctrl-C in
    one of them) is shared, so that every process stops at the same step."""

    def __init__(self, step: int, batch_size: int, log_every: int,
                 device: torch.device | str = "cpu", world: int = 1):
        self.batch_size, self.log_every, self.world = batch_size, log_every, world
        # over the finite steps: the loss and gradient norm summed; the steps that were not;
        # a stop request
        self.sums = torch.zeros(4, device=device)
        self.pending = 0  # steps since the last reading
        self.time, self.step = time.time(), step  # at the last reading
        self.bad = self.seen = 0  # skipped and all steps since divergence was last judged
        self.stop = False  # some process asked to stop (set by `read`)
        self.diverged: str | None = None  # "12 of the last 20 steps", once a run diverged

    def add(self, loss: torch.Tensor, norm: torch.Tensor, bad: torch.Tensor) -> None:
        """Count one step: its loss and gradient norm (0-dim tensors on the device) unless
        `bad` (a 0-dim bool tensor: its gradient was not finite, so the update was skipped)."""
        self.sums[:3] += torch.stack([torch.where(bad, 0.0, loss), bad.float(),
                                      torch.where(bad, 0.0, norm.float())])
        self.pending += 1

    def read(self, step: int, stop: bool = False, loss_scale: float = 1.0) -> dict:
        """The steps since the last reading, read back: {"loss", "grad_norm"} (means over the
        finite steps, NaN where there were none), "img_per_s" and "skipped" (this reading's).
        `stop`: under torchrun, this process asks every one to stop (`self.stop`). Sets
        `self.diverged` when the run has diverged; starts the next reading's sums."""
        if self.world > 1:
            self.sums[3] = float(stop)
            dist.all_reduce(self.sums)
        loss_total, bad, norm_total, stops = (v / self.world for v in self.sums.tolist())
        self.stop = stops > 0
        now = time.time()
        finite = self.pending - bad
        reading = {"loss": loss_total / finite if finite > 0 else math.nan,
                   "grad_norm": norm_total / finite if finite > 0 else math.nan,
                   "img_per_s": (step - self.step) * self.batch_size / max(now - self.time, 1e-9),
                   "skipped": int(bad)}
        self.bad, self.seen = self.bad + bad, self.seen + self.pending
        if (self.bad > self.seen / 2 and self.seen >= self.log_every and loss_scale <= 1
                or not math.isfinite(loss_total)):
            self.diverged = f"{self.bad:.0f} of the last {self.seen} steps"
        if self.seen >= self.log_every:
            self.bad = self.seen = 0
        self.sums.zero_()
        self.pending, self.time, self.step = 0, now, step
        return reading
