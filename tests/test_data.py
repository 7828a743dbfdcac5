"""Every dataset layout on fixture folders made here, and the errors for bad ones."""
import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat

from smol_diffusion import DataConfig
from smol_diffusion.data import (DatasetError, make_dataset, mnist_5k, mnist_5k_arrays,
                                 stanford_cars_files)


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
    ds = make_dataset(DataConfig(dataset="cars", root=str(torchvision_layout)), 16, 3)
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
    ds = make_dataset(DataConfig(dataset="folder", root=str(tmp_path)), 8, 3)
    assert len(ds) == 1
    x = ds[0]
    assert x.shape == (3, 8, 8) and x.min() > 0.9  # centre crop keeps only the white square
    gray = make_dataset(DataConfig(dataset="folder", root=str(tmp_path)), 8, 1)[0]
    assert gray.shape == (1, 8, 8)


def test_flip_is_random_and_horizontal(tmp_path):
    img = Image.new("L", (8, 8), 0)
    img.paste(255, (0, 0, 4, 8))  # left half white
    img.save(tmp_path / "half.png")
    ds = make_dataset(DataConfig(dataset="folder", root=str(tmp_path), hflip=True), 8, 1)
    torch.manual_seed(0)
    lefts = {float(ds[0][0, :, :4].mean()) for _ in range(20)}
    assert lefts == {1.0, -1.0}


def test_embedded_digits():
    x, y = mnist_5k_arrays()
    assert x.shape == (5000, 784) and sorted(set(y.tolist())) == list(range(10))
    ds = make_dataset(DataConfig(dataset="mnist"), 28, 1)
    assert len(ds) == 5000 and ds[0].shape == (1, 28, 28)
    assert ds.images.min() == -1 and ds.images.max() == 1
    small = mnist_5k(16)
    assert small.images.shape == (5000, 1, 16, 16)
    assert small.images[0].mean().item() == pytest.approx(ds.images[0].mean().item(), abs=0.05)


def test_missing_cars_says_where_and_how(tmp_path):
    with pytest.raises(DatasetError, match=r"stanford_cars(.|\n)*vision/issues/7545"):
        make_dataset(DataConfig(dataset="cars", root=str(tmp_path)), 16, 3)


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


def test_corrupt_image_names_the_file(tmp_path):
    write_image(tmp_path / "good.jpg")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    ds = make_dataset(DataConfig(dataset="folder", root=str(tmp_path)), 8, 3)
    with pytest.raises(DatasetError, match="bad.jpg.*Delete or replace"):
        [ds[i] for i in range(len(ds))]


def test_empty_or_missing_folder(tmp_path):
    with pytest.raises(DatasetError, match="no images"):
        make_dataset(DataConfig(dataset="folder", root=str(tmp_path)), 8, 3)
    with pytest.raises(DatasetError, match="does not exist"):
        make_dataset(DataConfig(dataset="folder", root=str(tmp_path / "nope")), 8, 3)
    with pytest.raises(ValueError, match="unknown dataset"):
        make_dataset(DataConfig(dataset="imagenet"), 8, 3)
    with pytest.raises(ValueError, match="1 channel"):
        make_dataset(DataConfig(dataset="mnist"), 28, 3)
