"""Image files decoded once: upright, 8-bit, centre-cropped and resized, into a uint8 cache on
disk that later runs memory-map instead of decoding again."""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms import InterpolationMode
from torchvision.transforms.functional import center_crop, pil_to_tensor, resize
from tqdm.auto import tqdm

from .files import no_space, pid_alive, ran_out_of_space, remove_stale, require_space, shown

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}

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


def read_image(path: str | Path, image_size: int, channels: int,
               fit: bool = False) -> torch.Tensor:
    """An image file as a model of `channels` at `image_size` takes it, (C, S, S) uint8. One
    of another size or number of channels is refused with the fix, unless `fit`: then it is
    centre-cropped, resized and converted as training images are (`load_image`)."""
    path = Path(path)
    if not fit:
        try:
            with Image.open(path) as img:
                size, bands = img.size, [b for b in img.getbands() if b not in ("A", "a")]
        except (OSError, ValueError) as e:
            raise DatasetError(f"could not read image {shown(path)}: {e}") from e
        c = 1 if len(bands) == 1 and img.mode != "P" else 3  # a palette holds colours
        if size != (image_size, image_size) or c != channels:
            raise ValueError(f"{shown(path)} is {size[0]}x{size[1]} with {c} channel(s), but "
                             f"the model takes {image_size}x{image_size} with {channels}: pass "
                             "--resize to centre-crop, resize and convert it")
    return load_image(path, image_size, channels)


def read_mask(path: str | Path, image_size: int, fit: bool = False) -> torch.Tensor:
    """A mask file as (1, 1, S, S) floats: white (255) where the image is kept, black (0) where
    it is filled in, nothing between. Another size is refused unless `fit` (centre-cropped
    and resized to the nearest pixel, which keeps it black and white)."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            img = to_8bit(ImageOps.exif_transpose(img), "L")
    except (OSError, ValueError) as e:
        raise DatasetError(f"could not read mask {shown(path)}: {e}") from e
    m = pil_to_tensor(img)  # (1, h, w) uint8
    if tuple(m.shape[1:]) != (image_size, image_size):
        if not fit:
            raise ValueError(f"mask {shown(path)} is {m.shape[2]}x{m.shape[1]}, but the images "
                             f"are {image_size}x{image_size}: pass --resize, or draw it at "
                             "that size")
        m = center_crop(m, [min(m.shape[1:])])
        m = resize(m, [image_size, image_size], InterpolationMode.NEAREST)
    grey = m[(m != 0) & (m != 255)]
    if len(grey):
        raise ValueError(f"mask {shown(path)} holds grey levels (such as {int(grey[0])}); it "
                         "must be black (0: fill in) and white (255: keep) only")
    return (m[None] == 255).float()
