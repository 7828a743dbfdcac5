"""A real colour image set that installs from Debian: the Oxygen icon theme's PNG icons, built
into a folder of one size for `dataset="folder"` (`smol-diffusion icons --out data/icons32`).

Icons are what a person's own small folder often is: a few thousand hand-drawn pictures with
shared styles (folders, documents, devices, faces) on a plain background. Each icon name is
taken once, from the largest PNG the theme has of it (never one smaller than the size asked
for, which would come out blurred), its transparent pixels composited onto white, resized to
`size` x `size` (Lanczos) and saved as an RGB PNG. Images that repeat another's pixels, or all
but match them or their mirror image (`NEAR`), are dropped, so the held-out split holds no copy
of a training image.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from .data import to_model_range
from .files import shown
from .images import DatasetError, to_8bit

OXYGEN = Path("/usr/share/icons/oxygen/base")  # Debian's oxygen-icon-theme
LICENCE = ("LGPL-3+: the Oxygen icon theme (KDE; David Vignoni, Nuno Pinheiro and others), "
           "Debian's oxygen-icon-theme, see /usr/share/doc/oxygen-icon-theme/copyright")
INSTALL = "apt-get install oxygen-icon-theme (Debian, Ubuntu)"
# Icons closer than this to an earlier one are dropped: 2.5 grey levels of 255, root-mean-square,
# the difference of one drawing resized from two sizes, or recoloured by a pixel or two
NEAR = 0.02


def icon_sources(source: Path, size: int) -> dict[str, Path]:
    """Each icon's largest PNG of at least `size` px, by name ("places/folder-blue"), from a
    theme laid out as source/<W>x<H>/<context>/<name>.png."""
    best: dict[str, tuple[int, Path]] = {}
    for folder in source.iterdir():
        width = folder.name.partition("x")[0]
        if not (folder.is_dir() and width.isdigit()) or int(width) < size:
            continue
        for path in folder.rglob("*.png"):
            name = path.relative_to(folder).with_suffix("").as_posix()
            if int(width) > best.get(name, (0, path))[0]:
                best[name] = (int(width), path)
    return {name: path for name, (_, path) in sorted(best.items())}


def build_icons(out: str | Path, size: int = 32, source: str | Path = OXYGEN,
                limit: int | None = None) -> int:
    """Build the icon folder `out` (see the module's docstring) and return how many images it
    holds; `limit` keeps the first icons by name (tests). The folder is written under a
    temporary name and renamed when complete; an existing `out` is never written into."""
    out, source = Path(out), Path(source)
    if out.exists():
        raise FileExistsError(f"{shown(out)} already exists; delete it to build it again, or "
                              "choose another --out")
    if not source.is_dir():
        raise DatasetError(f"no icon theme at {source}: {INSTALL}")
    names = list(icon_sources(source, size).items())[:limit]
    if not names:
        raise DatasetError(f"no PNG icons of {size} px or more under {source}")
    icons = {}
    for name, path in names:
        with Image.open(path) as img:
            icons[name] = to_8bit(img, "RGB").resize((size, size), Image.LANCZOS)
    keep = distinct(torch.stack([pil_to_tensor(icon) for icon in icons.values()]))
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for i in keep:
            name = list(icons)[i]
            icons[name].save(tmp / f"{name.replace('/', '_')}.png")
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return len(keep)


def distinct(images: torch.Tensor, tolerance: float = NEAR) -> list[int]:
    """Indices of uint8 images (N, C, H, W) with no earlier image, or its mirror image, within
    `tolerance` of them (root-mean-square, in units of the [-1, 1] range): the first of each
    group of duplicates. Mirrors count because a model trained with flips sees both."""
    x = to_model_range(images).flatten(1)
    mirrored = to_model_range(images.flip(-1)).flatten(1)
    d = torch.minimum(torch.cdist(x, x), torch.cdist(x, mirrored)) / x.shape[1] ** 0.5  # (N, N)
    keep: list[int] = []
    for i in range(len(x)):
        if not keep or d[i, keep].min() >= tolerance:
            keep.append(i)
    return keep
