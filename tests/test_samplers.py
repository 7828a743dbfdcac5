"""The ancestral sampler with the exact denoiser of Gaussian data, whose answer is known."""
import pytest
import torch

from smol_diffusion import NoiseSchedule, sample

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


def test_steps_respace_the_training_schedule():
    schedule = NoiseSchedule.linear(1000)
    model = GaussianDenoiser(schedule, 0.5)
    sample(model, schedule, (1, 1, 2, 2), steps=10)
    assert model.seen[0] == 999 and model.seen[-1] == 0 and len(model.seen) == 10
    model.seen.clear()
    sample(model, schedule, (1, 1, 2, 2))
    assert model.seen == list(range(999, -1, -1))


def test_generator_makes_it_deterministic_and_output_is_clipped():
    schedule = NoiseSchedule.linear(1000)
    model = GaussianDenoiser(schedule, 2.0)
    a = sample(model, schedule, (4, 1, 4, 4), steps=20, generator=torch.Generator().manual_seed(3))
    b = sample(model, schedule, (4, 1, 4, 4), steps=20, generator=torch.Generator().manual_seed(3))
    c = sample(model, schedule, (4, 1, 4, 4), steps=20, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    assert a.abs().max() <= 1


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
    with pytest.raises(ValueError, match="unknown sampler"):
        sample(model, schedule, (1, 1, 2, 2), sampler="euler")
    with pytest.raises(ValueError, match="noise has shape"):
        sample(model, schedule, (1, 1, 2, 2), noise=torch.randn(2, 1, 2, 2))
