"""Shared fixtures: a tiny configuration that trains in seconds on two CPU cores, and the exact
denoiser of Gaussian data."""
import pytest
import torch
from torch import nn

from smol_diffusion import NoiseSchedule, get_preset


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


@pytest.fixture
def tiny_cfg(tmp_path):
    """The demo preset shrunk: 8x8 digits, a 2-level UNet, 1,000-step schedule."""
    return get_preset("demo").override(
        image_size=8, channels=16, channel_mults=(1, 2), attn_resolutions=(4,), heads=2,
        steps=40, batch_size=16, warmup=5, log_every=10, sample_every=20, sample_n=4,
        sample_steps=5, checkpoint_every=20, out_dir=str(tmp_path / "run"))


class GaussianDenoiser(nn.Module):
    """The exact eps-prediction for data x0 ~ N(0, sigma_d^2 I):
    E[eps | x_t] = sqrt(1 - ab_t) x_t / (ab_t sigma_d^2 + 1 - ab_t)."""

    def __init__(self, schedule: NoiseSchedule, sigma_d: float):
        super().__init__()
        self.register_buffer("alpha_bar", schedule.alpha_bar.float())
        self.sigma_d = sigma_d
        self.dummy = nn.Parameter(torch.zeros(()))  # gives the module a device
        self.seen = []

    def forward(self, x, t):
        self.seen.append(int(t[0]))
        ab = self.alpha_bar[t].view(-1, 1, 1, 1)
        return (1 - ab).sqrt() * x / (ab * self.sigma_d**2 + 1 - ab)
