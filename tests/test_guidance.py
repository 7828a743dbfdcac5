"""Class-conditional models and classifier-free guidance (Ho & Salimans 2022): the guided
output's limits, label errors, the labels of each dataset, and conditional training."""
import importlib
import json

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat
from torch import nn

import smol_diffusion
from smol_diffusion import DataConfig, ModelConfig, NoiseSchedule, UNet, sample
from smol_diffusion.data import DatasetError, make_dataset
from smol_diffusion.evaluate import default_metrics, evaluate
from smol_diffusion.features import Extractor
from smol_diffusion.cli import main as cli_main
from smol_diffusion.cli import parse_labels
from smol_diffusion.samplers import guided

# the module (the package's attribute smol_diffusion.evaluate is the function)
evaluate_module = importlib.import_module("smol_diffusion.evaluate")
cli_module = importlib.import_module("smol_diffusion.cli")


def conditional_unet(num_classes: int = 3) -> UNet:
    """A small conditional UNet with every weight random (the zero-initialised output layer
    would make every prediction 0)."""
    torch.manual_seed(0)
    model = UNet(ModelConfig(image_size=8, in_channels=1, channels=16, channel_mults=(1, 2),
                             attn_resolutions=(4,), heads=2, dropout=0.0,
                             num_classes=num_classes)).eval()
    for p in model.parameters():
        nn.init.normal_(p, std=0.1)
    return model


@torch.no_grad()
def test_guidance_0_is_unconditional_1_conditional_and_between_is_the_mix():
    model = conditional_unet()
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([10, 500, 900, 999])
    labels, null = torch.tensor([0, 1, 2, 1]), torch.full((4,), 3)
    cond, uncond = model(x, t, labels), model(x, t, null)
    assert not torch.allclose(cond, uncond, atol=1e-3)  # the label matters
    torch.testing.assert_close(model(x, t), uncond)  # no labels: the "no label" row
    torch.testing.assert_close(guided(model, labels, 0.0, 3)(x, t), uncond)
    torch.testing.assert_close(guided(model, labels, 1.0, 3)(x, t), cond)
    torch.testing.assert_close(guided(model, labels, 2.5, 3)(x, t),  # one batched call
                               uncond + 2.5 * (cond - uncond), atol=1e-5, rtol=1e-5)


def test_sampling_with_guidance_0_equals_unconditional_sampling():
    model, schedule = conditional_unet(), NoiseSchedule.linear(100)
    kw = dict(sampler="ddim", steps=5, noise=torch.randn(4, 1, 8, 8))
    torch.testing.assert_close(sample(model, schedule, (4, 1, 8, 8), labels=[0, 1, 2, 0],
                                      guidance=0.0, **kw),
                               sample(model, schedule, (4, 1, 8, 8), **kw))


def test_label_errors_say_what_is_wrong():
    model, schedule = conditional_unet(), NoiseSchedule.linear(100)
    shape = (2, 1, 8, 8)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\].*3 classes"):
        sample(model, schedule, shape, steps=2, labels=[0, 3])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\]"):
        sample(model, schedule, shape, steps=2, labels=[-1, 0])
    with pytest.raises(ValueError, match="3 labels for 2 images"):
        sample(model, schedule, shape, steps=2, labels=[0, 1, 2])
    with pytest.raises(ValueError, match="guidance needs labels"):
        sample(model, schedule, shape, steps=2, guidance=3.0)
    plain = UNet(ModelConfig(image_size=8, in_channels=1, channels=16, channel_mults=(1, 2),
                             attn_resolutions=(4,), heads=2))
    with pytest.raises(ValueError, match="unconditional"):
        sample(plain, schedule, shape, steps=2, labels=[0, 1])
    with pytest.raises(ValueError, match="unconditional"):
        zeros = torch.zeros(2, dtype=torch.long)
        plain(torch.zeros(shape), zeros, zeros)
    assert not any("label" in k for k in plain.state_dict())  # unconditional: as before
    assert parse_labels("7", [str(d) for d in range(10)]) == [7]  # repeated: test_cli.py
    assert parse_labels("bmw m3, 0", ["Audi", "BMW M3"]) == [1, 0]
    with pytest.raises(ValueError, match="no class named 'Tesla'"):
        parse_labels("Tesla", ["Audi", "BMW M3"])


def test_labels_of_each_dataset(tmp_path):
    digits = make_dataset(DataConfig(dataset="mnist", split="test"), 8, 1)
    assert digits.classes == [str(d) for d in range(10)] and digits.labels.bincount().tolist() \
        == [50] * 10
    for cls in ("cat", "dog"):
        for i in range(2):
            (tmp_path / "pets" / cls / "deep").mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8)).save(tmp_path / "pets" / cls / "deep" / f"{i}.png")
    cache = str(tmp_path / "cache")
    pets = make_dataset(DataConfig(dataset="folder", root=str(tmp_path / "pets"),
                                   cache_dir=cache), 8, 3, progress=False)
    assert pets.classes == ["cat", "dog"] and pets.labels.tolist() == [0, 0, 1, 1]
    Image.new("RGB", (8, 8)).save(tmp_path / "pets" / "loose.png")  # an image without a class
    unlabelled = make_dataset(DataConfig(dataset="folder", root=str(tmp_path / "pets"),
                                         cache_dir=cache), 8, 3, progress=False)
    assert unlabelled.labels is None and unlabelled.classes is None


def test_stanford_cars_labels_and_names_from_the_devkit(torchvision_layout):
    names = np.array(["AM General Hummer SUV 2000", "BMW M3 Coupe 2012"], dtype=object)
    meta = torchvision_layout / "stanford_cars" / "devkit" / "cars_meta.mat"
    savemat(str(meta), {"class_names": names.reshape(1, -1)})
    cars = make_dataset(DataConfig(dataset="cars", root=str(torchvision_layout),
                                   cache_dir=str(torchvision_layout / "cache")), 8, 3,
                        progress=False)
    assert cars.labels.tolist() == [0, 1, 0, 0]  # the fixture's classes: 1, 2, 1; test: 1
    assert cars.classes == list(names)
    meta.write_bytes(b"junk")  # a damaged class-name file is named, not a scipy traceback
    with pytest.raises(DatasetError, match="could not read the devkit file .*cars_meta.mat"):
        make_dataset(DataConfig(dataset="cars", root=str(torchvision_layout),
                                cache_dir=str(torchvision_layout / "cache")), 8, 3,
                     progress=False)


def test_conditional_training_and_guided_samples(tiny_cfg):
    cfg = tiny_cfg.override(num_classes=10, steps=4, sample_every=0, checkpoint_every=0)
    smol_diffusion.train(cfg, progress=False)
    ckpt = smol_diffusion.load_checkpoint(f"{cfg.train.out_dir}/ckpt.pt", device="cpu")
    assert ckpt.classes == [str(d) for d in range(10)]
    x = ckpt.sample(4, labels=[7, 7, 1, 1], guidance=2.0)
    assert x.shape == (4, 1, 8, 8) and torch.isfinite(x).all()
    # without labels: each class in turn, conditionally; guidance 0: unconditional
    def seeded() -> dict:  # the same x_T and the same noise along the way (an SDE sampler)
        return {"generator": torch.Generator().manual_seed(0)}
    torch.testing.assert_close(ckpt.sample(12, **seeded()),
                               ckpt.sample(12, labels=torch.arange(12) % 10, **seeded()))
    torch.testing.assert_close(ckpt.sample(12, guidance=0.0, **seeded()),
                               sample(ckpt.model, ckpt.schedule, (12, 1, 8, 8),
                                      steps=cfg.diffusion.sample_steps,
                                      sampler=cfg.diffusion.sampler,
                                      precision=cfg.train.precision, **seeded()))
    # the command line's grid: a column per class (8 px images, 1 px padding), or square
    out = f"{cfg.train.out_dir}/grid.png"
    for n, labels, width in [(20, [], 10 * 9 + 1), (9, [], 3 * 9 + 1),
                             (20, ["--labels", "3"], 4 * 9 + 1)]:
        cli_main(["sample", "--checkpoint", f"{cfg.train.out_dir}/ckpt.pt", "--n", str(n),
                  "--steps", "2", "--out", out, *labels])
        assert Image.open(out).size[0] == width
    with pytest.raises(ValueError, match="num_classes=5, but the dataset has 10 classes; set "
                                         "num_classes to 10"):
        smol_diffusion.train(cfg.override(num_classes=5, overwrite=True), progress=False)


class ConstantClassifier(nn.Module):
    """A stand-in digit classifier that always says 0."""

    def features(self, x):
        return x.flatten(1)

    def forward(self, x):
        return torch.tensor([10.0] + [0.0] * 9).expand(len(x), 10)


def test_class_match_counts_samples_of_the_class_asked_for(tiny_cfg, tmp_path):
    cfg = tiny_cfg.override(num_classes=10, steps=2, sample_n=0, checkpoint_every=0)
    smol_diffusion.train(cfg, progress=False)
    ckpt = smol_diffusion.load_checkpoint(f"{cfg.train.out_dir}/ckpt.pt", device="cpu")
    ext = Extractor("digits", "const", ConstantClassifier(), torch.device("cpu"))
    rows = evaluate(ckpt, 20, metrics=("class_match", "recognisable"), extractor=ext,
                    guidance=2.0, steps=2, cache_dir=tmp_path / "cache", progress=False)
    match = next(r for r in rows if r["metric"] == "class_match")
    assert match["value"] == pytest.approx(0.1) and match["guidance"] == 2.0  # 2 zeros of 20
    rows = evaluate(ckpt, 20, extractor=ext, steps=2, cache_dir=tmp_path / "cache",
                    metrics=("class_match",), progress=False)  # the default: guidance 1
    assert [(r["metric"], r["value"], r["guidance"]) for r in rows] == [("class_match", 0.1, 1.0)]
    with pytest.raises(ValueError, match="class_match scores the samples of a class-cond"):
        evaluate(ckpt, 20, metrics=("class_match",), extractor=ext, progress=False,
                 cache_dir=tmp_path / "cache", real=True)
    # by default: class_match for a conditional model's samples, not for real images
    assert "class_match" in default_metrics(cfg, "digits")
    assert "class_match" not in default_metrics(cfg, "digits", real=True)
    assert "class_match" not in default_metrics(cfg.override(num_classes=0), "digits")


def test_evaluate_cli_builds_one_extractor_for_all_guidance_scales(tiny_cfg, tmp_path,
                                                                   monkeypatch, capsys):
    cfg = tiny_cfg.override(num_classes=10, steps=2, sample_n=0, checkpoint_every=0)
    smol_diffusion.train(cfg, progress=False)
    built = []

    def get_extractor(*args):
        built.append(args)
        return Extractor("digits", "const", ConstantClassifier(), torch.device("cpu"))
    monkeypatch.setattr(cli_module, "get_extractor", get_extractor)  # the command line's call
    out = tmp_path / "eval.json"
    cli_main(["evaluate", "--checkpoint", f"{cfg.train.out_dir}/ckpt.pt", "--n", "4",
              "--steps", "2", "--metrics", "class_match", "--guidance", "1,2",
              "--cache-dir", str(tmp_path / "cache"), "--out", str(out)])
    assert len(built) == 1
    rows = json.loads(out.read_text())["results"]
    assert [(r["metric"], r["guidance"]) for r in rows] == [("class_match", 1.0),
                                                            ("class_match", 2.0)]
    # bits/dim does not depend on the guidance: one row, and nothing else for the other scale
    monkeypatch.setattr(evaluate_module, "bits_per_dim",
                        lambda model, schedule, x0, **kw: {"bpd": torch.ones(len(x0))})
    cli_main(["evaluate", "--checkpoint", f"{cfg.train.out_dir}/ckpt.pt", "--n", "4",
              "--metrics", "bpd", "--bpd-n", "4", "--guidance", "1,2",
              "--cache-dir", str(tmp_path / "cache"), "--out", str(out)])
    assert [r["metric"] for r in json.loads(out.read_text())["results"]] == ["bpd"]
    with pytest.raises(SystemExit, match="no guidance: drop guidance"):
        cli_main(["evaluate", "--checkpoint", f"{cfg.train.out_dir}/ckpt.pt", "--n", "4",
                  "--real", "--guidance", "2", "--out", str(out)])
