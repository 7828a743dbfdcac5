"""Distances between sets of image features: Frechet distance (FID) and KID.

Both take features (N, D) from an extractor (`smol_diffusion.features`); FID compares the
Gaussians fitted to two sets (Heusel et al. 2017), KID the polynomial-kernel MMD between them
(Binkowski et al. 2018). Neither number means anything without the number of samples: FID is
biased upwards at small n, so results always carry n.
"""
from __future__ import annotations

import warnings

import numpy as np
from scipy import linalg


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) of features (N, D), in float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"need features of shape (N >= 2, D), got {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), the Frechet distance of two Gaussians.

    The matrix square root comes from scipy's `sqrtm`. With too few samples for the
    dimension, S1 S2 is singular and the root is not finite: then both covariances get
    eps * I added, as the reference implementations (TTUR, pytorch-fid) do. The root of a
    product of covariances is real in exact arithmetic; a small imaginary residue from rounding
    is dropped, a large one is an error.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(
        np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics of different dimensions: {mu1.shape} vs {mu2.shape}")
    with warnings.catch_warnings():  # scipy warns of singular products; handled below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = eps * np.eye(len(sigma1))
            covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        imag = np.abs(covmean.imag).max()
        if imag > 1e-3 * max(1.0, np.abs(covmean.real).max()):
            raise ValueError(f"the matrix square root has an imaginary part of {imag:.3g}: the "
                             "covariances are far from positive definite (too few samples?)")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def kid(features1: np.ndarray, features2: np.ndarray, subsets: int = 100,
        subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (Binkowski et al. 2018): (mean, std) over random subsets.

    Each subset of m features from each set gives the unbiased estimate of MMD^2 with the
    kernel k(x, y) = (x.y / D + 1)^3 (their Eq. 4: the diagonal k(x, x) terms are left out),
    so the mean is unbiased at any m; m is min(subset_size, n1, n2).
    """
    f1, f2 = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    m = min(subset_size, len(f1), len(f2))
    if m < 2:
        raise ValueError(f"KID needs at least 2 features in each set, got {len(f1)}, {len(f2)}")
    d = f1.shape[1]
    rng = np.random.default_rng(seed)
    mmd = np.empty(subsets)
    for i in range(subsets):
        x = f1[rng.choice(len(f1), m, replace=False)]
        y = f2[rng.choice(len(f2), m, replace=False)]
        k_xx, k_yy, k_xy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
        off_diag = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
        mmd[i] = off_diag - 2 * k_xy.mean()
    return float(mmd.mean()), float(mmd.std())


def recognisability(probs: np.ndarray, threshold: float = 0.9) -> dict:
    """{"value": the share of images whose top class has probability >= threshold, "classes":
    how many classes those confident images cover, "counts": confident images per class}."""
    probs = np.asarray(probs)
    confident = probs.max(axis=1) >= threshold
    counts = np.bincount(probs.argmax(axis=1)[confident], minlength=probs.shape[1])
    return {"value": float(confident.mean()), "classes": int((counts > 0).sum()),
            "counts": counts.tolist()}
