"""The noise schedule: betas, alpha_bar and the posterior q(x_{t-1} | x_t, x_0).

Everything is computed once in float64 and kept as (T,) tensors on the CPU; `extract` picks
the entries for a batch of timesteps and broadcasts them against an image batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


def extract(a: torch.Tensor, t: torch.Tensor, x_shape: torch.Size) -> torch.Tensor:
    """Return a[t] as float32 on t's device, shaped (B, 1, ..., 1) to broadcast over x_shape.

    The same helper as improved-diffusion's `_extract_into_tensor`. The float64 table is cast
    to float32 before it moves, since some devices (MPS) have no float64.
    """
    out = a.to(torch.float32).to(t.device)[t]  # (B,)
    return out.view(-1, *([1] * (len(x_shape) - 1)))


@dataclass
class NoiseSchedule:
    """A discrete variance-preserving schedule of T steps (Ho et al. 2020, Sec. 2).

    `betas` is the only input; every other field is derived from it in float64. `timesteps`
    maps each step of this schedule to the training timestep the network was conditioned on:
    arange(T) for a training schedule, a subset of it for a respaced one (`respace`).
    """

    betas: torch.Tensor
    timesteps: torch.Tensor | None = None
    alphas: torch.Tensor = field(init=False)
    alpha_bar: torch.Tensor = field(init=False)
    alpha_bar_prev: torch.Tensor = field(init=False)
    posterior_variance: torch.Tensor = field(init=False)
    posterior_log_variance_clipped: torch.Tensor = field(init=False)
    posterior_mean_coef1: torch.Tensor = field(init=False)
    posterior_mean_coef2: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        betas = torch.as_tensor(self.betas, dtype=torch.float64).cpu()
        if betas.ndim != 1 or len(betas) == 0:
            raise ValueError(f"betas must be a non-empty 1-D tensor, got {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must lie in (0, 1]")
        self.betas = betas
        T = len(betas)
        if self.timesteps is None:
            self.timesteps = torch.arange(T)
        self.timesteps = torch.as_tensor(self.timesteps, dtype=torch.long).cpu()
        self.alphas = 1.0 - betas
        self.alpha_bar = torch.cumprod(self.alphas, dim=0)  # Eq. 4 (Ho et al.): prod_s alpha_s
        self.alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alpha_bar[:-1]])
        # Eq. 7 (Ho et al.): beta_tilde_t and the two coefficients of mu_tilde_t(x_t, x_0).
        self.posterior_variance = betas * (1.0 - self.alpha_bar_prev) / (1.0 - self.alpha_bar)
        # beta_tilde_0 is 0; like improved-diffusion, clip its log to beta_tilde_1.
        pv = self.posterior_variance
        self.posterior_log_variance_clipped = torch.log(torch.cat([pv[1:2], pv[1:]])) if T > 1 \
            else torch.log(betas)
        self.posterior_mean_coef1 = betas * self.alpha_bar_prev.sqrt() / (1.0 - self.alpha_bar)
        self.posterior_mean_coef2 = (1.0 - self.alpha_bar_prev) * self.alphas.sqrt() / (
            1.0 - self.alpha_bar)

    @property
    def T(self) -> int:
        """Number of steps in this schedule."""
        return len(self.betas)

    def reverse_log_variance(self, variance: str) -> torch.Tensor:
        """log sigma_t^2 of the fixed reverse variance p(x_{t-1} | x_t) (Ho et al. Sec. 3.2):
        "small" is beta_tilde_t, "large" is beta_t with its first entry replaced by
        beta_tilde_1 (as improved-diffusion does, so the decoder at t=0 is not too wide)."""
        if variance == "small":
            return self.posterior_log_variance_clipped
        if variance == "large":
            return torch.log(torch.cat([self.posterior_variance[1:2], self.betas[1:]]))
        raise ValueError(f"variance must be 'small' or 'large', got {variance!r}")

    @classmethod
    def linear(cls, T: int = 1000) -> NoiseSchedule:
        """Ho et al. 2020: betas linear from 1e-4 to 0.02 at T=1000.

        For other T the end points are scaled by 1000/T, as improved-diffusion does, so the
        process reaches the same noise level whatever T is.
        """
        _check_T(T)
        if T <= 20:
            raise ValueError(f"the linear schedule needs T > 20 (its last beta, 0.02 * 1000 / T, "
                             f"must stay below 1); use the cosine schedule for T={T}")
        scale = 1000.0 / T
        return cls(torch.linspace(scale * 1e-4, scale * 0.02, T, dtype=torch.float64))

    @classmethod
    def cosine(cls, T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> NoiseSchedule:
        """Nichol & Dhariwal 2021, Eq. 17: alpha_bar(t) = cos^2(pi/2 (t/T + s)/(1 + s)).

        beta_t = 1 - alpha_bar(t+1)/alpha_bar(t), clipped at `max_beta` (0.999) to avoid the
        singularity at t = T.
        """
        _check_T(T)
        steps = torch.arange(T + 1, dtype=torch.float64) / T
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        return cls(torch.clamp(1 - f[1:] / f[:-1], max=max_beta))

    @classmethod
    def from_name(cls, name: str, T: int, zero_terminal_snr: bool = False) -> NoiseSchedule:
        """`linear` or `cosine` with T steps, rescaled to zero terminal SNR if asked."""
        if name not in SCHEDULES:
            raise ValueError(f"unknown schedule {name!r}: use one of "
                             f"{', '.join(map(repr, SCHEDULES))}")
        schedule = getattr(cls, name)(T)
        return schedule.rescale_zero_terminal_snr() if zero_terminal_snr else schedule

    def rescale_zero_terminal_snr(self) -> NoiseSchedule:
        """The schedule shifted and scaled so alpha_bar_T = 0 (Lin et al. 2023, Algorithm 1).

        sqrt(alpha_bar) is moved so its last value is 0 and scaled so its first is unchanged:
        the last step then holds no signal at all, as at inference, where x_T is pure noise.
        A model cannot predict eps there (x0 = (x_T - eps) / 0); train it with v or x0.
        """
        root = self.alpha_bar.sqrt()
        first, last = root[0].item(), root[-1].item()
        alpha_bar = ((root - last) * first / (first - last)) ** 2
        alphas = alpha_bar / torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
        return NoiseSchedule(1.0 - alphas)

    def respace(self, timesteps: list[int] | torch.Tensor) -> NoiseSchedule:
        """The same process seen only at `timesteps` (Nichol & Dhariwal 2021, Sec. 4).

        Keeps alpha_bar at the chosen steps and sets beta_i = 1 - alpha_bar_{t_i} /
        alpha_bar_{t_{i-1}}, so no new schedule with another T is ever made: the network is
        still called with the training timesteps, which the new schedule's `timesteps` holds.
        Order does not matter; the result is increasing.
        """
        ts = torch.as_tensor(timesteps, dtype=torch.long).flatten()
        if len(ts) == 0:
            raise ValueError("timesteps must not be empty")
        if int(ts.min()) < 0 or int(ts.max()) >= self.T:
            raise ValueError(f"timesteps must lie in [0, {self.T - 1}], got "
                             f"[{int(ts.min())}, {int(ts.max())}]")
        ts = torch.unique(ts)  # sorted, increasing
        ab = self.alpha_bar[ts]
        ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
        return NoiseSchedule(1.0 - ab / ab_prev, timesteps=self.timesteps[ts])


SCHEDULES = ("linear", "cosine")
SPACINGS = ("trailing", "linspace", "leading")


def spaced_timesteps(T: int, steps: int, spacing: str = "trailing") -> list[int]:
    """`steps` decreasing training timesteps to sample at (Lin et al. 2023, Table 2).

    "trailing" (the default): T-1, T-1-T/steps, ..., T/steps-1; "linspace": evenly from T-1 to
    0, both included; "leading": (steps-1) T/steps, ..., T/steps, 0, as DDIM and Stable
    Diffusion did. The first two start at T-1, the step the model saw with (almost) no signal
    left, as sampling from pure noise requires; "leading" starts short of it (at 980 of 1000 for
    50 steps), which Lin et al. show is a train/test mismatch. Trailing also gives the final step
    to the clean image the full stride instead of a sliver.
    """
    if not 1 <= steps <= T:
        raise ValueError(f"steps must lie in [1, {T}], got {steps}")
    if spacing == "trailing":
        ts = (T - torch.arange(steps, dtype=torch.float64) * T / steps).round().long() - 1
    elif spacing == "linspace":
        ts = torch.linspace(T - 1, 0, steps, dtype=torch.float64).round().long()
    elif spacing == "leading":
        ts = torch.arange(steps - 1, -1, -1) * (T // steps)
    else:
        raise ValueError(f"unknown spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
    return sorted(set(ts.clamp(0, T - 1).tolist()), reverse=True)


def _check_T(T: int) -> None:
    if not isinstance(T, int) or T < 1:
        raise ValueError(f"T must be a positive integer, got {T!r}")
