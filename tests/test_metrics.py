"""FID and KID against closed forms and known properties of their estimators."""
import numpy as np
import pytest

from smol_diffusion.metrics import frechet_distance, gaussian_stats, kid, recognisability


def random_cov(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_distance_of_two_gaussians():
    """Against the closed form with Tr((S1^1/2 S2 S1^1/2)^1/2), computed from eigenvalues."""
    rng = np.random.default_rng(0)
    d = 6
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = random_cov(rng, d), random_cov(rng, d)
    w, v = np.linalg.eigh(s1)
    root1 = v @ np.diag(np.sqrt(w)) @ v.T
    cross = np.sqrt(np.linalg.eigvalsh(root1 @ s2 @ root1)).sum()
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * cross
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2 with standard deviations s
    assert frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([3.0]),
                            np.array([[9.0]])) == pytest.approx(4.0 + 1.0)


def test_frechet_distance_of_a_set_with_itself_and_its_halves():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4000, 8))
    stats = gaussian_stats(x)
    assert abs(frechet_distance(*stats, *stats)) < 1e-8
    halves = frechet_distance(*gaussian_stats(x[:2000]), *gaussian_stats(x[2000:]))
    shifted = frechet_distance(*gaussian_stats(x[:2000]), *gaussian_stats(x[2000:] + 0.5))
    assert 0 <= halves < 0.05  # estimator noise: about 2 d (d+1) / n
    assert shifted == pytest.approx(8 * 0.25, rel=0.1)


def test_frechet_distance_with_fewer_samples_than_dimensions_is_finite():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(20, 64)), rng.normal(size=(20, 64))
    fd = frechet_distance(*gaussian_stats(a), *gaussian_stats(b))
    assert np.isfinite(fd) and fd > 0


def test_frechet_distance_rejects_mismatched_dimensions():
    with pytest.raises(ValueError, match="dimensions"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_kid_is_unbiased_for_one_distribution():
    """Over many small draws from one distribution the estimates average to zero; the biased
    estimate (keeping the k(x, x) terms) would sit clearly above it."""
    rng = np.random.default_rng(3)
    d, m = 4, 20
    estimates, biased = [], []
    for i in range(300):
        x, y = rng.normal(size=(m, d)), rng.normal(size=(m, d))
        estimates.append(kid(x, y, subsets=1, subset_size=m, seed=i)[0])
        k = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
        biased.append(k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean())
    mean, sem = np.mean(estimates), np.std(estimates) / np.sqrt(len(estimates))
    assert abs(mean) < 3 * sem
    assert np.mean(biased) > mean + 10 * sem


def test_kid_sees_a_shift():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(500, 8)), rng.normal(size=(500, 8)) + 0.5
    mean, std = kid(x, y, subsets=20, subset_size=200)
    assert mean > 5 * std > 0


def test_recognisability():
    probs = np.array([[0.95, 0.05], [0.5, 0.5], [0.02, 0.98], [0.91, 0.09]])
    r = recognisability(probs)
    assert r["value"] == 0.75 and r["classes"] == 2 and r["counts"] == [2, 1]

