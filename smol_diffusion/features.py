"""Feature extractors for FID and KID, behind one interface (`Extractor`):

- "inception": the FID Inception-v3 (TensorFlow's 2015-12-05 graph ported by pytorch-fid and
  used by pytorch-fid, torch-fidelity and clean-fid), 2048 pool features at 299x299, so FID
  numbers are comparable with the literature. Its weights are fetched on first use into torch
  hub's cache and checked against their SHA-256, as pytorch-fid and torch-fidelity do.
- "digits": a small CNN trained on the 5,000 embedded MNIST digits at the model's resolution
  (about a minute on a laptop CPU), cached under data/cache/; 128 pooled features, and class
  probabilities for the recognisability score. Offline, but only comparable within this repo.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import save_checkpoint
from .config import Config
from .data import mnist_5k, mnist_5k_arrays, to_model_range, unflipped
from .files import download
from .likelihood import quantize
from .metrics import gaussian_stats

FID_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   + FID_WEIGHTS)
# the whole file's SHA-256 (95,628,359 bytes); its first 8 hex digits are the name's suffix
FID_WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"


@dataclass
class Extractor:
    """A frozen network mapping images in [-1, 1] to features; `key` names its weights."""

    name: str  # "inception" or "digits"
    key: str  # a hash of the weights: part of every cache key built on these features
    net: nn.Module  # eval mode; net.features(x) -> (B, D); the digit CNN's forward gives logits
    device: torch.device

    def features(self, images: torch.Tensor, batch_size: int = 200) -> np.ndarray:
        """Features (N, D) in float64 of images (N, C, H, W) in [-1, 1], rounded to 8 bits
        first so that samples and real images are treated as the same PNG files would be."""
        return self._batched(self.net.features, images, batch_size)

    def probs(self, images: torch.Tensor, batch_size: int = 200) -> np.ndarray:
        """Class probabilities (N, 10) from the digit classifier."""
        if self.name != "digits":
            raise ValueError(f"the {self.name} extractor has no classifier head")
        return self._batched(lambda x: F.softmax(self.net(x), dim=1), images, batch_size)

    @torch.no_grad()
    def _batched(self, fn, images: torch.Tensor, batch_size: int) -> np.ndarray:
        """fn over the images in batches on the device, rounded to 8 bits, as float64."""
        out = [fn(quantize(images[i:i + batch_size].to(self.device)).float())
               for i in range(0, len(images), batch_size)]
        return torch.cat(out).double().cpu().numpy()


def weights_key(net: nn.Module) -> str:
    """The first 16 hex digits of a SHA-256 over the network's weights."""
    h = hashlib.sha256()
    for name, tensor in net.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


# ---- The FID Inception-v3 ------------------------------------------------------------------
# torchvision's Inception-v3 with the four differences of TensorFlow's 2015 graph: average
# pools that do not count the padding, and a max pool in the last block's pool branch.

def _tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def _max_pool(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


class _InceptionA(torchvision.models.inception.InceptionA):
    def _forward(self, x):
        return [self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                self.branch_pool(_tf_avg_pool(x))]


class _InceptionC(torchvision.models.inception.InceptionC):
    def _forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7dbl = x
        for i in range(1, 6):
            b7dbl = getattr(self, f"branch7x7dbl_{i}")(b7dbl)
        return [self.branch1x1(x), b7, b7dbl, self.branch_pool(_tf_avg_pool(x))]


class _InceptionE(torchvision.models.inception.InceptionE):
    pool = staticmethod(_tf_avg_pool)

    def _forward(self, x):
        b3 = self.branch3x3_1(x)
        b3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return [self.branch1x1(x),
                torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1),
                torch.cat([self.branch3x3dbl_3a(b3dbl), self.branch3x3dbl_3b(b3dbl)], 1),
                self.branch_pool(self.pool(x))]


class _InceptionEMaxPool(_InceptionE):
    pool = staticmethod(_max_pool)


class FIDInception(torchvision.models.Inception3):
    """The FID Inception-v3; `features` gives the 2048 pool3 features as pytorch-fid does."""

    def __init__(self):
        super().__init__(num_classes=1008, aux_logits=False, init_weights=False)
        self.Mixed_5b, self.Mixed_5c = _InceptionA(192, 32), _InceptionA(256, 64)
        self.Mixed_5d = _InceptionA(288, 64)
        self.Mixed_6b, self.Mixed_6c = _InceptionC(768, 128), _InceptionC(768, 160)
        self.Mixed_6d, self.Mixed_6e = _InceptionC(768, 160), _InceptionC(768, 192)
        self.Mixed_7b, self.Mixed_7c = _InceptionE(1280), _InceptionEMaxPool(2048)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 2048) from images (B, 1 or 3, H, W) in [-1, 1], resized to 299x299 bilinearly
        (pytorch-fid's resize; the network expects [-1, 1])."""
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # grey to RGB
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1",
                     "Conv2d_3b_1x1", "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c",
                     "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
                     "Mixed_7a", "Mixed_7b", "Mixed_7c", "avgpool"):
            x = getattr(self, name)(x)
        return x.flatten(1)  # (B, 2048)


def inception_extractor(weights: str | Path | None = None, device: torch.device | str = "cpu",
                        progress: bool = True) -> Extractor:
    """The FID Inception from `weights`, or from torch hub's cache (where pytorch-fid and
    torch-fidelity put it) when no path is given: fetched there on first use (92 MB,
    SHA-256-checked). Offline, a FileNotFoundError says where to put the file."""
    path = Path(weights) if weights else Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS
    if not weights and not path.is_file():
        try:
            download(FID_WEIGHTS_URL, path, FID_WEIGHTS_SHA256, progress=progress)
        except OSError as e:
            raise FileNotFoundError(f"no FID Inception weights: {e.strerror or e}, or pass "
                                    "its path (--inception_weights). Offline, the swd and "
                                    "copies metrics need no weights.") from e
    if not path.is_file():
        raise FileNotFoundError(
            f"no FID Inception weights at {path}. Download {FID_WEIGHTS_URL} on a machine with "
            f"internet, then put the file at {path} or pass its path (--inception_weights). "
            "Offline, the swd and copies metrics (and on the digits, the 'digits' extractor) "
            "need no weights.")
    net = FIDInception()
    try:
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as e:
        raise ValueError(f"{path} does not hold the FID Inception weights ({FID_WEIGHTS}): "
                         f"{e}") from e
    device = torch.device(device)
    return Extractor("inception", weights_key(net), net.to(device).eval(), device)


# ---- The digit classifier ------------------------------------------------------------------

class DigitCNN(nn.Module):
    """A small CNN for 1-channel digits of any size: four 3x3 conv pairs, global pooling."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(128, 10))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 128) pooled features."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 10) logits."""
        return self.head(self.body(x))


def train_digit_cnn(images: torch.Tensor, labels: torch.Tensor, epochs: int = 20,
                    seed: int = 0) -> DigitCNN:
    """Fit a DigitCNN (AdamW, one-cycle lr, random 1-pixel shifts) on images (N, 1, H, W);
    returns it in eval mode. The global RNG is left as it was."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        net = DigitCNN()
        opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
        steps = epochs * (len(images) // 64)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
        for _ in range(epochs):
            order = torch.randperm(len(images), generator=g)
            for i in range(0, len(order) - 63, 64):
                idx = order[i:i + 64]
                dx, dy = torch.randint(-1, 2, (2,), generator=g).tolist()
                x = torch.roll(images[idx], shifts=(dy, dx), dims=(2, 3))
                loss = F.cross_entropy(net(x), labels[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
    return net.eval()


def digit_extractor(image_size: int, cache_dir: str | Path = "data/cache",
                    device: torch.device | str = "cpu") -> Extractor:
    """The digit CNN trained on all 5,000 embedded digits at `image_size`, cached in
    `cache_dir` under a name that holds a hash of the digits and the size."""
    images = to_model_range(mnist_5k(image_size).images)  # (5000, 1, S, S) in [-1, 1]
    labels = torch.from_numpy(mnist_5k_arrays()[1])
    h = hashlib.sha256(images.numpy().tobytes() + labels.numpy().tobytes() + b"DigitCNN-v1")
    path = Path(cache_dir) / f"digits_cnn_{image_size}px_{h.hexdigest()[:12]}.pt"
    net = DigitCNN()
    if path.is_file():
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    else:
        net = train_digit_cnn(images, labels)
        save_checkpoint(path, net.state_dict())
    device = torch.device(device)
    return Extractor("digits", weights_key(net), net.eval().to(device), device)


# ---- Reference statistics: the training data in an extractor's space -----------------------

KID_REFERENCE_MAX = 10_000  # real features kept in the cache for KID


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
    dataset = unflipped(cfg)
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
