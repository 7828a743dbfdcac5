"""Batches: which images each step of a run sees, on which process, and their way to the device.

Every random draw of a run comes from its own stream, seeded by (seed, stream, index), so a
resumed or distributed run draws exactly what one uninterrupted process draws.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from .data import to_model_range

# The random streams of a run, each seeded by (seed, stream, index): see stream_seed.
ORDER, STEP, DROPOUT = 0, 1, 2


def stream_seed(seed: int, *keys: int) -> int:
    """A 64-bit seed for one random stream of a run, e.g. (seed, STEP, step) for the draws of
    one step: distinct keys give unrelated streams (numpy's SeedSequence hashing), the same on
    every process and machine, so a resumed or distributed run draws what a single one does."""
    return int(np.random.SeedSequence(seed, spawn_key=keys).generate_state(1, np.uint64)[0])


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """A random order of n indices for one epoch, seeded by (seed, epoch), so a resumed run
    sees the data in the same order as an uninterrupted one."""
    g = torch.Generator().manual_seed(stream_seed(seed, ORDER, epoch))
    return torch.randperm(n, generator=g)


def batch_indices(n: int, batch_size: int, seed: int, epoch: int, skip: int = 0,
                  rank: int = 0, world: int = 1) -> Iterator[torch.Tensor]:
    """The image indices of each full batch of one epoch, in `epoch_order`; the first `skip`
    batches are left out (a resumed run). With `world` processes, `batch_size` is the global
    batch and process `rank` gets its own consecutive 1/world of each (a distributed sampler
    whose union over ranks is the single-process batch)."""
    order, local = epoch_order(n, seed, epoch), batch_size // world
    for start in range(skip * batch_size, n - batch_size + 1, batch_size):
        yield order[start + rank * local:start + (rank + 1) * local]


def to_device(batch: torch.Tensor, device: torch.device,
              flip: torch.Tensor | None = None) -> torch.Tensor:
    """A uint8 batch as floats in [-1, 1] on `device`, the images where the boolean mask
    `flip` (B,) is true flipped left-right. On CUDA the batch goes through pinned memory and is
    copied without blocking, and the conversion and flips run on the GPU."""
    if device.type == "cuda":
        batch = batch.pin_memory()
    x = to_model_range(batch.to(device, non_blocking=True))  # (B, C, H, W)
    if flip is not None:
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    return x


def step_randomness(seed: int, step: int, shape: tuple[int, ...], T: int,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The random draws of one training step for a global batch of `shape` (B, C, H, W), from a
    generator seeded by (seed, step): timesteps t (B,), noise like the images, and uniforms
    (B, 2) for the flips and the label dropout."""
    g = torch.Generator(device).manual_seed(stream_seed(seed, STEP, step))
    t = torch.randint(0, T, shape[:1], generator=g, device=device)
    noise = torch.randn(shape, generator=g, device=device)
    return t, noise, torch.rand(shape[0], 2, generator=g, device=device)
