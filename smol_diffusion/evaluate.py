"""Evaluation of a checkpoint: FID, KID, recognisability and bits/dim (its command line:
`smol-diffusion evaluate --checkpoint checkpoints/demo/ckpt.pt --n 2000`, cli.py).

Samples are compared with the reference statistics of the data the model was trained on
(computed once per dataset, resolution and extractor, cached under data/cache/). Every result
row says how many images it used, which extractor, sampler and steps, and how long it took
(sampling and feature extraction included, shared by the metrics computed from one sample).
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .checkpoint import Checkpoint, requested_labels
from .config import Config
from .data import held_out, random_images, to_model_range, to_uint8, unflipped
from .features import Extractor, digit_extractor, inception_extractor, reference_stats
from .likelihood import bits_per_dim
from .metrics import (
    copies,
    frechet_distance,
    gaussian_stats,
    kid,
    recognisability,
    sliced_wasserstein,
)
from .viz import plot_copies, save_figure

FEATURE_METRICS = ("fid", "kid", "recognisable", "class_match")  # need an extractor
PIXEL_METRICS = ("swd", "copies")  # need no network: colour images, offline
SAMPLE_METRICS = FEATURE_METRICS + PIXEL_METRICS
METRICS = SAMPLE_METRICS + ("bpd",)
COPIES_SHOWN = 12  # sample/training pairs in the copies picture


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


def optional_extractor(cfg: Config, cache_dir: str | Path = "data/cache",
                       inception_weights: str | Path | None = None,
                       device: torch.device | str = "cpu",
                       name: str | None = None) -> Extractor | None:
    """`get_extractor`, or None, with a warning that says where to put the file, where the FID
    Inception weights cannot be had (offline): the one rule by which evaluations left to their
    defaults (here, on the command line and in training) go on without FID and KID."""
    try:
        return get_extractor(name, cfg, cache_dir, inception_weights, device)
    except FileNotFoundError as e:
        warnings.warn(f"{e} FID and KID are left out.", stacklevel=2)
        return None


def _default_extractor(cfg: Config) -> str:
    return "digits" if cfg.data.dataset == "mnist" else "inception"


def _sample_batches(ckpt: Checkpoint, n: int, extractor: Extractor | None, want_probs: bool,
                    sampler: str, steps: int, spacing: str, batch_size: int, seed: int,
                    progress: bool, guidance: float | None = None, keep: bool = False
                    ) -> tuple[np.ndarray | None, np.ndarray | None, torch.Tensor | None, float]:
    """Features (with an extractor), class probabilities (`want_probs`) and, with `keep`, the
    pixels (N, C, H, W) uint8 on the CPU of n samples, drawn batch by batch, and the seconds
    spent sampling. With `guidance`, a conditional model is asked for the classes in turn
    (`requested_labels`, over all n: batches need not hold whole rounds of classes)."""
    gen = torch.Generator().manual_seed(seed)
    feats, probs, pixels, seconds = [], [], [], 0.0
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
        if extractor is not None:
            feats.append(extractor.features(x))
        if want_probs:
            probs.append(extractor.probs(x))
        if keep:
            pixels.append(to_uint8(x))
        bar.update(len(x))
    bar.close()
    return (np.concatenate(feats) if feats else None, np.concatenate(probs) if probs else None,
            torch.cat(pixels) if keep else None, seconds)


def default_metrics(cfg: Config, extractor: str | Extractor | None,
                    real: bool = False) -> tuple[str, ...]:
    """All the metrics that apply: recognisable and class_match need the digit classifier,
    class_match also the samples of a conditional model; swd and copies score samples (their
    rows carry the real images' floor), so `real` leaves them out."""
    name = extractor.name if isinstance(extractor, Extractor) else extractor
    digits = (name or _default_extractor(cfg)) == "digits"
    return tuple(m for m in METRICS
                 if (digits or m not in ("recognisable", "class_match"))
                 and (not real or m not in PIXEL_METRICS)
                 and (m != "class_match" or (cfg.model.num_classes and not real)))


def evaluate(ckpt: Checkpoint, n: int = 500, *, metrics: tuple[str, ...] | None = None,
             extractor: str | Extractor | None = None, sampler: str | None = None,
             steps: int | None = None, spacing: str | None = None, real: bool = False,
             bpd_n: int = 500, batch_size: int = 250, seed: int = 0,
             cache_dir: str | Path = "data/cache", inception_weights: str | Path | None = None,
             guidance: float | None = None, progress: bool = False,
             copies_figure: str | Path | None = None) -> list[dict]:
    """Score a checkpoint's EMA model on `metrics` (default: all that apply); returns one row
    per metric:
    {"metric", "value", "std" (KID), "n", "extractor", "sampler", "steps", "seconds",
    "sampling_seconds" (the part of seconds spent drawing the samples)}.

    fid, kid and recognisable (the share of samples the digit classifier assigns a class
    with p >= 0.9; the row also gives how many of the ten classes appear) use n samples
    against the reference statistics of the training data; with `real`, n real images stand
    in for the samples, giving the floor each metric can reach at that n (held-out images
    when the model trained on the train split and the test split has n, else training images,
    which the reference statistics also hold). swd and copies need no network (`pixel_rows`):
    the sliced Wasserstein distance to held-out images, and the share of samples that are
    near-copies of training images, each beside its real floor; `copies_figure` saves a
    picture of the closest sample/training pairs there. bpd is the variational bound on bpd_n
    held-out images (the test split, when the model trained on the train split; otherwise
    images of its own split), with the checkpoint's reverse variance (a conditional model's
    without labels: the bound of its unconditional half).

    Left to its defaults, an evaluation that cannot get the FID Inception weights (offline)
    warns and leaves fid and kid out; asked for them, it raises.

    A class-conditional model draws its samples asking for each class in turn, at the
    classifier-free `guidance` scale (default 1: its conditional samples; 0: unconditional), and
    class_match is the share of samples the digit classifier assigns to the class asked for.

    `progress` shows progress bars over the samples, the reference features and the held-out
    images (the command line and the notebook turn them on; 50,000 samples take minutes).
    """
    cfg, device = ckpt.config, next(ckpt.model.parameters()).device
    if guidance is None and cfg.model.num_classes and not real:
        guidance = 1.0  # as Checkpoint.sample draws them: each class in turn
    defaulted, metrics = metrics is None, metrics or default_metrics(cfg, extractor, real)
    _check_request(cfg, metrics, n, batch_size, bpd_n, real, guidance)
    sampler, spacing = sampler or cfg.diffusion.sampler, spacing or cfg.diffusion.spacing
    steps = cfg.diffusion.sample_steps if steps is None else steps
    rows = []
    if set(FEATURE_METRICS) & set(metrics) and not isinstance(extractor, Extractor):
        extractor = (optional_extractor(cfg, cache_dir, inception_weights, device, extractor)
                     if defaulted else
                     get_extractor(extractor, cfg, cache_dir, inception_weights, device))
        if extractor is None:  # offline, left to the defaults
            metrics = tuple(m for m in metrics if m not in ("fid", "kid"))
    if any(m in SAMPLE_METRICS for m in metrics):
        t0 = time.time()
        features = [m for m in FEATURE_METRICS if m in metrics]
        if {"recognisable", "class_match"} & set(metrics) and extractor.name != "digits":
            raise ValueError("recognisable and class_match need the digits extractor")
        want_probs = bool({"recognisable", "class_match"} & set(metrics))
        ref = reference_stats(cfg, extractor, cache_dir, progress=progress) if features else None
        pixels = None
        if real:  # held-out images where there are enough, else training images
            split, data = held_out(cfg, at_least=n)
            x = random_images(data, n, seed)
            feats = extractor.features(x) if features else None
            probs = extractor.probs(x) if want_probs else None
            n, source, n_steps, sampling = len(x), f"real ({split} split)", None, 0.0
        else:
            feats, probs, pixels, sampling = _sample_batches(
                ckpt, n, extractor if features else None, want_probs, sampler, steps, spacing,
                batch_size, seed, progress, guidance, keep=bool(set(PIXEL_METRICS) & set(metrics)))
            source, n_steps = sampler, steps
        shared = time.time() - t0  # reference statistics, samples, features
        base = {"n": n, "extractor": extractor.name if features else None, "sampler": source,
                "steps": n_steps, "guidance": guidance, "sampling_seconds": round(sampling, 3)}
        for metric in features:
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
        if pixels is not None:
            t2 = time.time()
            for row in pixel_rows(cfg, pixels, metrics, seed, copies_figure):
                rows.append(base | row | {"extractor": None,  # swd: n is its images a side
                                          "n": row.get("swd_n", n),
                                          "seconds": round(shared + time.time() - t2, 2)})
    if "bpd" in metrics and not real:
        rows.append(_bpd_row(ckpt, bpd_n, batch_size, seed, progress))
    return rows


def _check_request(cfg: Config, metrics: tuple[str, ...], n: int, batch_size: int, bpd_n: int,
                   real: bool, guidance: float | None) -> None:
    """A ValueError saying what to change, for a request `evaluate` cannot answer."""
    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {', '.join(METRICS)}")
    if guidance is not None and not cfg.model.num_classes:
        raise ValueError("guidance needs a class-conditional model (num_classes > 0)")
    if guidance is not None and real:
        raise ValueError("real images are scored as they are, with no guidance: drop guidance")
    if n < 2 or batch_size < 1:
        raise ValueError(f"n must be at least 2 and batch_size at least 1; got {n}, {batch_size}")
    if "bpd" in metrics and not real and bpd_n < 1:
        raise ValueError(f"bpd_n (--bpd_n), the held-out images for bits/dim, must be at least 1; "
                         f"got {bpd_n}")
    if "class_match" in metrics and guidance is None:
        raise ValueError("class_match scores the samples of a class-conditional model "
                         "(num_classes > 0); this one is unconditional, or real images")
    if real and set(PIXEL_METRICS) & set(metrics):
        raise ValueError("swd and copies score samples, each beside its real floor in the same "
                         "row; drop them from the metrics, or drop real")


def pixel_rows(cfg: Config, samples: torch.Tensor, metrics: tuple[str, ...], seed: int = 0,
               copies_figure: str | Path | None = None) -> list[dict]:
    """The swd and copies rows (those in `metrics`) of samples (N, C, H, W) uint8 of a model
    trained on `cfg`'s data.

    swd: the sliced Wasserstein distance (`sliced_wasserstein`) of the samples to the held-out
    images (those of the test split, for a model trained on the train split; else half of its
    training images, set aside); "floor" is that of as many other training images, the value a
    model drawing the data's own distribution gets at this n, and "levels" and "floor_levels"
    give each pyramid level's.

    copies: the share of samples closer to a training image than 99% of held-out images are
    (`copies`; with the config's hflip, mirrored training images count); without a test split,
    each training image's distance to its nearest other one stands in for the held-out."""
    gen = torch.Generator().manual_seed(seed)
    train = to_model_range(unflipped(cfg).images)
    split, held = held_out(cfg, at_least=2)
    order = torch.randperm(len(train), generator=gen)
    if split != cfg.data.split:  # shuffled: a split may come in class order
        unseen = to_model_range(held.images)[torch.randperm(len(held), generator=gen)]
        others = train[order]
    else:  # no test split: half the training images stand in for it
        unseen, others = train[order[:len(order) // 2]], train[order[len(order) // 2:]]
    x = to_model_range(samples)
    rows = []
    if "swd" in metrics:
        k = min(len(x), len(unseen), len(others))
        got = sliced_wasserstein(x, unseen[:k], seed=seed)
        floor = sliced_wasserstein(others[:k], unseen[:k], seed=seed)
        rows.append({"metric": "swd", "value": got["value"], "levels": got["levels"],
                     "floor": floor["value"], "floor_levels": floor["levels"], "swd_n": k})
    if "copies" in metrics:
        found = copies(x, train, unseen if split != cfg.data.split else None,
                       flips=cfg.data.hflip, seed=seed)
        if copies_figure:
            save_figure(plot_copies(x, train, found, COPIES_SHOWN), copies_figure)
        rows.append({"metric": "copies", **{k: v for k, v in found.items()
                                            if k not in ("distances", "nearest", "mirrored")}})
    return rows


def _bpd_row(ckpt: Checkpoint, bpd_n: int, batch_size: int, seed: int, progress: bool) -> dict:
    """The bits/dim row: the bound on bpd_n held-out images (see `evaluate`)."""
    t0, cfg = time.time(), ckpt.config
    device = next(ckpt.model.parameters()).device
    split, data = held_out(cfg)
    x0 = random_images(data, bpd_n, seed).to(device)
    bpd = torch.cat([bits_per_dim(ckpt.model, ckpt.schedule, x0[i:i + batch_size],
                                  variance=cfg.diffusion.variance, progress=progress,
                                  prediction=cfg.diffusion.prediction,
                                  generator=torch.Generator(device).manual_seed(seed + i))
                     ["bpd"] for i in range(0, len(x0), batch_size)])
    return {"metric": "bpd", "value": bpd.mean().item(), "std": bpd.std().item() / len(bpd) ** 0.5,
            "n": len(bpd), "extractor": None, "sampler": f"bound on {split} split",
            "steps": ckpt.schedule.T, "seconds": round(time.time() - t0, 2)}


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
        elif r["metric"] == "swd":
            value = f"{r['value']:.3g} (real {r['floor']:.3g})"
        elif r["metric"] == "copies":
            value = f"{r['value']:.1%} (real {r['real_share']:.1%})"
        lines.append(f"{r['metric']:<13}{value:>18}{r['n']:>7}  {str(r['extractor']):<10}"
                     f"{str(r['sampler']):<22}{str(r['steps']):>6}"
                     f"{'' if r.get('guidance') is None else r['guidance']:>9}"
                     f"{r['seconds']:>9.1f}")
    for r in rows:  # the sliced Wasserstein distance level by level, beside the real floor
        if r["metric"] == "swd":
            lines.append("swd by level: " + ", ".join(
                f"{size} px {d:.3g} (real {r['floor_levels'][size]:.3g})"
                for size, d in r["levels"].items()) + f"; {r['swd_n']} images a side")
    return "\n".join(lines)

