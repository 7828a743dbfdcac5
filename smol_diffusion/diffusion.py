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


PREDICTIONS = ("eps", "x0", "v")


def target(x0: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor,
           prediction: str) -> torch.Tensor:
    """What the network learns to output for x_t = alpha x0 + sigma eps: eps (Ho et al.), x0,
    or v = alpha eps - sigma x0 (Salimans & Ho 2022, Sec. 4)."""
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    if prediction == "v":
        return alpha * eps - sigma * x0
    raise ValueError(f"unknown prediction {prediction!r}; choose one of {', '.join(PREDICTIONS)}")


def eps_x0_from_output(out: torch.Tensor, xt: torch.Tensor, alpha: torch.Tensor,
                       sigma: torch.Tensor, prediction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(eps_hat, x0_hat) from the network's output `out`, the inverse of `target`."""
    if prediction == "eps":
        return out, (xt - sigma * out) / alpha  # Eq. 15 (Ho et al.)
    if prediction == "x0":
        return (xt - alpha * out) / sigma, out
    if prediction == "v":
        return sigma * xt + alpha * out, alpha * xt - sigma * out  # Salimans & Ho, Sec. 4
    raise ValueError(f"unknown prediction {prediction!r}; choose one of {', '.join(PREDICTIONS)}")


def denoise(model: nn.Module, schedule: NoiseSchedule, xt: torch.Tensor, i: torch.Tensor,
            clip: bool = True, prediction: str = "eps") -> tuple[torch.Tensor, torch.Tensor]:
    """Run the network and return (eps_hat, x0_hat) at step indices i (B,) of `schedule`.

    The network is called with the training timesteps `schedule.timesteps[i]`, so a respaced
    schedule feeds it the timesteps it was trained on; its output is read as `prediction`
    (eps, x0 or v). x0_hat is clipped to [-1, 1] when `clip`; eps_hat is then recomputed from
    the clipped x0_hat so the two stay consistent.
    """
    t = schedule.timesteps.to(xt.device)[i]
    ab = extract(schedule.alpha_bar, i, xt.shape)
    alpha, sigma = ab.sqrt(), (1 - ab).sqrt()
    eps_hat, x0_hat = eps_x0_from_output(model(xt, t).float(), xt, alpha, sigma, prediction)
    if clip:
        x0_hat = x0_hat.clamp(-1, 1)
        eps_hat = (xt - alpha * x0_hat) / sigma
    return eps_hat, x0_hat


def simple_loss(model: nn.Module, schedule: NoiseSchedule, x0: torch.Tensor,
                min_snr_gamma: float | None = None, prediction: str = "eps",
                t: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                y: torch.Tensor | None = None) -> torch.Tensor:
    """L_simple (Ho et al. Eq. 14): || target - net(x_t, t) ||^2 with t ~ U{0..T-1}, where the
    target is eps (Ho et al.'s choice), x0 or v (`target`).

    With `min_snr_gamma`, each image's error is weighted as Min-SNR-gamma prescribes for that
    target (Hang et al. 2023, Sec. 3.4), SNR_t = alpha_bar_t / (1 - alpha_bar_t): the weight
    on the x0 error is min(SNR_t, gamma), which is min(SNR_t, gamma) / SNR_t on the eps error
    and min(SNR_t, gamma) / (SNR_t + 1) on the v error; the nearly clean timesteps count less.
    Where SNR_t = 0 (the last step of a zero-terminal-SNR schedule) those weights are 0, which
    would leave untrained the very step that schedule exists for, so it gets weight 1 there
    (as diffusers' training scripts do).

    t and noise are drawn here unless given; `y` (B,) are class labels for a conditional model.
    """
    if t is None:
        t = torch.randint(0, schedule.T, (x0.shape[0],), device=x0.device)  # (B,)
    if noise is None:
        noise = torch.randn_like(x0)
    ab = extract(schedule.alpha_bar, t, x0.shape)
    goal = target(x0, noise, ab.sqrt(), (1 - ab).sqrt(), prediction)
    xt = q_sample(schedule, x0, t, noise)
    out = model(xt, t) if y is None else model(xt, t, y)
    if out.shape != goal.shape:  # a broadcast here would train the wrong model silently
        raise ValueError(f"the network's output {tuple(out.shape)} does not match its target "
                         f"{tuple(goal.shape)}; set out_channels to in_channels (or None)")
    if min_snr_gamma is None:
        return F.mse_loss(out.float(), goal)
    snr = (ab / (1 - ab)).flatten()  # (B,)
    clipped = snr.clamp(max=min_snr_gamma)
    weight = {"eps": clipped / snr, "x0": clipped, "v": clipped / (snr + 1)}[prediction]
    weight = torch.where(snr == 0, 1.0, weight)  # (B,)
    return (weight * (out.float() - goal).pow(2).mean(dim=(1, 2, 3))).mean()
