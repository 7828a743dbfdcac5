"""The samplers with the exact denoiser of Gaussian data, whose answers are known: the data's
variance, the exact probability-flow solution, and each other."""
import time

import numpy as np
import pytest
import torch

from smol_diffusion import NoiseSchedule, sample
from smol_diffusion.samplers import SAMPLERS, sample_ddpm, sample_dpmpp_2m_sde, slerp
from smol_diffusion.schedule import spaced_timesteps

from conftest import GaussianDenoiser


def draw(sigma_d, steps, variance, n=2000):
    schedule = NoiseSchedule.linear(1000)
    return sample(GaussianDenoiser(schedule, sigma_d), schedule, (n, 1, 4, 4), steps=steps,
                  clip=False, variance=variance, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("variance", ["small", "large"])
def test_recovers_the_data_variance(variance):
    x = draw(0.5, None, variance)
    assert x.mean().item() == pytest.approx(0.0, abs=0.01)
    assert x.var().item() == pytest.approx(0.25, rel=0.04)


def test_respaced_variances_bracket_the_data_variance():
    """With 100 of 1,000 steps the fixed variances are off, in the known directions: beta_tilde
    omits the uncertainty of x0 given x_t (too small), beta over-counts it (too large)."""
    small, large = draw(0.5, 100, "small").var().item(), draw(0.5, 100, "large").var().item()
    assert 0.25 * 0.8 < small < 0.25 < large < 0.25 * 1.2


def test_a_wrong_denoiser_gives_the_wrong_variance():
    """The check above can fail: a denoiser for sigma_d = 1 gives variance near 1, not 0.25."""
    assert draw(1.0, None, "small").var().item() > 0.8


def test_explicit_timesteps_are_honoured_and_callback_sees_each_step():
    schedule = NoiseSchedule.linear(1000)
    model = GaussianDenoiser(schedule, 0.5)
    frames = []
    ts = [999, 700, 420, 100, 3]
    sample(model, schedule, (2, 1, 4, 4), timesteps=ts, callback=frames.append)
    assert model.seen == ts
    assert [f["t"] for f in frames] == ts and [f["n"] for f in frames] == list(range(5))
    assert frames[-1]["x"].shape == (2, 1, 4, 4) and frames[0]["x0_hat"].abs().max() <= 1


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_steps_respace_the_training_schedule(sampler):
    schedule = NoiseSchedule.linear(1000)
    model = GaussianDenoiser(schedule, 0.5)
    sample(model, schedule, (1, 1, 2, 2), sampler=sampler, steps=10)
    assert model.seen == spaced_timesteps(1000, 10, "trailing")  # one network call a step
    model.seen.clear()
    sample(model, schedule, (1, 1, 2, 2), sampler=sampler, steps=10, spacing="linspace")
    assert model.seen[0] == 999 and model.seen[-1] == 0 and len(model.seen) == 10
    model.seen.clear()
    sample(model, schedule, (1, 1, 2, 2), sampler=sampler)
    assert model.seen == list(range(999, -1, -1))


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_explicit_timesteps_for_every_sampler(sampler):
    schedule = NoiseSchedule.linear(1000)
    model = GaussianDenoiser(schedule, 0.5)
    ts = [999, 640, 333, 90, 12]
    frames = []
    sample(model, schedule, (2, 1, 4, 4), sampler=sampler, timesteps=ts, callback=frames.append)
    assert model.seen == ts and [f["t"] for f in frames] == ts


@pytest.mark.parametrize("sampler, eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 1.0),
                                          ("dpm++2m", 0.0), ("dpm++3m", 0.0),
                                          ("dpm++2m-sde", 0.0)])
def test_generator_makes_it_deterministic_and_output_is_clipped(sampler, eta):
    schedule = NoiseSchedule.linear(1000)
    model = GaussianDenoiser(schedule, 2.0)
    draw = lambda seed: sample(model, schedule, (4, 1, 4, 4), sampler=sampler, eta=eta,  # noqa
                               steps=20, generator=torch.Generator().manual_seed(seed))
    a, b, c = draw(3), draw(3), draw(4)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    assert a.abs().max() <= 1


def test_ddim_with_eta_1_is_the_ancestral_sampler():
    """Song et al. 2021, Eq. 16: with eta = 1 DDIM's noise is the respaced beta_tilde, so with
    the same noise it takes the ancestral sampler's steps, and has its marginal variance."""
    schedule = NoiseSchedule.linear(1000)
    model = GaussianDenoiser(schedule, 0.5)
    run = lambda sampler, eta: sample(model, schedule, (2000, 1, 4, 4), sampler=sampler,  # noqa
                                      eta=eta, steps=100, clip=False,
                                      generator=torch.Generator().manual_seed(0))
    ddim, ddpm = run("ddim", 1.0), run("ddpm", 0.0)
    torch.testing.assert_close(ddim, ddpm, rtol=1e-4, atol=1e-4)
    assert ddim.var().item() == pytest.approx(ddpm.var().item(), rel=1e-3)


def test_first_order_sde_dpm_solver_is_the_ancestral_sampler():
    """SDE-DPM-Solver++ without its second-order term takes exactly the ancestral steps with
    beta_tilde (the posterior variance), so with the same noise it gives the same images; the
    (2M) solver's correction changes them, but not the variance it recovers."""
    schedule = NoiseSchedule.linear(1000)
    model = GaussianDenoiser(schedule, 0.5)
    ts = spaced_timesteps(1000, 50)
    noise = torch.randn(2000, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    run = lambda f, **kw: f(model, schedule, noise, ts, clip=False,  # noqa: E731
                            generator=torch.Generator().manual_seed(1), **kw)
    ddpm = run(sample_ddpm, variance="small")
    first = run(sample_dpmpp_2m_sde, order=1)
    torch.testing.assert_close(first, ddpm, rtol=1e-4, atol=1e-4)
    second = run(sample_dpmpp_2m_sde)
    assert (second - ddpm).abs().mean() > 1e-3
    full = sample(model, schedule, (2000, 1, 4, 4), sampler="dpm++2m-sde", clip=False,
                  generator=torch.Generator().manual_seed(2))
    assert full.var().item() == pytest.approx(0.25, rel=0.04)


def pf_ode_error(sampler: str, steps: int) -> float:
    """Mean error against the exact probability-flow solution for Gaussian data: the flow is
    the linear map x_t = x_T sqrt(ab_t s^2 + 1 - ab_t) / sqrt(ab_T s^2 + 1 - ab_T); every
    sampler ends with x0_hat at t = 0, so the reference does too."""
    schedule, s = NoiseSchedule.linear(1000), 0.5
    model = GaussianDenoiser(schedule, s)
    noise = torch.randn(256, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    x = sample(model, schedule, tuple(noise.shape), sampler=sampler, noise=noise, clip=False,
               timesteps=spaced_timesteps(1000, steps, "linspace"))
    ab_T, ab_0 = schedule.alpha_bar[-1].item(), schedule.alpha_bar[0].item()
    x_0 = noise * ((ab_0 * s**2 + 1 - ab_0) / (ab_T * s**2 + 1 - ab_T)) ** 0.5
    reference = ab_0**0.5 * s**2 / (ab_0 * s**2 + 1 - ab_0) * x_0
    return (x.double() - reference).abs().mean().item()


@pytest.mark.parametrize("sampler, order", [("ddim", 1), ("dpm++2m", 2), ("dpm++3m", 2)])
def test_convergence_order(sampler, order):
    """The error against the exact ODE solution falls as steps^-order once the steps are small
    enough (from 40 of 1,000 here): DDIM first order (Song et al. 2021), DPM-Solver++(2M)
    second (Lu et al. 2022); (3M) measures about 2.4, its lower-order first and last steps
    capping it on this schedule."""
    steps = [40, 80, 160, 320]
    errors = [pf_ode_error(sampler, k) for k in steps]
    slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert order - 0.2 < slope < order + 0.6, (slope, errors)
    if sampler == "dpm++3m":
        assert errors[-1] < pf_ode_error("dpm++2m", 320) / 2


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("prediction", ["x0", "v"])
def test_every_target_samples_the_same(sampler, prediction):
    """The same exact denoiser read as eps, x0 or v gives the same samples."""
    schedule = NoiseSchedule.linear(1000)
    run = lambda p: sample(GaussianDenoiser(schedule, 0.5, p), schedule, (8, 1, 4, 4),  # noqa
                           sampler=sampler, steps=20, prediction=p, clip=False,
                           generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(run(prediction), run("eps"), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_zero_terminal_snr_with_v_prediction(sampler):
    """With alpha_bar_T = 0 the first step sees pure noise; v prediction still gives x0_hat,
    and every sampler recovers the data's variance without a NaN."""
    schedule = NoiseSchedule.linear(1000).rescale_zero_terminal_snr()
    model = GaussianDenoiser(schedule, 0.5, "v")
    x = sample(model, schedule, (2000, 1, 4, 4), sampler=sampler, prediction="v", clip=False,
               generator=torch.Generator().manual_seed(0))  # all 1,000 steps
    assert x.isfinite().all()
    assert x.var().item() == pytest.approx(0.25, rel=0.04)


def test_slerp_keeps_the_norm():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1, 3, 16, 16, generator=g), torch.randn(1, 3, 16, 16, generator=g)
    torch.testing.assert_close(slerp(a, b, 0.0), a)
    torch.testing.assert_close(slerp(a, b, 1.0), b)
    mid = slerp(a, b, 0.5)
    assert mid.norm().item() == pytest.approx((a.norm() * b.norm()).sqrt().item(), rel=0.05)
    assert (0.5 * (a + b)).norm() < 0.8 * mid.norm()  # the straight line loses norm


def test_given_noise_is_x_T():
    schedule = NoiseSchedule.linear(100)
    model = GaussianDenoiser(schedule, 0.5)
    noise = torch.randn(3, 1, 4, 4)
    frames = []
    sample(model, schedule, (3, 1, 4, 4), timesteps=[99], noise=noise, clip=False,
           callback=frames.append)
    ab = schedule.alpha_bar[99].item()
    expected_x0 = (noise - (1 - ab) ** 0.5 * model(noise, torch.full((3,), 99))) / ab**0.5
    torch.testing.assert_close(frames[0]["x0_hat"], expected_x0)


def test_bad_arguments():
    schedule = NoiseSchedule.linear(100)
    model = GaussianDenoiser(schedule, 0.5)
    with pytest.raises(ValueError, match="strictly decreasing"):
        sample(model, schedule, (1, 1, 2, 2), timesteps=[10, 50])
    with pytest.raises(ValueError, match="not both"):
        sample(model, schedule, (1, 1, 2, 2), timesteps=[50], steps=3)
    with pytest.raises(ValueError, match="eta is DDIM's"):
        sample(model, schedule, (1, 1, 2, 2), sampler="dpm++2m", eta=1.0)
    with pytest.raises(ValueError, match="unknown sampler"):
        sample(model, schedule, (1, 1, 2, 2), sampler="euler")
    with pytest.raises(ValueError, match=r"steps must lie in \[1, 100\], got 0"):
        sample(model, schedule, (1, 1, 2, 2), steps=0)  # not read as "all 100"
    with pytest.raises(ValueError, match="noise has shape"):
        sample(model, schedule, (1, 1, 2, 2), noise=torch.randn(2, 1, 2, 2))


class SlowDenoiser(GaussianDenoiser):
    """The exact denoiser, a tenth of a second a call: a sampler that takes a moment."""

    def forward(self, x, t):
        time.sleep(0.1)
        return super().forward(x, t)


def test_a_progress_bar_is_shown_only_when_asked_for(capsys):
    schedule = NoiseSchedule.linear(1000)
    model = SlowDenoiser(schedule, 0.5)
    seen = []
    sample(model, schedule, (2, 1, 4, 4), steps=8, progress=True, callback=seen.append)
    bar = capsys.readouterr().err
    assert "ddpm, 8 steps: 100%" in bar and "8/8" in bar and len(seen) == 8
    sample(model, schedule, (2, 1, 4, 4), steps=8)  # programs: no bar by default
    assert capsys.readouterr().err == ""
