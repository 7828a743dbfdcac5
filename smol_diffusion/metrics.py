"""Distances between sets of images: FID, KID, the sliced Wasserstein distance and near-copies.

FID and KID take features (N, D) from an extractor (`smol_diffusion.features`); FID compares
the Gaussians fitted to two sets (Heusel et al. 2017), KID the polynomial-kernel MMD between
them (Binkowski et al. 2018). The sliced Wasserstein distance (Karras et al. 2018) and the
near-copy share take the pixels themselves and need no network, so they score colour images
offline. None of these numbers means anything without the number of images: each is biased
at small n, so results always carry n, and the real-against-real floor at that n.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg

from .data import to_uint8


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


# ---- Sliced Wasserstein distance on Laplacian-pyramid patches (Karras et al. 2018, Sec. 5) --
# Needs no network, so it scores colour samples offline. Departures from ProGAN's code, each
# for small images: the pyramid goes down to 8 px (theirs, at 1024 px, stops at 16), and both
# sets of patches are normalised with the real set's per-channel mean and std (theirs
# normalises each set by its own, which hides a global shift of colour or brightness).

BINOMIAL_5 = (1.0, 4.0, 6.0, 4.0, 1.0)  # the pyramid's filter, /16 (Burt & Adelson 1983)
SWD_MIN_SIZE = 8  # the coarsest pyramid level, in pixels


def _blur(x: torch.Tensor) -> torch.Tensor:
    """The separable 5x5 binomial filter, reflecting at the borders (cv2.pyrDown's)."""
    c = x.shape[1]
    k = torch.tensor(BINOMIAL_5, dtype=x.dtype) / 16
    x = F.pad(x, (2, 2, 2, 2), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, 5).expand(c, 1, 1, 5), groups=c)
    return F.conv2d(x, k.view(1, 1, 5, 1).expand(c, 1, 5, 1), groups=c)


def laplacian_pyramid(x: torch.Tensor, min_size: int = SWD_MIN_SIZE) -> list[torch.Tensor]:
    """Band-pass levels of images (N, C, H, W), finest first, halving down to `min_size` px; the
    last level is the blurred image itself (Burt & Adelson 1983). They sum back to x."""
    levels = []
    while x.shape[-1] // 2 >= min_size and x.shape[-2] // 2 >= min_size:
        down = _blur(x)[..., ::2, ::2]  # (N, C, ceil(H/2), ceil(W/2))
        up = torch.zeros_like(x)
        up[..., ::2, ::2] = down
        levels.append(x - 4 * _blur(up))  # what the coarser level cannot hold
        x = down
    return levels + [x]


def _patches(level: torch.Tensor, corners: tuple[torch.Tensor, torch.Tensor],
             size: int) -> torch.Tensor:
    """The size x size patches of images (N, C, H, W) at `corners` (ys, xs), each (N, k):
    (N * k, C, size, size)."""
    ys, xs = corners
    image = torch.arange(len(level)).repeat_interleave(ys.shape[1])
    offsets = torch.arange(size)
    rows = (ys.reshape(-1, 1) + offsets)[:, :, None].expand(-1, -1, size)  # (P, size, size)
    cols = (xs.reshape(-1, 1) + offsets)[:, None, :].expand(-1, size, -1)
    return level.permute(0, 2, 3, 1)[image[:, None, None], rows, cols].permute(0, 3, 1, 2)


def _sliced_distance(a: torch.Tensor, b: torch.Tensor, directions: int,
                     gen: torch.Generator) -> float:
    """The sliced Wasserstein-1 distance of two equal-sized point sets (P, D): the mean, over
    random unit directions (in rounds of 128), of the distance between the sorted projections."""
    total, a, b = 0.0, a.numpy(), b.numpy()
    for _ in range(directions // 128):
        d = torch.randn(a.shape[1], 128, generator=gen, dtype=torch.float64)
        d = (d / d.norm(dim=0, keepdim=True)).float().numpy()
        # (128, P), sorted along P: numpy sorts rows 6x faster than torch.sort on a CPU
        pa, pb = (np.sort(d.T @ x.T, axis=1) for x in (a, b))
        total += float(np.abs(pa - pb).mean())
    return total / (directions // 128)


def sliced_wasserstein(images: torch.Tensor, real: torch.Tensor, patches: int = 128,
                       patch_size: int = 7, directions: int = 512, seed: int = 0) -> dict:
    """The sliced Wasserstein distance between images (N, C, H, W) and real images (M, C, H, W),
    both in [-1, 1] (rounded to 8 bits first), level by level of their Laplacian pyramids
    (Karras et al. 2018, Sec. 5; x 1e3, as they report it): `patches` random 7x7 patches an
    image (at the same places in image i of either set), normalised per channel with the real
    patches' mean and std, compared along `directions` (a multiple of 128) random directions.
    The larger set is subsampled to the smaller's size, so the distance is that of min(N, M)
    images a side. Returns {"value": the mean over levels,
    "levels": {resolution: distance}, "n": images a side}. 0 for a set against itself; two
    samples of one distribution give a small positive floor that falls as n grows."""
    if directions < 128 or directions % 128:
        raise ValueError(f"directions must be a multiple of 128 (ProGAN: 512); got {directions}")
    if images.shape[1:] != real.shape[1:]:
        raise ValueError(f"images {tuple(images.shape[1:])} and real images "
                         f"{tuple(real.shape[1:])} differ in shape")
    gen = torch.Generator().manual_seed(seed)
    n = min(len(images), len(real))
    if n < 2:
        raise ValueError(f"the sliced Wasserstein distance needs 2 images a side, got {n}")
    sides = [x[torch.randperm(len(x), generator=gen)[:n]] if len(x) > n else x
             for x in (images, real)]
    pyramids = [laplacian_pyramid(to_uint8(x).float()) for x in sides]
    levels = {}
    for a, b in zip(*pyramids):
        size = min(patch_size, *a.shape[-2:])
        corners = tuple(torch.randint(0, extent - size + 1, (n, patches), generator=gen)
                        for extent in a.shape[-2:])  # the same places in both sets
        pa, pb = (_patches(level, corners, size) for level in (a, b))
        mean = pb.mean(dim=(0, 2, 3), keepdim=True)
        std = pb.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-8)
        pa, pb = (((p - mean) / std).flatten(1) for p in (pa, pb))
        levels[a.shape[-1]] = 1e3 * _sliced_distance(pa, pb, directions, gen)
    return {"value": float(np.mean(list(levels.values()))), "levels": levels, "n": n}


# ---- Memorisation: how close samples come to the training images --------------------------

LEAVE_ONE_OUT_MAX = 1000  # training images that stand in for held-out ones (copies)


def nearest(images: torch.Tensor, bank: torch.Tensor, chunk: int = 256,
            own: torch.Tensor | None = None,
            period: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """For each image (N, C, H, W), the root-mean-square pixel distance to the closest image of
    `bank` (M, C, H, W), in [-1, 1] units, and that image's index: ((N,), (N,)). With `own`
    (N,), image i may not match bank image own[i], nor any whose index is congruent to it
    modulo `period` (default M): its mirror, in a bank of images followed by their mirrors."""
    flat = bank.flatten(1).float()
    slot = torch.arange(len(bank)) % (period or len(bank))
    dists, index = [], []
    for i in range(0, len(images), chunk):
        d = torch.cdist(images[i:i + chunk].flatten(1).float(), flat)  # (chunk, M)
        if own is not None:  # leave each image out
            d[slot[None, :] == own[i:i + chunk, None]] = float("inf")
        best = d.min(dim=1)
        dists.append(best.values / flat.shape[1] ** 0.5)
        index.append(best.indices)
    return torch.cat(dists), torch.cat(index)


def copies(samples: torch.Tensor, train: torch.Tensor, held_out: torch.Tensor | None,
           percentile: float = 1.0, flips: bool = False, seed: int = 0) -> dict:
    """Near-copies of training images among samples, all (N, C, H, W) in [-1, 1].

    Each sample's distance to its nearest training image (`nearest`; with `flips`, mirrored
    training images count too, as a model trained with flips may copy either) is compared
    with the same distance for held-out real images, which no model saw: a sample closer to a
    training image than all but `percentile`% of held-out images come is a near-copy. Without
    held-out images (None), up to 1,000 training images stand in, each left out of the bank.
    Returns {"value": the share of samples that are near-copies, "threshold": that distance,
    "real_share": the share of held-out images below it (about percentile/100 by design),
    "median": the samples' median distance, "real_median": the held-out images' one, and for
    each sample its "distances" (N,), "nearest" training image (N,) and whether that was
    "mirrored" (N,)}.
    """
    bank = torch.cat([train, train.flip(-1)]) if flips else train
    if held_out is None:
        pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
        pick = pick[:LEAVE_ONE_OUT_MAX]
        d_real, _ = nearest(train[pick], bank, own=pick, period=len(train))
    else:
        d_real, _ = nearest(held_out, bank)
    d, index = nearest(samples, bank)
    threshold = float(np.percentile(d_real.numpy(), percentile))
    return {"value": float((d < threshold).float().mean()), "threshold": threshold,
            "real_share": float((d_real < threshold).float().mean()),
            "median": float(d.median()), "real_median": float(d_real.median()),
            "distances": d, "nearest": index % len(train), "mirrored": index >= len(train)}
