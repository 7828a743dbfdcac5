"""Bits/dim: each term of the bound against its closed form for Gaussian data with the exact
denoiser, the discretised decoder against the normal CDF, and a trained model against an
untrained one."""
import math

import pytest
import torch

import smol_diffusion
from smol_diffusion import NoiseSchedule, load_checkpoint
from smol_diffusion.data import mnist_5k, to_model_range
from smol_diffusion.likelihood import (bits_per_dim, discretized_gaussian_log_likelihood,
                                       prior_bpd, quantize, vb_term_bpd)

from conftest import GaussianDenoiser

SIGMA_D = 0.5


def gaussian_data(n=4000, seed=0):
    return SIGMA_D * torch.randn(n, 1, 4, 4, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variance", ["small", "large"])
@pytest.mark.parametrize("i", [1, 10, 300, 900])
def test_kl_terms_match_the_closed_form(variance, i):
    """For x0 ~ N(0, s^2) and the exact denoiser, E[(x0 - x0_hat)^2] = s^2 (1 - ab) /
    (ab s^2 + 1 - ab), so L_{t-1} = 0.5 (log(v/b~) - 1 + b~/v + c1^2 E[(x0 - x0_hat)^2] / v)
    per dimension, with b~ the posterior variance, v the model's, c1 the mean's x0 coefficient."""
    schedule = NoiseSchedule.linear(1000)
    x0 = gaussian_data()
    t = torch.full((len(x0),), i)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    got = vb_term_bpd(GaussianDenoiser(schedule, SIGMA_D), schedule, x0, t, noise, variance,
                      clip=False).mean().item()
    ab, c1 = schedule.alpha_bar[i].item(), schedule.posterior_mean_coef1[i].item()
    b_tilde = schedule.posterior_variance[i].item()
    v = schedule.reverse_log_variance(variance)[i].exp().item()
    err = SIGMA_D**2 * (1 - ab) / (ab * SIGMA_D**2 + 1 - ab)
    expected = 0.5 * (math.log(v / b_tilde) - 1 + b_tilde / v + c1**2 * err / v) / math.log(2)
    assert got == pytest.approx(expected, rel=0.03)


def test_prior_term_matches_the_closed_form():
    schedule = NoiseSchedule.linear(1000)
    x0 = gaussian_data()
    ab = schedule.alpha_bar[-1].item()
    expected = 0.5 * (-1 - math.log(1 - ab) + (1 - ab) + ab * SIGMA_D**2) / math.log(2)
    assert prior_bpd(schedule, x0).mean().item() == pytest.approx(expected, rel=0.03)


def test_the_discretised_decoder_is_a_distribution_over_the_256_levels():
    """Summed over every 8-bit level the probabilities are 1, for any mean and scale."""
    levels = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    for mean, log_scale in [(0.0, -1.0), (0.3, -5.0), (-0.99, -3.0), (2.0, 0.5)]:
        logp = discretized_gaussian_log_likelihood(levels, torch.tensor(mean),
                                                   torch.tensor(log_scale))
        assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-6)


def test_the_discretised_decoder_against_the_normal_cdf():
    phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    sigma, x = 0.05, 2 / 255 - 1 + 64 / 127.5  # an interior level
    f64 = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    got = discretized_gaussian_log_likelihood(f64(x), f64(x + 0.01), f64(math.log(sigma))).item()
    expected = math.log(phi((-0.01 + 1 / 255) / sigma) - phi((-0.01 - 1 / 255) / sigma))
    assert got == pytest.approx(expected, rel=1e-9)
    edge = discretized_gaussian_log_likelihood(f64(-1.0), f64(-1.0), f64(math.log(sigma))).item()
    assert edge == pytest.approx(math.log(phi(1 / 255 / sigma)), rel=1e-9)


def test_quantize_rounds_to_8_bits():
    x = quantize(torch.tensor([-1.2, -1.0, 0.0, 0.001, 1.0, 3.0]))
    levels = (x + 1) * 127.5
    assert torch.allclose(levels, levels.round(), atol=1e-5)
    assert x.min() == -1 and x.max() == 1


def test_a_trained_model_scores_far_better_than_an_untrained_one(tiny_cfg):
    cfg = tiny_cfg.override(steps=300, lr=3e-3, sample_every=0, checkpoint_every=0, sample_n=0,
                            ema_decay=0.99, T=200)
    smol_diffusion.train(cfg, progress=False)
    trained = load_checkpoint(f"{cfg.train.out_dir}/ckpt.pt", device="cpu")
    untrained = smol_diffusion.UNet(cfg.model).eval()
    x0 = to_model_range(mnist_5k(8, "test").images[:64])
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    good = bits_per_dim(trained.model, trained.schedule, x0, generator=gen())
    bad = bits_per_dim(untrained, trained.schedule, x0, generator=gen())
    assert good["terms"].shape == (200,)
    # 7.8 bits/dim untrained, 5.9 after 300 steps (2 CPU cores, 12 s): by 1.5 bits/dim or more
    # the trained model gives each pixel at least 2.8 times the probability
    assert good["bpd"].mean() < bad["bpd"].mean() - 1.5, (good["bpd"].mean(), bad["bpd"].mean())
    # the total is the prior plus every term (the terms are batch means)
    assert good["bpd"].mean().item() == pytest.approx(
        (good["prior"].mean() + good["terms"].sum()).item(), rel=1e-9)
