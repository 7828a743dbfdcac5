"""Every dataset layout on fixture folders made here, the image cache, batches and flips, and
the errors for bad input."""
import os
import sys

import pytest
import torch
from PIL import Image

from conftest import write_image
from smol_diffusion import DataConfig
from smol_diffusion.batches import DROPOUT, ORDER, STEP, batch_indices, stream_seed, to_device
from smol_diffusion.data import (DatasetError, cached_images, find_images, make_dataset,
                                 mnist_5k, mnist_5k_arrays, stanford_cars_files)


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
    for split, message in [("test", "no test split"), ("val", "split must be one of")]:
        with pytest.raises(ValueError, match=message):
            make_dataset(data_cfg(tmp_path, dataset="folder", root=str(tmp_path), split=split),
                         8, 3)
    with pytest.raises(ValueError, match="dataset must be one of"):
        make_dataset(DataConfig(dataset="imagenet"), 8, 3)
    with pytest.raises(ValueError, match="1 channel"):
        make_dataset(DataConfig(dataset="mnist"), 28, 3)
