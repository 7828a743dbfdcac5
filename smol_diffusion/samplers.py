"""Reverse-process samplers: plain functions of (model, schedule, x_T), plus the front door.

Each sampler runs under `torch.no_grad()`, keeps no state between calls, and calls
`callback(info)` after every step with the step count, the training timestep, the new x and
the x0_hat it came from (the notebook draws the denoising trajectory from these).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .diffusion import denoise, q_posterior
from .hardware import autocast
from .schedule import NoiseSchedule, extract, spaced_timesteps

Callback = Callable[[dict], None]


def randn(shape: tuple[int, ...], generator: torch.Generator | None,
          device: torch.device) -> torch.Tensor:
    """Standard normal noise drawn on the generator's device, then moved to `device`.

    Drawing on the generator's device keeps a seeded CPU generator reproducible whatever device
    the model runs on.
    """
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device).to(device)


@torch.no_grad()
def sample_ddpm(model: nn.Module, schedule: NoiseSchedule, x: torch.Tensor, *,
                generator: torch.Generator | None = None, clip: bool = True,
                variance: str = "small", callback: Callback | None = None) -> torch.Tensor:
    """Ancestral sampling (Ho et al. 2020, Algorithm 2) over every step of `schedule`.

    x is x_T. A respaced schedule (`NoiseSchedule.respace`) gives the few-step sampler of
    Nichol & Dhariwal 2021. Each step draws x_{t-1} ~ N(mu_tilde(x_t, x0_hat), sigma_t^2 I)
    with sigma_t^2 = beta_tilde_t ("small") or beta_t ("large"; its first entry replaced by
    beta_tilde_1 as in improved-diffusion); the last step returns the mean.
    """
    log_var = schedule.reverse_log_variance(variance)
    B = x.shape[0]
    for n, i in enumerate(reversed(range(schedule.T))):
        idx = torch.full((B,), i, device=x.device, dtype=torch.long)
        _, x0_hat = denoise(model, schedule, x, idx, clip)  # 1. predict x0 from x_t
        mean, _ = q_posterior(schedule, x0_hat, x, idx)  # 2. Eq. 7: mu_tilde(x_t, x0_hat)
        if i > 0:  # 3. add noise, except at the last step (Algorithm 2, line 3)
            sigma = (0.5 * extract(log_var, idx, x.shape)).exp()
            x = mean + sigma * randn(x.shape, generator, x.device)
        else:
            x = mean
        if callback is not None:
            callback({"n": n, "t": int(schedule.timesteps[i]), "x": x, "x0_hat": x0_hat})
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {"ddpm": sample_ddpm}


def sample(model: nn.Module, schedule: NoiseSchedule, shape: tuple[int, ...], *,
           sampler: str = "ddpm", steps: int | None = None, timesteps: list[int] | None = None,
           noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
           callback: Callback | None = None, clip: bool = True, variance: str = "small",
           bf16: bool = False) -> torch.Tensor:
    """Draw a batch of images in [-1, 1] with shape `shape` (B, C, H, W).

    `schedule` is the T-step schedule the model was trained with. Sampling uses all T steps,
    or `steps` evenly spaced ones, or the explicit decreasing training `timesteps`; fewer
    steps always respace that same schedule. `noise` is x_T (drawn from `generator` if
    omitted). The model runs in eval mode, under bf16 autocast if `bf16`. With `clip` (the
    default) x0_hat and the result are clipped to [-1, 1].
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if steps is not None and timesteps is not None:
        raise ValueError("give steps or timesteps, not both")
    if timesteps is not None:
        ts = [int(t) for t in timesteps]
        if any(a <= b for a, b in zip(ts, ts[1:])):
            raise ValueError(f"timesteps must be strictly decreasing, got {ts}")
        schedule = schedule.respace(ts)
    elif steps is not None and steps != schedule.T:
        schedule = schedule.respace(spaced_timesteps(schedule.T, steps))
    device = next(model.parameters()).device
    if noise is None:
        noise = randn(tuple(shape), generator, device)
    elif tuple(noise.shape) != tuple(shape):
        raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(shape)}")
    was_training = model.training
    model.eval()
    try:
        with autocast(device, bf16):
            x = SAMPLERS[sampler](model, schedule, noise.to(device), generator=generator,
                                  clip=clip, variance=variance, callback=callback)
    finally:
        model.train(was_training)
    return x.clamp(-1, 1) if clip else x
