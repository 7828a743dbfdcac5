"""Every dataset layout on fixture folders made here, the image cache, batches and flips, and
the errors for bad input."""
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat

from smol_diffusion import DataConfig
from smol_diffusion.data import (DatasetError, batches, cached_images, find_images, make_dataset,
                                 mnist_5k, mnist_5k_arrays, stanford_cars_files, to_device)


def data_cfg(tmp_path, **kw):
    """A DataConfig whose image cache lives in the test's own folder."""
    return DataConfig(cache_dir=str(tmp_path / "cache"), **kw)


def write_image(path, size=(40, 30), color=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def write_annotations(path, names):
    dtype = [("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"), ("bbox_y2", "O"),
             ("class", "O"), ("fname", "O")]
    rec = np.array([(1, 1, 10, 10, 1, n) for n in names], dtype=dtype)
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


def test_flips_are_random_horizontal_and_on_the_device():
    batch = torch.zeros(64, 1, 8, 8, dtype=torch.uint8)
    batch[..., :4] = 255  # left half white
    torch.manual_seed(0)
    x = to_device(batch, torch.device("cpu"), hflip=True)
    assert x.dtype == torch.float32 and x.shape == batch.shape
    lefts = x[:, 0, :, :4].mean(dim=(1, 2))
    assert set(lefts.tolist()) == {1.0, -1.0} and 16 < int((lefts < 0).sum()) < 48
    flipped = lefts < 0
    assert (x[flipped] == x[~flipped][0].flip(-1)).all()  # a mirror image, nothing else
    assert (to_device(batch, torch.device("cpu"), hflip=False)[:, 0, :, :4] == 1).all()


def test_batches_cover_each_epoch_once_in_a_seeded_order():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1)
    epoch0 = [b.flatten().tolist() for b in batches(images, 3, seed=1, epoch=0)]
    assert len(epoch0) == 3 and len({v for b in epoch0 for v in b}) == 9  # last 1 dropped
    assert epoch0 == [b.flatten().tolist() for b in batches(images, 3, seed=1, epoch=0)]
    assert epoch0 != [b.flatten().tolist() for b in batches(images, 3, seed=1, epoch=1)]
    assert epoch0[1:] == [b.flatten().tolist() for b in batches(images, 3, 1, 0, skip=1)]


def test_image_cache_is_built_once_and_keyed_by_files_and_size(tmp_path, monkeypatch):
    for i in range(5):
        write_image(tmp_path / "img" / f"{i}.png", color=(50 * i, 0, 0))
    paths, cache = find_images(tmp_path / "img"), tmp_path / "cache"
    x = cached_images(paths, 8, 3, cache, progress=False)
    assert x.dtype == torch.uint8 and x.shape == (5, 3, 8, 8)
    assert x[:, 0].float().mean(dim=(1, 2)).tolist() == [0, 50, 100, 150, 200]
    assert len(list(cache.iterdir())) == 1
    decoded = []
    real = sys.modules["smol_diffusion.data"].load_image
    monkeypatch.setattr(sys.modules["smol_diffusion.data"], "load_image",
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
    assert x.shape == (5000, 784) and sorted(set(y.tolist())) == list(range(10))
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
    with pytest.raises(DatasetError, match="could not read the annotation file"):
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
    with pytest.raises(ValueError, match="unknown dataset"):
        make_dataset(DataConfig(dataset="imagenet"), 8, 3)
    with pytest.raises(ValueError, match="1 channel"):
        make_dataset(DataConfig(dataset="mnist"), 28, 3)
