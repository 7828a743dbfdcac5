"""The training loss: L_simple and its Min-SNR-gamma weighting, against their formulas."""
import pytest
import torch
from torch import nn

from smol_diffusion import NoiseSchedule
from smol_diffusion.diffusion import q_sample, simple_loss


class Recorder(nn.Module):
    """Predicts eps_hat = 0.5 x_t and remembers its inputs."""

    def forward(self, x, t):
        self.x, self.t = x, t
        return 0.5 * x


def expected(schedule, x0, seed, gamma=None):
    """Replays the loss's random draws and computes Eq. 14 (and the weighting) by hand."""
    g = torch.manual_seed(seed)
    t = torch.randint(0, schedule.T, (x0.shape[0],))
    noise = torch.randn_like(x0)
    err = (0.5 * q_sample(schedule, x0, t, noise) - noise).pow(2).mean(dim=(1, 2, 3))
    if gamma is None:
        return err.mean()
    snr = schedule.alpha_bar[t] / (1 - schedule.alpha_bar[t])
    return (torch.minimum(snr, torch.tensor(gamma, dtype=torch.float64)) / snr * err).mean()


@pytest.mark.parametrize("gamma", [None, 5.0, 1e9])
def test_loss_matches_its_formula(gamma):
    schedule = NoiseSchedule.cosine(1000)
    x0 = torch.rand(64, 1, 4, 4) * 2 - 1
    torch.manual_seed(7)
    loss = simple_loss(Recorder(), schedule, x0, min_snr_gamma=gamma)
    assert loss.item() == pytest.approx(expected(schedule, x0, 7, gamma).item(), rel=1e-5)


def test_min_snr_down_weights_clean_timesteps():
    schedule = NoiseSchedule.cosine(1000)
    x0 = torch.rand(256, 1, 4, 4) * 2 - 1
    torch.manual_seed(0)
    plain = simple_loss(Recorder(), schedule, x0)
    torch.manual_seed(0)
    weighted = simple_loss(Recorder(), schedule, x0, min_snr_gamma=5.0)
    assert weighted < plain
