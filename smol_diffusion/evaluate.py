"""Evaluation of a checkpoint: FID, KID, recognisability and bits/dim (its command line:
`smol-diffusion evaluate --checkpoint checkpoints/demo/ckpt.pt --n 2000`, cli.py).

Samples are compared with the reference statistics of the data the model was trained on
(computed once per dataset, resolution and extractor, cached under data/cache/). Every result
row says how many images it used, which extractor, sampler and steps, and how long it took
(sampling and feature extraction included, shared by the metrics computed from one sample).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .checkpoint import Checkpoint, requested_labels
from .config import Config
from .data import make_dataset, to_model_range
from .features import Extractor, digit_extractor, inception_extractor
from .likelihood import bits_per_dim
from .metrics import frechet_distance, gaussian_stats, kid, recognisability

SAMPLE_METRICS = ("fid", "kid", "recognisable", "class_match")
METRICS = SAMPLE_METRICS + ("bpd",)
KID_REFERENCE_MAX = 10_000  # real features kept in the cache for KID


def get_extractor(name: str | None, cfg: Config, cache_dir: str | Path = "data/cache",
                  inception_weights: str | Path | None = None,
                  device: torch.device | str = "cpu") -> Extractor:
    """The extractor `name`, or the default for the config's data: "digits" for the embedded
    digits, "inception" for anything else."""
    name = name or _default_extractor(cfg)
    if name == "digits":
        if cfg.data.dataset != "mnist":
            raise ValueError("the digits extractor only knows the embedded digits; use inception")
        return digit_extractor(cfg.model.image_size, cache_dir, device)
    if name == "inception":
        return inception_extractor(inception_weights, device)
    raise ValueError(f"unknown extractor {name!r}; use 'digits' or 'inception'")


def _default_extractor(cfg: Config) -> str:
    return "digits" if cfg.data.dataset == "mnist" else "inception"


def _held_out_split(cfg: Config) -> str:
    """The test split when the model trained on the train split of a dataset that has one (the
    digits, Stanford Cars; not an image folder), else its own split."""
    held_out = cfg.data.split == "train" and cfg.data.dataset != "folder"
    return "test" if held_out else cfg.data.split


def _dataset(cfg: Config, split: str | None = None):
    """The config's dataset (or another split of it) without random flips."""
    data = dataclasses.replace(cfg.data, hflip=False, split=split or cfg.data.split)
    return make_dataset(data, cfg.model.image_size, cfg.model.in_channels, progress=False)


def _real_images(dataset, k: int, seed: int) -> torch.Tensor:
    """k images (or all, if fewer) drawn at random without replacement, (k, C, H, W)."""
    pick = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:k]
    return to_model_range(dataset.images[pick])


def dataset_fingerprint(dataset) -> str:
    """A hash of what the dataset holds: its images' shape and every pixel."""
    h = hashlib.sha256(str(tuple(dataset.images.shape)).encode())
    h.update(dataset.images.contiguous().numpy().data)
    return h.hexdigest()


def _loader_features(dataset, extractor: Extractor, batch_size: int, progress: bool,
                     desc: str) -> np.ndarray:
    images = dataset.images  # (N, C, H, W) uint8
    return np.concatenate([extractor.features(to_model_range(images[i:i + batch_size]))
                           for i in tqdm(range(0, len(images), batch_size), desc=desc,
                                         disable=not progress, leave=False)])


def reference_stats(cfg: Config, extractor: Extractor, cache_dir: str | Path = "data/cache",
                    batch_size: int = 200, progress: bool = False) -> dict:
    """Mean, covariance and (up to 10,000) features of the training data in the extractor's
    space: {"mu", "sigma", "features", "n"}. Cached under a name holding a hash of the data's
    fingerprint, the resolution and the extractor's weights, so a stale cache never matches."""
    dataset = _dataset(cfg)
    key = json.dumps({"data": dataset_fingerprint(dataset), "size": cfg.model.image_size,
                      "channels": cfg.model.in_channels, "extractor": extractor.name,
                      "weights": extractor.key, "version": 1}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    path = Path(cache_dir) / (f"ref_{cfg.data.dataset}_{cfg.data.split}_"
                              f"{cfg.model.image_size}px_{extractor.name}_{digest}.npz")
    if path.is_file():
        with np.load(path) as f:
            if str(f["key"]) == key:
                return {k: f[k] for k in ("mu", "sigma", "features")} | {"n": int(f["n"])}
    feats = _loader_features(dataset, extractor, batch_size, progress, "reference features")
    mu, sigma = gaussian_stats(feats)
    keep = np.random.default_rng(0).permutation(len(feats))[:KID_REFERENCE_MAX]
    stats = {"mu": mu, "sigma": sigma, "features": feats[np.sort(keep)], "n": len(feats)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, key=key, **stats)
    tmp.replace(path)  # atomic: a crash leaves no half-written cache
    return stats


def _sample_batches(ckpt: Checkpoint, n: int, extractor: Extractor, want_probs: bool,
                    sampler: str, steps: int, spacing: str, batch_size: int, seed: int,
                    progress: bool, guidance: float | None = None
                    ) -> tuple[np.ndarray, np.ndarray | None, float]:
    """Features (and class probabilities) of n samples, drawn and embedded batch by batch, and
    the seconds spent sampling. With `guidance`, a conditional model is asked for the classes
    in turn (`requested_labels`, over all n: batches need not hold whole rounds of classes)."""
    gen = torch.Generator().manual_seed(seed)
    feats, probs, seconds = [], [], 0.0
    labels = requested_labels(n, ckpt.config.model.num_classes) if guidance is not None else None
    bar = tqdm(total=n, desc="sampling", unit="img", disable=not progress, leave=False)
    for i in range(0, n, batch_size):
        t0 = time.perf_counter()
        extra = {} if labels is None else {"labels": labels[i:i + batch_size],
                                           "guidance": guidance}
        x = ckpt.sample(min(batch_size, n - i), sampler=sampler, steps=steps,
                        spacing=spacing, generator=gen, **extra)
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - t0
        feats.append(extractor.features(x))
        if want_probs:
            probs.append(extractor.probs(x))
        bar.update(len(x))
    bar.close()
    return np.concatenate(feats), np.concatenate(probs) if want_probs else None, seconds


def default_metrics(cfg: Config, extractor: str | Extractor | None,
                    real: bool = False) -> tuple[str, ...]:
    """All the metrics that apply: recognisable and class_match need the digit classifier,
    class_match also the samples of a conditional model (not real images)."""
    name = extractor.name if isinstance(extractor, Extractor) else extractor
    if (name or _default_extractor(cfg)) != "digits":
        return ("fid", "kid", "bpd")
    return tuple(m for m in METRICS
                 if m != "class_match" or (cfg.model.num_classes and not real))


def evaluate(ckpt: Checkpoint, n: int = 500, *, metrics: tuple[str, ...] | None = None,
             extractor: str | Extractor | None = None, sampler: str | None = None,
             steps: int | None = None, spacing: str | None = None, real: bool = False,
             bpd_n: int = 500, batch_size: int = 250, seed: int = 0,
             cache_dir: str | Path = "data/cache", inception_weights: str | Path | None = None,
             guidance: float | None = None, progress: bool = False) -> list[dict]:
    """Score a checkpoint's EMA model on `metrics` (default: all that apply); returns one row
    per metric:
    {"metric", "value", "std" (KID), "n", "extractor", "sampler", "steps", "seconds",
    "sampling_seconds" (the part of seconds spent drawing the samples)}.

    fid, kid and recognisable (the share of samples the digit classifier assigns a class
    with p >= 0.9; the row also gives how many of the ten classes appear) use n samples
    against the reference statistics of the training data; with `real`, n real images stand
    in for the samples, giving the floor each metric can reach at that n (held-out images
    when the model trained on the train split and the test split has n, else training images,
    which the reference statistics also hold). bpd is the variational bound on bpd_n held-out
    images (the test split, when the model trained on the train split of the digits or Stanford
    Cars; otherwise images of its own split), with the checkpoint's reverse variance (a
    conditional model's without labels: the bound of its unconditional half).

    A class-conditional model draws its samples asking for each class in turn, at the
    classifier-free `guidance` scale (default 1: its conditional samples; 0: unconditional), and
    class_match is the share of samples the digit classifier assigns to the class asked for.

    `progress` shows progress bars over the samples, the reference features and the held-out
    images (the command line and the notebook turn them on; 50,000 samples take minutes).
    """
    if guidance is not None and not ckpt.config.model.num_classes:
        raise ValueError("guidance needs a class-conditional model (num_classes > 0)")
    if guidance is not None and real:
        raise ValueError("real images are scored as they are, with no guidance: drop guidance")
    if guidance is None and ckpt.config.model.num_classes and not real:
        guidance = 1.0  # as Checkpoint.sample draws them: each class in turn
    metrics = metrics or default_metrics(ckpt.config, extractor, real)
    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {', '.join(METRICS)}")
    if n < 2 or batch_size < 1:
        raise ValueError(f"n must be at least 2 and batch_size at least 1; got {n}, {batch_size}")
    if "bpd" in metrics and not real and bpd_n < 1:
        raise ValueError(f"bpd_n (--bpd_n), the held-out images for bits/dim, must be at least 1; "
                         f"got {bpd_n}")
    cfg, device = ckpt.config, next(ckpt.model.parameters()).device
    sampler, spacing = sampler or cfg.diffusion.sampler, spacing or cfg.diffusion.spacing
    steps = cfg.diffusion.sample_steps if steps is None else steps
    rows = []
    if any(m in SAMPLE_METRICS for m in metrics):
        t0 = time.time()
        if not isinstance(extractor, Extractor):
            extractor = get_extractor(extractor, cfg, cache_dir, inception_weights, device)
        if {"recognisable", "class_match"} & set(metrics) and extractor.name != "digits":
            raise ValueError("recognisable and class_match need the digits extractor")
        if "class_match" in metrics and guidance is None:
            raise ValueError("class_match scores the samples of a class-conditional model "
                             "(num_classes > 0); this one is unconditional, or real images")
        want_probs = bool({"recognisable", "class_match"} & set(metrics))
        ref = reference_stats(cfg, extractor, cache_dir, progress=progress)
        if real:  # held-out images where there are enough, else training images
            split = _held_out_split(cfg)
            data = _dataset(cfg, split)
            if len(data) < n:
                split, data = cfg.data.split, _dataset(cfg)
            x = _real_images(data, n, seed)
            feats = extractor.features(x)
            probs = extractor.probs(x) if want_probs else None
            n, source, n_steps, sampling = len(x), f"real ({split} split)", None, 0.0
        else:
            feats, probs, sampling = _sample_batches(ckpt, n, extractor, want_probs, sampler,
                                                     steps, spacing, batch_size, seed, progress,
                                                     guidance)
            source, n_steps = sampler, steps
        shared = time.time() - t0  # extractor, reference statistics, samples, features
        base = {"n": n, "extractor": extractor.name, "sampler": source, "steps": n_steps,
                "guidance": guidance, "sampling_seconds": round(sampling, 3)}
        for metric in [m for m in SAMPLE_METRICS if m in metrics]:
            t2 = time.time()
            if metric == "fid":
                row = {"value": frechet_distance(*gaussian_stats(feats), ref["mu"], ref["sigma"])}
            elif metric == "kid":
                mean, std = kid(feats, ref["features"], seed=seed)
                row = {"value": mean, "std": std}
            elif metric == "recognisable":
                row = recognisability(probs)
            else:
                asked = requested_labels(n, cfg.model.num_classes).numpy()
                row = {"value": float((probs.argmax(axis=1) == asked).mean())}
            rows.append({"metric": metric, **row, **base,
                         "seconds": round(shared + time.time() - t2, 2)})
    if "bpd" in metrics and not real:
        t0 = time.time()
        split = _held_out_split(cfg)
        x0 = _real_images(_dataset(cfg, split), bpd_n, seed).to(device)
        bpd = torch.cat([bits_per_dim(ckpt.model, ckpt.schedule, x0[i:i + batch_size],
                                      variance=cfg.diffusion.variance, progress=progress,
                                      prediction=cfg.diffusion.prediction,
                                      generator=torch.Generator(device).manual_seed(seed + i))
                         ["bpd"] for i in range(0, len(x0), batch_size)])
        rows.append({"metric": "bpd", "value": bpd.mean().item(),
                     "std": bpd.std().item() / len(bpd) ** 0.5, "n": len(bpd),
                     "extractor": None, "sampler": f"bound on {split} split",
                     "steps": ckpt.schedule.T, "seconds": round(time.time() - t0, 2)})
    return rows


def format_table(rows: list[dict]) -> str:
    """The rows as an aligned text table."""
    lines = [f"{'metric':<13}{'value':>18}{'n':>7}  {'extractor':<10}{'sampler':<22}"
             f"{'steps':>6}{'guidance':>9}{'seconds':>9}"]
    for r in rows:
        value = f"{r['value']:.4g}" + (f" ± {r['std']:.2g}" if "std" in r else "")
        if r["metric"] == "recognisable":
            value = f"{r['value']:.1%} ({r['classes']}/10)"
        elif r["metric"] == "class_match":
            value = f"{r['value']:.1%}"
        lines.append(f"{r['metric']:<13}{value:>18}{r['n']:>7}  {str(r['extractor']):<10}"
                     f"{str(r['sampler']):<22}{str(r['steps']):>6}"
                     f"{'' if r.get('guidance') is None else r['guidance']:>9}"
                     f"{r['seconds']:>9.1f}")
    return "\n".join(lines)

