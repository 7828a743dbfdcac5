"""Negative log-likelihood in bits/dim through the variational bound (Ho et al. 2020, Eq. 5).

    L = L_T + sum_{t>1} L_{t-1} + L_0
    L_T     = KL(q(x_T | x_0) || N(0, I))                    (the prior term)
    L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))  (Gaussians: closed form)
    L_0     = -log p(x_0 | x_1), a Gaussian discretised to the 256 levels of 8-bit images

computed at every one of the T steps for each image, as improved-diffusion's `calc_bpd_loop`
does, and divided by ln(2) times the number of dimensions. The bound holds for 8-bit data, so
the images are first rounded to the 8-bit grid.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm

from .diffusion import denoise, q_posterior, q_sample
from .samplers import randn
from .schedule import NoiseSchedule, extract


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Round images in [-1, 1] to the 256 levels an 8-bit file holds (as saving a PNG would)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor,
              logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) per element, in nats."""
    return 0.5 * (logvar2 - logvar1 - 1 + (logvar1 - logvar2).exp()
                  + (mean1 - mean2) ** 2 * (-logvar2).exp())


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor,
                                        log_scale: torch.Tensor) -> torch.Tensor:
    """log P(x) per element for x on the 8-bit grid of [-1, 1] under N(mean, e^(2 log_scale))
    integrated over x's bin of width 2/255 (Ho et al. Eq. 13); the end bins reach to -inf and
    +inf. In float64, with log Phi from `torch.special.log_ndtr` for the tails."""
    x, mean, log_scale = x.double(), mean.double(), log_scale.double()
    inv_scale = (-log_scale).exp()
    upper = (x - mean + 1 / 255) * inv_scale
    lower = (x - mean - 1 / 255) * inv_scale
    log_cdf_upper = torch.special.log_ndtr(upper)  # log Phi(upper)
    log_one_minus_cdf_lower = torch.special.log_ndtr(-lower)  # log (1 - Phi(lower))
    bin_mass = (torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp(min=1e-12)
    return torch.where(x < -0.999, log_cdf_upper,
                       torch.where(x > 0.999, log_one_minus_cdf_lower, bin_mass.log()))


def prior_bpd(schedule: NoiseSchedule, x0: torch.Tensor) -> torch.Tensor:
    """L_T in bits/dim for each image (B,): KL(q(x_T | x_0) || N(0, I))."""
    t = torch.full((x0.shape[0],), schedule.T - 1, device=x0.device, dtype=torch.long)
    ab = extract(schedule.alpha_bar, t, x0.shape).double()
    kl = normal_kl(ab.sqrt() * x0.double(), (1 - ab).log(), torch.zeros(()), torch.zeros(()))
    return kl.mean(dim=(1, 2, 3)) / math.log(2)


def vb_term_bpd(model: nn.Module, schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor,
                noise: torch.Tensor, variance: str = "small", clip: bool = True,
                prediction: str = "eps") -> torch.Tensor:
    """One term of the bound in bits/dim for each image (B,): L_{t-1} at step indices t (B,),
    the discretised decoder L_0 where t is 0. x0 must lie on the 8-bit grid (`quantize`)."""
    xt = q_sample(schedule, x0, t, noise)
    true_mean, _ = q_posterior(schedule, x0, xt, t)  # Eq. 7
    true_logvar = extract(schedule.posterior_log_variance_clipped, t, x0.shape)
    _, x0_hat = denoise(model, schedule, xt, t, clip, prediction)
    model_mean, _ = q_posterior(schedule, x0_hat, xt, t)
    model_logvar = extract(schedule.reverse_log_variance(variance), t, x0.shape)
    kl = normal_kl(true_mean.double(), true_logvar.double(), model_mean.double(),
                   model_logvar.double())
    nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_logvar)
    term = torch.where((t == 0).view(-1, 1, 1, 1), nll, kl)
    return term.mean(dim=(1, 2, 3)) / math.log(2)


@torch.no_grad()
def bits_per_dim(model: nn.Module, schedule: NoiseSchedule, x0: torch.Tensor, *,
                 variance: str = "small", clip: bool = True, prediction: str = "eps",
                 generator: torch.Generator | None = None, progress: bool = False) -> dict:
    """The variational bound on -log p(x0) in bits/dim, for images x0 (B, C, H, W) in [-1, 1].

    Runs the network once per step (T calls on the whole batch). Returns {"bpd": (B,) the
    total per image, "prior": (B,) L_T, "terms": (T,) each L_{t-1}, averaged over the batch}.
    """
    x0 = quantize(x0)
    terms = torch.zeros(schedule.T, dtype=torch.float64)
    total = prior_bpd(schedule, x0).cpu()
    prior = total.clone()
    was_training = model.training
    model.eval()
    try:
        for i in tqdm(reversed(range(schedule.T)), total=schedule.T, disable=not progress,
                      desc="bits/dim", leave=False):
            t = torch.full((x0.shape[0],), i, device=x0.device, dtype=torch.long)
            noise = randn(x0.shape, generator, x0.device)
            term = vb_term_bpd(model, schedule, x0, t, noise, variance, clip,
                               prediction).cpu()
            terms[i] = term.mean()
            total += term
    finally:
        model.train(was_training)
    return {"bpd": total, "prior": prior, "terms": terms}
