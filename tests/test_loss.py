"""The training loss: L_simple and its Min-SNR-gamma weighting, against their formulas."""
import pytest
import torch
from torch import nn

from smol_diffusion import NoiseSchedule
from smol_diffusion.diffusion import eps_x0_from_output, q_sample, simple_loss, target


class Recorder(nn.Module):
    """Predicts eps_hat = 0.5 x_t and remembers its inputs."""

    def forward(self, x, t):
        self.x, self.t = x, t
        return 0.5 * x


def expected(schedule, x0, seed, gamma=None):
    """Replays the loss's random draws and computes Eq. 14 (and the weighting) by hand."""
    torch.manual_seed(seed)
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


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_conversions_round_trip(prediction):
    """target() and eps_x0_from_output() are inverses: the exact target gives back eps and x0."""
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(8, 1, 4, 4, generator=g), torch.randn(8, 1, 4, 4, generator=g)
    ab = torch.rand(8, 1, 1, 1, generator=g) * 0.98 + 0.01
    alpha, sigma = ab.sqrt(), (1 - ab).sqrt()
    xt = alpha * x0 + sigma * eps
    eps_back, x0_back = eps_x0_from_output(target(x0, eps, alpha, sigma, prediction), xt,
                                           alpha, sigma, prediction)
    torch.testing.assert_close(eps_back, eps, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x0_back, x0, rtol=1e-4, atol=1e-4)
    if prediction == "v":  # Salimans & Ho: v = alpha eps - sigma x0, so x0 = alpha x_t - sigma v
        torch.testing.assert_close(alpha * xt - sigma * (alpha * eps - sigma * x0), x0)


@pytest.mark.parametrize("prediction", ["x0", "v"])
@pytest.mark.parametrize("gamma", [None, 5.0])
def test_loss_for_other_targets(prediction, gamma):
    """The error is measured on the target; Min-SNR's weight on it is min(SNR, gamma) for x0
    and min(SNR, gamma) / (SNR + 1) for v (Hang et al. 2023, Sec. 3.4)."""
    schedule = NoiseSchedule.cosine(1000)
    x0 = torch.rand(64, 1, 4, 4) * 2 - 1
    torch.manual_seed(7)
    loss = simple_loss(Recorder(), schedule, x0, min_snr_gamma=gamma, prediction=prediction)
    torch.manual_seed(7)
    t = torch.randint(0, schedule.T, (64,))
    noise = torch.randn_like(x0)
    ab = schedule.alpha_bar[t].view(-1, 1, 1, 1).float()
    goal = x0 if prediction == "x0" else ab.sqrt() * noise - (1 - ab).sqrt() * x0
    err = (0.5 * q_sample(schedule, x0, t, noise) - goal).pow(2).mean(dim=(1, 2, 3))
    if gamma is not None:
        snr = (ab / (1 - ab)).flatten()
        w = snr.clamp(max=gamma)
        err = err * (w if prediction == "x0" else w / (snr + 1))
    assert loss.item() == pytest.approx(err.mean().item(), rel=1e-5)


def test_zero_terminal_snr_needs_v_or_x0():
    from smol_diffusion import DiffusionConfig

    with pytest.raises(ValueError, match="prediction='v'"):
        DiffusionConfig(zero_terminal_snr=True)
    DiffusionConfig(zero_terminal_snr=True, prediction="v")
    with pytest.raises(ValueError, match="sampler must be one of"):
        DiffusionConfig(sampler="euler")


@pytest.mark.parametrize("prediction", ["x0", "v"])
def test_min_snr_trains_the_last_step_of_a_zero_terminal_snr_schedule(prediction):
    """At SNR = 0, Min-SNR's x0 and v weights are 0; that step keeps weight 1 (unweighted)."""
    schedule = NoiseSchedule.linear(1000).rescale_zero_terminal_snr()
    x0 = torch.rand(4, 1, 4, 4) * 2 - 1
    t, noise = torch.full((4,), 999), torch.randn_like(x0)
    kw = dict(prediction=prediction, t=t, noise=noise)
    weighted = simple_loss(Recorder(), schedule, x0, min_snr_gamma=5.0, **kw)
    assert weighted.item() > 0
    assert weighted.item() == pytest.approx(simple_loss(Recorder(), schedule, x0, **kw).item())


@pytest.mark.parametrize("gamma", [None, 5.0])
def test_an_output_shaped_unlike_its_target_is_refused_not_broadcast(gamma):
    x0 = torch.zeros(4, 3, 4, 4)
    grey = lambda x, t: x[:, :1]  # noqa: E731  one channel for three
    with pytest.raises(ValueError, match=r"output \(4, 1, 4, 4\) does not match its target "
                                         r"\(4, 3, 4, 4\); set out_channels"):
        simple_loss(grey, NoiseSchedule.cosine(10), x0, min_snr_gamma=gamma)
