"""Shared fixtures: a tiny configuration that trains in seconds on two CPU cores, the exact
denoiser of Gaussian data, and a Stanford Cars folder in torchvision's layout."""
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat
from torch import nn

from smol_diffusion import NoiseSchedule, get_preset
from smol_diffusion.diffusion import target


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _offline(tmp_path_factory, monkeypatch):
    """No test reaches the network: the FID Inception weights are fetched from a port of
    127.0.0.1 that refuses connections, into an empty torch hub folder of the test's own."""
    from smol_diffusion import features

    monkeypatch.setattr(features, "FID_WEIGHTS_URL", f"http://127.0.0.1:9/{features.FID_WEIGHTS}")
    hub = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path_factory.mktemp("hub")))
    yield
    torch.hub.set_dir(hub)


@pytest.fixture
def tiny_cfg(tmp_path):
    """The demo preset shrunk: 8x8 digits, a 2-level UNet, 1,000-step schedule; unconditional
    (the tests of conditional models set num_classes)."""
    return get_preset("demo").override(
        image_size=8, channels=16, channel_mults=(1, 2), attn_resolutions=(4,), heads=2,
        num_classes=0,
        steps=40, batch_size=16, warmup=5, log_every=10, sample_every=20, sample_n=4,
        sample_steps=5, checkpoint_every=20, out_dir=str(tmp_path / "run"))


class GaussianDenoiser(nn.Module):
    """The exact denoiser of data x0 ~ N(0, sigma_d^2 I), outputting eps (by default), x0 or v:
    E[x0 | x_t] = alpha sigma_d^2 x_t / (ab sigma_d^2 + 1 - ab), E[eps | x_t] = sigma x_t /
    (ab sigma_d^2 + 1 - ab), with alpha = sqrt(ab), sigma = sqrt(1 - ab), ab = alpha_bar_t."""

    def __init__(self, schedule: NoiseSchedule, sigma_d: float, prediction: str = "eps"):
        super().__init__()
        self.register_buffer("alpha_bar", schedule.alpha_bar.float())
        self.sigma_d, self.prediction = sigma_d, prediction
        self.dummy = nn.Parameter(torch.zeros(()))  # gives the module a device
        self.seen = []

    def forward(self, x, t):
        self.seen.append(int(t[0]))
        ab = self.alpha_bar[t].view(-1, 1, 1, 1)
        alpha, sigma, var = ab.sqrt(), (1 - ab).sqrt(), ab * self.sigma_d**2 + 1 - ab
        eps, x0 = sigma * x / var, alpha * self.sigma_d**2 * x / var
        return target(x0, eps, alpha, sigma, self.prediction)


def write_image(path, size=(40, 30), color=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def write_annotations(path, names):
    dtype = [("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"), ("bbox_y2", "O"),
             ("class", "O"), ("fname", "O")]
    rec = np.array([(1, 1, 10, 10, 1 + i % 2, n) for i, n in enumerate(names)], dtype=dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    savemat(str(path), {"annotations": rec.reshape(1, -1)})


@pytest.fixture
def torchvision_layout(tmp_path):
    base = tmp_path / "stanford_cars"
    train = ["00001.jpg", "00002.jpg", "00003.jpg"]
    for split, names in (("train", train), ("test", ["00001.jpg"])):
        for n in names:
            write_image(base / f"cars_{split}" / n)
    write_annotations(base / "devkit" / "cars_train_annos.mat", train)
    write_annotations(base / "cars_test_annos_withlabels.mat", ["00001.jpg"])
    write_image(base / "cars_train" / "stray.jpg")  # not in the annotations: ignored
    return tmp_path


def _tmpfs(tmp_path, options: str):
    """A tmpfs mounted at tmp_path/disk with `options`, unmounted (lazily: a failed test's
    traceback may still map a file there) after the test; skips where mounting is not permitted
    (it takes root)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(disk)],
                       capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here (it takes root): {r.stderr.decode().strip()}")
    yield disk
    subprocess.run(["umount", "--lazy", str(disk)], check=True)


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB file system to fill."""
    yield from _tmpfs(tmp_path, "size=1m")


@pytest.fixture
def read_only_disk(tmp_path):
    """A file system that cannot be written."""
    yield from _tmpfs(tmp_path, "size=1m,ro")


@pytest.fixture
def read_only_copy(tmp_path):
    """A function that copies files into a new file system, makes it read-only and returns its
    folder: a Kaggle input holding a checkpoint, say."""
    disk = _tmpfs(tmp_path, "size=64m")
    folder = next(disk)

    def copy(*files):
        for f in files:
            shutil.copy(f, folder)
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        return folder
    yield copy
    next(disk, None)
