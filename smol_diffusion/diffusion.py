"""The forward process q(x_t | x_0), the denoiser wrapper, and the training loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .schedule import NoiseSchedule, extract


def q_sample(schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor,
             noise: torch.Tensor) -> torch.Tensor:
    """Draw x_t ~ q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I) (Ho et al. Eq. 4)."""
    ab = extract(schedule.alpha_bar, t, x0.shape)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


def q_posterior(schedule: NoiseSchedule, x0: torch.Tensor, xt: torch.Tensor,
                t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of q(x_{t-1} | x_t, x_0) (Ho et al. Eq. 6-7)."""
    mean = (extract(schedule.posterior_mean_coef1, t, xt.shape) * x0
            + extract(schedule.posterior_mean_coef2, t, xt.shape) * xt)
    return mean, extract(schedule.posterior_variance, t, xt.shape)


def denoise(model: nn.Module, schedule: NoiseSchedule, xt: torch.Tensor, i: torch.Tensor,
            clip: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the network and return (eps_hat, x0_hat) at step indices i (B,) of `schedule`.

    The network is called with the training timesteps `schedule.timesteps[i]`, so a respaced
    schedule feeds it the timesteps it was trained on. x0_hat = (x_t - sqrt(1 - alpha_bar)
    eps_hat) / sqrt(alpha_bar) (Ho et al. Eq. 15), clipped to [-1, 1] when `clip`; eps_hat is
    then recomputed from the clipped x0_hat so the two stay consistent.
    """
    t = schedule.timesteps.to(xt.device)[i]
    eps_hat = model(xt, t).float()
    ab = extract(schedule.alpha_bar, i, xt.shape)
    x0_hat = (xt - (1 - ab).sqrt() * eps_hat) / ab.sqrt()
    if clip:
        x0_hat = x0_hat.clamp(-1, 1)
        eps_hat = (xt - ab.sqrt() * x0_hat) / (1 - ab).sqrt()
    return eps_hat, x0_hat


def simple_loss(model: nn.Module, schedule: NoiseSchedule, x0: torch.Tensor,
                min_snr_gamma: float | None = None) -> torch.Tensor:
    """L_simple (Ho et al. Eq. 14): || eps - eps_theta(x_t, t) ||^2 with t ~ U{0..T-1}.

    With `min_snr_gamma`, each image's error is weighted by min(SNR_t, gamma) / SNR_t, the
    Min-SNR-gamma weighting for eps prediction (Hang et al. 2023, Eq. 9), SNR_t =
    alpha_bar_t / (1 - alpha_bar_t): the nearly clean timesteps count less.
    """
    t = torch.randint(0, schedule.T, (x0.shape[0],), device=x0.device)  # (B,)
    noise = torch.randn_like(x0)
    eps_hat = model(q_sample(schedule, x0, t, noise), t)
    if min_snr_gamma is None:
        return F.mse_loss(eps_hat.float(), noise)
    ab = extract(schedule.alpha_bar, t, x0.shape).flatten()  # (B,)
    snr = ab / (1 - ab)
    weight = snr.clamp(max=min_snr_gamma) / snr
    return (weight * (eps_hat.float() - noise).pow(2).mean(dim=(1, 2, 3))).mean()
