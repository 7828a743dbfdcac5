"""The schedule against the papers' formulas, and respacing against its definition."""
import math

import pytest
import torch

from smol_diffusion import NoiseSchedule
from smol_diffusion.diffusion import q_posterior, q_sample
from smol_diffusion.schedule import extract, spaced_timesteps


def test_linear_matches_ho_et_al():
    s = NoiseSchedule.linear(1000)
    assert s.betas.dtype == torch.float64 and s.betas.shape == (1000,)
    assert s.betas[0].item() == pytest.approx(1e-4) and s.betas[-1].item() == pytest.approx(0.02)
    # alpha_bar_t = prod_{s<=t} (1 - beta_s), Ho et al. Eq. 4
    expected = math.prod(1 - b for b in s.betas[:500].tolist())
    assert s.alpha_bar[499].item() == pytest.approx(expected)
    # Stored reference value (catches silent drift): alpha_bar_{T-1} of the linear schedule.
    assert s.alpha_bar[-1].item() == pytest.approx(4.035e-05, rel=1e-3)


def test_linear_scales_with_T():
    s = NoiseSchedule.linear(250)
    assert s.betas[0].item() == pytest.approx(4e-4) and s.betas[-1].item() == pytest.approx(0.08)


def test_cosine_matches_nichol_dhariwal():
    T, s_ = 1000, 0.008
    s = NoiseSchedule.cosine(T)
    f = lambda t: math.cos((t / T + s_) / (1 + s_) * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 10, 500, 900):
        assert s.alpha_bar[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert s.betas.max().item() == pytest.approx(0.999)  # clipped at the end
    assert (s.betas[:-1] < 0.999).all()


def test_posterior_matches_eq7():
    s = NoiseSchedule.cosine(100)
    for t in (1, 37, 99):
        ab, ab_prev, b = s.alpha_bar[t], s.alpha_bar[t - 1], s.betas[t]
        var, coef1 = (1 - ab_prev) / (1 - ab) * b, ab_prev.sqrt() * b / (1 - ab)
        assert s.posterior_variance[t].item() == pytest.approx(var.item())
        assert s.posterior_mean_coef1[t].item() == pytest.approx(coef1.item())
        assert s.posterior_mean_coef2[t].item() == pytest.approx(
            ((1 - s.betas[t]).sqrt() * (1 - ab_prev) / (1 - ab)).item())
    assert s.posterior_variance[0].item() == 0
    assert s.posterior_log_variance_clipped[0].item() == pytest.approx(
        math.log(s.posterior_variance[1].item()))


def test_posterior_is_the_bayes_posterior():
    """q(x_{t-1}|x_t,x_0) from Eq. 7 equals the Gaussian conditional computed by hand."""
    s = NoiseSchedule.linear(1000)
    t = torch.tensor([300])
    x0, xt = torch.randn(2, 1, 1, 4, 4, dtype=torch.float64)
    mean, var = q_posterior(s, x0.float(), xt.float(), t)
    # x_{t-1} ~ N(sqrt(ab_prev) x0, 1 - ab_prev); x_t | x_{t-1} ~ N(sqrt(a_t) x_{t-1}, beta_t)
    ab_prev, a, b = s.alpha_bar[299], s.alphas[300], s.betas[300]
    prior_var = 1 - ab_prev
    post_var = 1 / (1 / prior_var + a / b)
    post_mean = post_var * (ab_prev.sqrt() * x0 / prior_var + a.sqrt() * xt / b)
    torch.testing.assert_close(mean.double(), post_mean, rtol=1e-5, atol=1e-5)
    assert var.item() == pytest.approx(post_var.item(), rel=1e-5)


def test_q_sample_mean_and_variance():
    s = NoiseSchedule.linear(1000)
    x0 = torch.full((20000, 1, 1, 1), 0.7)
    for t in (0, 250, 999):
        tt = torch.full((20000,), t)
        xt = q_sample(s, x0, tt, torch.randn_like(x0))
        ab = s.alpha_bar[t].item()
        assert xt.mean().item() == pytest.approx(math.sqrt(ab) * 0.7, abs=0.02)
        assert xt.var().item() == pytest.approx(1 - ab, rel=0.05, abs=2e-5)


def test_extract_broadcasts():
    s = NoiseSchedule.linear(100)
    out = extract(s.betas, torch.tensor([0, 99]), (2, 3, 5, 5))
    assert out.shape == (2, 1, 1, 1) and out.dtype == torch.float32
    assert out[1].item() == pytest.approx(s.betas[99].item())


def test_respace_keeps_alpha_bar_and_timesteps():
    s = NoiseSchedule.linear(1000)
    ts = spaced_timesteps(1000, 50, "linspace")
    assert ts[0] == 999 and ts[-1] == 0 and len(ts) == 50 and ts == sorted(ts, reverse=True)
    r = s.respace(ts)
    assert r.T == 50
    assert r.timesteps.tolist() == sorted(ts)
    torch.testing.assert_close(r.alpha_bar, s.alpha_bar[sorted(ts)])
    # respacing every step is the identity
    full = s.respace(range(1000))
    torch.testing.assert_close(full.betas, s.betas)


@pytest.mark.parametrize("bad", [[], [-1, 3], [1000]])
def test_respace_rejects_bad_timesteps(bad):
    with pytest.raises(ValueError):
        NoiseSchedule.linear(1000).respace(bad)


def test_bad_schedules_are_rejected():
    with pytest.raises(ValueError, match="positive integer"):
        NoiseSchedule.linear(0)
    with pytest.raises(ValueError, match="needs T > 20"):
        NoiseSchedule.linear(10)
    with pytest.raises(ValueError, match="unknown schedule"):
        NoiseSchedule.from_name("quadratic", 10)
    with pytest.raises(ValueError, match="steps must lie"):
        spaced_timesteps(100, 101)
    with pytest.raises(ValueError, match="unknown spacing"):
        spaced_timesteps(100, 10, "uniform")


@pytest.mark.parametrize("spacing, expected", [
    ("trailing", [999, 799, 599, 399, 199]),  # Lin et al. 2023, Table 2
    ("linspace", [999, 749, 500, 250, 0]),
    ("leading", [800, 600, 400, 200, 0])])
def test_spacings(spacing, expected):
    assert spaced_timesteps(1000, 5, spacing) == expected
    for T in (50, 1000, 4000):
        for steps in range(1, T + 1):
            ts = spaced_timesteps(T, steps, spacing)
            assert len(ts) == steps and ts == sorted(ts, reverse=True)
            assert 0 <= ts[-1] <= ts[0] <= T - 1


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_zero_terminal_snr(name):
    """Lin et al. 2023, Algorithm 1: sqrt(alpha_bar) shifted and scaled to end at 0 and start
    where it did; an affine map of the old one, so it stays decreasing."""
    old = NoiseSchedule.from_name(name, 1000)
    new = NoiseSchedule.from_name(name, 1000, zero_terminal_snr=True)
    assert new.alpha_bar[-1].item() == 0 and new.betas[-1].item() == pytest.approx(1.0)
    assert new.alpha_bar[0].item() == pytest.approx(old.alpha_bar[0].item(), rel=1e-12)
    a, b = old.alpha_bar.sqrt(), new.alpha_bar.sqrt()
    scale = (b[0] - b[500]) / (a[0] - a[500])
    torch.testing.assert_close(b - b[0], scale * (a - a[0]))
    assert bool((new.posterior_variance[1:] > 0).all()) and new.posterior_variance.isfinite().all()
