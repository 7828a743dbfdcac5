"""Reverse-process samplers: plain functions of (model, schedule, x_T, timesteps), and the
front door `sample`.

Every sampler runs under `torch.no_grad()`, keeps no state between calls, evaluates the
network once at each of the decreasing training `timesteps` (so NFE = len(timesteps)), ends
on the clean image, and calls `callback(info)` after every step with the step count `n`, the
training timestep `t`, the new `x` and the `x0_hat` it came from (the notebook draws the
denoising trajectory from these). Notation: alpha_t = sqrt(alpha_bar_t), sigma_t =
sqrt(1 - alpha_bar_t), lambda_t = log(alpha_t / sigma_t) (half the log-SNR); "clean" after the
last timestep means alpha = 1, sigma = 0.
"""
from __future__ import annotations

import math
from itertools import pairwise
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .diffusion import denoise, q_posterior
from .hardware import autocast, autocast_dtype
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


def _predict(model, schedule, x, t: int, clip, prediction) -> tuple[torch.Tensor, torch.Tensor]:
    """(eps_hat, x0_hat) at training timestep t for the whole batch (the shared step helper)."""
    idx = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
    return denoise(model, schedule, x, idx, clip, prediction)


def _alpha_sigma(schedule: NoiseSchedule, t: int | None) -> tuple[float, float]:
    """(alpha_t, sigma_t) as float64 numbers; t None is the clean end (1, 0)."""
    if t is None:
        return 1.0, 0.0
    ab = schedule.alpha_bar[t].item()
    return math.sqrt(ab), math.sqrt(1.0 - ab)


@torch.no_grad()
def sample_ddpm(model: nn.Module, schedule: NoiseSchedule, x: torch.Tensor,
                timesteps: list[int], *, generator: torch.Generator | None = None,
                clip: bool = True, prediction: str = "eps", variance: str = "small",
                resample: int = 1, jump_length: int = 10,
                callback: Callback | None = None) -> torch.Tensor:
    """Ancestral sampling (Ho et al. 2020, Algorithm 2) at `timesteps`, the training schedule
    respaced to them (Nichol & Dhariwal 2021, Sec. 4): all T steps gives Algorithm 2 itself.

    Each step draws x_{t'} ~ N(mu_tilde(x_t, x0_hat), sigma^2 I) with sigma^2 = beta_tilde
    ("small") or beta ("large"; its first entry replaced by beta_tilde_1 as in
    improved-diffusion) of the respaced schedule; the last step returns the mean.

    With `resample` > 1 it walks RePaint's schedule (Lugmayr et al. 2022, Sec. 4.2,
    `repaint_levels`): after each `jump_length` steps it goes back up as many by the forward
    process and comes down again, resample - 1 times. The chain's marginals are the same; what
    it buys is time for pasted pixels (`editing.inpaint`) to agree with the rest.
    """
    spaced = schedule.respace(timesteps)  # increasing; its step i is training step ts[i]
    log_var = spaced.reverse_log_variance(variance)
    B, n = x.shape[0], 0
    levels = repaint_levels(spaced.T, jump_length, resample)  # x's level: S-1 ... -1 (clean)
    for i, j in pairwise(levels):
        if j > i:  # back up from level i to j: x_j ~ q(x_j | x_i) (RePaint Eq. 9, j - i steps)
            ab = spaced.alpha_bar[j] / (spaced.alpha_bar[i] if i >= 0 else 1.0)
            x = ab.sqrt() * x + (1 - ab).sqrt() * randn(x.shape, generator, x.device)
            continue
        idx = torch.full((B,), i, device=x.device, dtype=torch.long)
        _, x0_hat = denoise(model, spaced, x, idx, clip, prediction)  # 1. predict x0 from x_t
        mean, _ = q_posterior(spaced, x0_hat, x, idx)  # 2. Eq. 7: mu_tilde(x_t, x0_hat)
        if i > 0:  # 3. add noise, except at the last step (Algorithm 2, line 3)
            sigma = (0.5 * extract(log_var, idx, x.shape)).exp()
            x = mean + sigma * randn(x.shape, generator, x.device)
        else:
            x = mean
        if callback is not None:
            callback({"n": n, "t": int(spaced.timesteps[i]), "x": x, "x0_hat": x0_hat})
        n += 1
    return x


def repaint_levels(steps: int, jump_length: int = 10, resample: int = 1) -> list[int]:
    """The levels x passes through in RePaint's schedule (Lugmayr et al. 2022, Sec. 4.2) of a
    `steps`-step chain: steps - 1 (x_T) down to -1 (the clean image), one level a network call;
    after the call at each level 0, j, 2j, ... below steps - j (j = jump_length) it jumps back up
    j levels and comes down again, resample - 1 times. Network calls: steps + (resample - 1) j
    (the number of those levels); resample 1 is the plain chain."""
    if resample < 1 or jump_length < 1:
        raise ValueError(f"resample and jump_length must be at least 1; got {resample}, "
                         f"{jump_length}")
    if resample > 1 and steps <= jump_length:
        raise ValueError(f"resampling jumps back {jump_length} steps (jump_length), so it needs "
                         f"more steps than that; got {steps}: raise steps or lower jump_length")
    jumps = {level: resample - 1 for level in range(0, steps - jump_length, jump_length)}
    level, levels = steps - 1, [steps - 1]
    while level >= 0:
        called, level = level, level - 1
        levels.append(level)
        if jumps.get(called, 0) > 0:
            jumps[called] -= 1
            level += jump_length
            levels.append(level)
    return levels


def repaint_calls(steps: int, jump_length: int = 10, resample: int = 1) -> int:
    """The network calls of `repaint_levels`' schedule: one a level down."""
    levels = repaint_levels(steps, jump_length, resample)
    return sum(b < a for a, b in pairwise(levels))


@torch.no_grad()
def sample_ddim(model: nn.Module, schedule: NoiseSchedule, x: torch.Tensor,
                timesteps: list[int], *, generator: torch.Generator | None = None,
                clip: bool = True, prediction: str = "eps", eta: float = 0.0,
                callback: Callback | None = None) -> torch.Tensor:
    """DDIM (Song et al. 2021): eta = 0 is deterministic (the probability-flow ODE to first
    order), eta = 1 has the marginals of ancestral sampling with the same timesteps."""
    for n, t in enumerate(timesteps):
        t_prev = timesteps[n + 1] if n + 1 < len(timesteps) else None
        eps_hat, x0_hat = _predict(model, schedule, x, t, clip, prediction)  # 1.
        (alpha, sigma), (alpha_prev, sigma_prev) = (_alpha_sigma(schedule, t),
                                                    _alpha_sigma(schedule, t_prev))
        # 2. Eq. 16: sigma_eta^2 = eta^2 (1 - ab') / (1 - ab) (1 - ab / ab')
        s = eta * sigma_prev / sigma * math.sqrt(max(0.0, 1 - (alpha / alpha_prev) ** 2))
        # 3. Eq. 12: x' = sqrt(ab') x0_hat + sqrt(1 - ab' - sigma_eta^2) eps_hat + sigma_eta z
        x = alpha_prev * x0_hat + math.sqrt(max(0.0, sigma_prev**2 - s**2)) * eps_hat
        if s > 0:
            x = x + s * randn(x.shape, generator, x.device)
        if callback is not None:
            callback({"n": n, "t": t, "x": x, "x0_hat": x0_hat})
    return x


@torch.no_grad()
def sample_dpmpp_2m(model: nn.Module, schedule: NoiseSchedule, x: torch.Tensor,
                    timesteps: list[int], *, generator: torch.Generator | None = None,
                    clip: bool = True, prediction: str = "eps",
                    callback: Callback | None = None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): a second-order multistep solver of the
    probability-flow ODE in lambda with data prediction x0_hat, one network call a step (it
    reuses the previous step's x0_hat). The first step has no history and the last is first
    order, as Lu et al. recommend for few steps (Sec. 5.2), so the last step into the clean
    image is exactly x0_hat."""
    x0_prev = lambda_prev = None
    for n, t in enumerate(timesteps):
        t_next = timesteps[n + 1] if n + 1 < len(timesteps) else None
        _, x0_hat = _predict(model, schedule, x, t, clip, prediction)  # 1. data prediction
        sigma, alpha_next, sigma_next, lambda_t, h = _dpm_step(schedule, t, t_next)
        phi_1 = math.expm1(-h)  # e^{-h} - 1
        x = (sigma_next / sigma) * x - alpha_next * phi_1 * x0_hat  # 2. Eq. 9, first order
        if x0_prev is not None and t_next is not None:  # 3. Algorithm 2's second-order term
            r = (lambda_t - lambda_prev) / h
            x = x - 0.5 * alpha_next * phi_1 * ((x0_hat - x0_prev) / r)
        x0_prev, lambda_prev = x0_hat, lambda_t
        if callback is not None:
            callback({"n": n, "t": t, "x": x, "x0_hat": x0_hat})
    return x


@torch.no_grad()
def sample_dpmpp_3m(model: nn.Module, schedule: NoiseSchedule, x: torch.Tensor,
                    timesteps: list[int], *, generator: torch.Generator | None = None,
                    clip: bool = True, prediction: str = "eps",
                    callback: Callback | None = None) -> torch.Tensor:
    """DPM-Solver++(3M) (Lu et al. 2022, Appendix B): the third-order multistep solver, from
    the x0_hat of the last three steps. The order is lowered where there is too little
    history and at the end (the last step first order, the one before second), as in
    `sample_dpmpp_2m`."""
    x0_hats: list[torch.Tensor] = []
    lambdas: list[float] = []
    K = len(timesteps)
    for n, t in enumerate(timesteps):
        t_next = timesteps[n + 1] if n + 1 < K else None
        _, x0_hat = _predict(model, schedule, x, t, clip, prediction)  # 1. data prediction
        sigma, alpha_next, sigma_next, lambda_t, h = _dpm_step(schedule, t, t_next)
        x0_hats, lambdas = (x0_hats + [x0_hat])[-3:], (lambdas + [lambda_t])[-3:]
        k = min(3, n + 1, K - n)  # the order of this step
        phi_1 = math.expm1(-h)  # e^{-h} - 1
        x = (sigma_next / sigma) * x - alpha_next * phi_1 * x0_hats[-1]  # 2. first order
        if k >= 2:  # 3. divided differences of x0_hat in lambda, scaled by the step
            r0 = (lambdas[-1] - lambdas[-2]) / h
            d1_0 = (x0_hats[-1] - x0_hats[-2]) / r0
        if k == 2:
            x = x - 0.5 * alpha_next * phi_1 * d1_0
        elif k == 3:
            r1 = (lambdas[-2] - lambdas[-3]) / h
            d1_1 = (x0_hats[-2] - x0_hats[-3]) / r1
            d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            x = (x + alpha_next * (phi_1 / h + 1) * d1
                 - alpha_next * ((phi_1 + h) / h**2 - 0.5) * d2)
        if callback is not None:
            callback({"n": n, "t": t, "x": x, "x0_hat": x0_hat})
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(model: nn.Module, schedule: NoiseSchedule, x: torch.Tensor,
                        timesteps: list[int], *, generator: torch.Generator | None = None,
                        clip: bool = True, prediction: str = "eps", order: int = 2,
                        callback: Callback | None = None) -> torch.Tensor:
    """SDE-DPM-Solver++(2M) (Lu et al. 2022, Appendix; k-diffusion's dpmpp_2m_sde): the
    second-order multistep solver of the reverse SDE. Its first-order step (`order=1`) is
    exactly the ancestral DDPM step, so this is ancestral sampling plus a second-order
    correction of x0_hat from the previous step's; first and last steps as in
    `sample_dpmpp_2m`."""
    if order not in (1, 2):
        raise ValueError(f"the SDE solver here is of order 1 or 2; got {order}")
    x0_prev = lambda_prev = None
    for n, t in enumerate(timesteps):
        t_next = timesteps[n + 1] if n + 1 < len(timesteps) else None
        _, x0_hat = _predict(model, schedule, x, t, clip, prediction)  # 1. data prediction
        sigma, alpha_next, sigma_next, lambda_t, h = _dpm_step(schedule, t, t_next)
        # 2. x' = sigma'/sigma e^-h x + alpha' (1 - e^-2h) (D0 + D1/2) + sigma' sqrt(1 - e^-2h) z
        phi = -math.expm1(-2 * h)  # 1 - e^{-2h}
        x = (sigma_next / sigma * math.exp(-h)) * x + alpha_next * phi * x0_hat
        if order == 2 and x0_prev is not None and t_next is not None:
            r = (lambda_t - lambda_prev) / h
            x = x + 0.5 * alpha_next * phi * ((x0_hat - x0_prev) / r)
        if sigma_next > 0:  # 3. fresh noise, except into the clean image
            x = x + sigma_next * math.sqrt(phi) * randn(x.shape, generator, x.device)
        x0_prev, lambda_prev = x0_hat, lambda_t
        if callback is not None:
            callback({"n": n, "t": t, "x": x, "x0_hat": x0_hat})
    return x


def _dpm_step(schedule: NoiseSchedule, t: int, t_next: int | None) -> tuple[float, ...]:
    """(sigma_t, alpha_t', sigma_t', lambda_t, h = lambda_t' - lambda_t) for a DPM-Solver
    step from timestep t to t' (None: the clean end)."""
    alpha_next, sigma_next = _alpha_sigma(schedule, t_next)
    lambda_t = _lambda(schedule, t)
    return (_alpha_sigma(schedule, t)[1], alpha_next, sigma_next, lambda_t,
            _lambda(schedule, t_next) - lambda_t)


def _lambda(schedule: NoiseSchedule, t: int | None) -> float:
    """lambda_t = log(alpha_t / sigma_t); -inf where alpha_bar is 0, +inf at the clean end."""
    if t is None:
        return math.inf
    ab = schedule.alpha_bar[t].item()
    return -math.inf if ab == 0 else 0.5 * (math.log(ab) - math.log1p(-ab))


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "dpm++2m": sample_dpmpp_2m,
    "dpm++3m": sample_dpmpp_3m,
    "dpm++2m-sde": sample_dpmpp_2m_sde,
}


def sample(model: nn.Module, schedule: NoiseSchedule, shape: tuple[int, ...], *,
           sampler: str = "ddpm", steps: int | None = None, timesteps: list[int] | None = None,
           spacing: str = "trailing", eta: float = 0.0, noise: torch.Tensor | None = None,
           generator: torch.Generator | None = None, callback: Callback | None = None,
           clip: bool = True, variance: str = "small", prediction: str = "eps",
           precision: str = "fp32", labels: torch.Tensor | list[int] | None = None,
           guidance: float = 1.0, resample: int = 1, jump_length: int = 10,
           progress: bool = False) -> torch.Tensor:
    """Draw a batch of images in [-1, 1] with shape `shape` (B, C, H, W).

    `sampler`: "ddpm" (ancestral), "ddim" (with `eta`), "dpm++2m", "dpm++3m" or "dpm++2m-sde".
    `schedule` is
    the T-step schedule the model was trained with; sampling visits all T timesteps, or
    `steps` of them chosen by `spacing` (`spaced_timesteps`), or the explicit decreasing
    training `timesteps`: one network call each. `noise` is x_T (drawn from `generator` if
    omitted; the same generator draws the samplers' noise). `prediction` says what the network
    outputs (eps, x0 or v); `variance` is the ancestral sampler's. The model runs in eval mode,
    under the autocast `precision` ("fp32", "bf16", "fp16" or "auto", which `autocast_dtype`
    resolves on the model's device). With `clip` (the default) x0_hat and the result are
    clipped to [-1, 1]. `progress` shows a progress bar over the network calls (off by default,
    for programs; the command line and the notebook turn it on). `resample` and `jump_length`
    are RePaint's resampling (`sample_ddpm`), for inpainting (`editing.inpaint`).

    A class-conditional model takes `labels` (B,), one class per image, and a classifier-free
    `guidance` scale (`guided`): 0 unconditional, 1 conditional, more to follow the label more
    closely. Without labels a conditional model samples unconditionally.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if steps is not None and timesteps is not None:
        raise ValueError("give steps or timesteps, not both")
    if eta and sampler != "ddim":
        raise ValueError(f"eta is DDIM's; the {sampler} sampler does not take it")
    if resample != 1 and sampler != "ddpm":
        raise ValueError(f"resampling (RePaint) goes back up the chain, which only the ancestral "
                         f"sampler's steps allow; use sampler='ddpm', or resample=1 with {sampler}")
    if timesteps is not None:
        ts = [int(t) for t in timesteps]
        if not ts or any(a <= b for a, b in zip(ts, ts[1:])):
            raise ValueError(f"timesteps must be strictly decreasing, got {ts}")
        if ts[-1] < 0 or ts[0] >= schedule.T:
            raise ValueError(f"timesteps must lie in [0, {schedule.T - 1}], got {ts}")
    else:
        ts = spaced_timesteps(schedule.T, schedule.T if steps is None else steps, spacing)
    device = next(model.parameters()).device
    net = model
    num_classes = getattr(getattr(model, "cfg", None), "num_classes", 0)
    if labels is not None:
        if not num_classes:
            raise ValueError("labels were given, but this model is unconditional "
                             "(num_classes=0); train with num_classes set to use labels")
        labels = torch.as_tensor(labels, dtype=torch.long).flatten()
        if len(labels) != shape[0]:
            raise ValueError(f"{len(labels)} labels for {shape[0]} images; give one per image")
        if labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(f"labels must lie in [0, {num_classes - 1}] (the model has "
                             f"{num_classes} classes); got {labels.min()}..{labels.max()}")
        net = guided(model, labels.to(device), guidance, num_classes)
    elif guidance != 1.0:
        raise ValueError("guidance needs labels: give one class per image")
    if noise is None:
        noise = randn(tuple(shape), generator, device)
    elif tuple(noise.shape) != tuple(shape):
        raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(shape)}")
    options = {"ddpm": {"variance": variance, "resample": resample, "jump_length": jump_length},
               "ddim": {"eta": eta}}.get(sampler, {})
    calls = repaint_calls(len(ts), jump_length, resample)  # len(ts) without resampling
    was_training = model.training
    model.eval()
    bar = tqdm(total=calls, desc=f"{sampler}, {len(ts)} steps", disable=not progress,
               leave=False, delay=0.5)  # shown once a batch takes more than a moment
    try:
        with autocast(device, autocast_dtype(precision, device)):
            x = SAMPLERS[sampler](net, schedule, noise.to(device), ts, generator=generator,
                                  clip=clip, prediction=prediction,
                                  callback=_counting(bar, callback), **options)
    finally:
        bar.close()
        model.train(was_training)
    return x.clamp(-1, 1) if clip else x


def _counting(bar: tqdm, callback: Callback | None) -> Callback | None:
    """`callback`, advancing `bar` at each step; `callback` itself when the bar is off."""
    if bar.disable:
        return callback

    def count(info: dict) -> None:
        bar.update(1)
        if callback is not None:
            callback(info)

    return count


def guided(model: nn.Module, labels: torch.Tensor, guidance: float,
           num_classes: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The network under classifier-free guidance (Ho & Salimans 2022, Eq. 6 with w = guidance
    - 1): out = out(x, t, no label) + guidance * (out(x, t, labels) - out(x, t, no label)),
    both halves in one batched call. guidance 0 is the unconditional model, 1 the conditional
    one. The output (eps, x0 or v) is linear in the guidance, so the same mix holds for each."""
    null = torch.full_like(labels, num_classes)

    def net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if guidance == 1:
            return model(x, t, labels)
        if guidance == 0:
            return model(x, t, null)
        cond, uncond = model(torch.cat([x, x]), torch.cat([t, t]),
                             torch.cat([labels, null])).chunk(2)
        return uncond + guidance * (cond - uncond)

    return net


def slerp(z0: torch.Tensor, z1: torch.Tensor, w: float) -> torch.Tensor:
    """Spherical interpolation between two noise tensors (Shoemake 1985), which keeps the
    norm a Gaussian x_T should have, unlike a straight line (used for interpolating samples
    with a deterministic sampler, as in Song et al. 2021, Sec. 5.3)."""
    a, b = z0.flatten(), z1.flatten()
    omega = torch.arccos((a @ b / (a.norm() * b.norm())).clamp(-1, 1))
    if omega.abs() < 1e-6:
        return (1 - w) * z0 + w * z1
    return (torch.sin((1 - w) * omega) * z0 + torch.sin(w * omega) * z1) / torch.sin(omega)
