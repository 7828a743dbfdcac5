"""The FID Inception path with generated weights, the reference-statistics cache and its keys,
the digit extractor's cache, and evaluation end to end (function, command line, training)."""
import json
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import smol_diffusion
from smol_diffusion import features, load_checkpoint
from smol_diffusion.cli import main as cli_main
from smol_diffusion.data import held_out_split
from smol_diffusion.evaluate import evaluate
from smol_diffusion.features import (
    Extractor,
    FIDInception,
    inception_extractor,
    reference_stats,
)


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """Randomly initialised weights in the layout of pytorch-fid's file (no download here)."""
    torch.manual_seed(0)
    net = FIDInception()
    for m in net.modules():  # non-trivial batch-norm statistics, so eval mode matters
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    path = tmp_path_factory.mktemp("weights") / features.FID_WEIGHTS
    torch.save(net.state_dict(), path)
    return path


def test_inception_has_pytorch_fid_layout(inception_weights):
    state = torch.load(inception_weights, weights_only=True)
    assert state["fc.weight"].shape == (1008, 2048)
    assert state["Mixed_7c.branch_pool.conv.weight"].shape == (192, 2048, 1, 1)
    assert not any(k.startswith("AuxLogits") for k in state)
    # the FID graph's differences from torchvision's: pools that skip padding, a max pool last
    x = torch.rand(1, 2048, 8, 8)
    net = FIDInception()
    assert torch.equal(net.Mixed_7c.pool(x), F.max_pool2d(x, 3, 1, 1))
    corner = x[..., :2, :2].mean(dim=(-1, -2))  # the padded zeros do not count
    torch.testing.assert_close(net.Mixed_7b.pool(x)[..., 0, 0], corner)
    torch.testing.assert_close(features._tf_avg_pool(x)[..., 0, 0], corner)


def test_inception_features(inception_weights):
    ext = inception_extractor(inception_weights)
    assert ext.name == "inception" and not ext.net.training
    seen = []
    ext.net.Conv2d_1a_3x3.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    images = torch.rand(3, 1, 16, 16) * 2 - 1
    f = ext.features(images)
    assert f.shape == (3, 2048) and f.dtype == np.float64
    # grey to RGB, rounded to 8 bits, resized to 299x299 bilinearly as pytorch-fid does
    q = ((images + 1) * 127.5).round() / 127.5 - 1
    expected = F.interpolate(q.expand(-1, 3, -1, -1), size=(299, 299), mode="bilinear",
                             align_corners=False)
    torch.testing.assert_close(seen[0], expected)
    # eval mode: an image's features do not depend on the rest of its batch
    np.testing.assert_allclose(ext.features(images[:1]), f[:1], rtol=1e-4, atol=1e-5)


def test_inception_weights_missing_or_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05"):
        inception_extractor(tmp_path / "absent.pth")
    torch.save({"weight": torch.zeros(2)}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="does not hold the FID Inception weights"):
        inception_extractor(tmp_path / "wrong.pth")


class Flatten(nn.Module):
    def features(self, x):
        return x.flatten(1)


def folder_cfg(tmp_path, n=6):
    root = tmp_path / "images"
    root.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return smol_diffusion.get_preset("demo").override(
        dataset="folder", root=str(root), split="all", image_size=4, in_channels=3,
        num_classes=0, cache_dir=str(tmp_path / "image_cache"))


def test_reference_stats_are_cached_under_a_key_that_cannot_go_stale(tmp_path, monkeypatch):
    cfg, cache = folder_cfg(tmp_path), tmp_path / "cache"
    ext = Extractor("flat", "k1", Flatten(), torch.device("cpu"))
    first = reference_stats(cfg, ext, cache, progress=False)
    assert first["n"] == 6 and first["features"].shape == (6, 48)
    assert len(list(cache.iterdir())) == 1
    calls = []
    real = sys.modules["smol_diffusion.features"]._loader_features
    monkeypatch.setattr(sys.modules["smol_diffusion.features"], "_loader_features",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    again = reference_stats(cfg, ext, cache, progress=False)
    assert not calls  # read from the cache
    np.testing.assert_array_equal(again["sigma"], first["sigma"])
    # other weights, another resolution, or changed images: a new entry, computed afresh
    reference_stats(cfg, Extractor("flat", "k2", Flatten(), torch.device("cpu")), cache,
                    progress=False)
    reference_stats(cfg.override(image_size=8), ext, cache, progress=False)
    image = tmp_path / "images" / "0.png"
    Image.new("RGB", (12, 12)).save(image)
    os.utime(image, ns=(1, 1))
    changed = reference_stats(cfg, ext, cache, progress=False)
    assert len(calls) == 3 and len(list(cache.iterdir())) == 4
    assert not np.array_equal(changed["mu"], first["mu"])
    # trained on all of a folder, bits/dim and real rows use (and name) its training images;
    # trained on its train split, its held-out tenth
    assert held_out_split(cfg) == "all"
    assert held_out_split(cfg.override(split="train")) == "test"
    assert held_out_split(smol_diffusion.get_preset("demo")) == "test"


def test_digit_extractor_is_trained_once_then_cached(tmp_path, monkeypatch):
    real_train = features.train_digit_cnn
    trained = []
    monkeypatch.setattr(features, "train_digit_cnn",
                        lambda x, y: trained.append(1) or real_train(x, y, epochs=1))
    ext = features.digit_extractor(8, tmp_path)
    again = features.digit_extractor(8, tmp_path)
    assert trained == [1] and ext.key == again.key
    x = torch.rand(5, 1, 8, 8) * 2 - 1
    assert ext.features(x).shape == (5, 128)
    p = ext.probs(x)
    assert p.shape == (5, 10) and np.allclose(p.sum(1), 1)


@pytest.fixture
def fast_digits(monkeypatch):
    """The digit classifier fitted for one epoch instead of twenty."""
    real_train = features.train_digit_cnn
    monkeypatch.setattr(features, "train_digit_cnn", lambda x, y: real_train(x, y, epochs=1))


def test_evaluate_end_to_end(tiny_cfg, tmp_path, fast_digits, capsys):
    cfg = tiny_cfg.override(sample_every=0, sample_n=0, checkpoint_every=0, T=50)
    smol_diffusion.train(cfg, progress=False)
    ckpt = load_checkpoint(f"{cfg.train.out_dir}/ckpt.pt", device="cpu")
    rows = evaluate(ckpt, 20, bpd_n=8, batch_size=16, cache_dir=tmp_path / "cache",
                    progress=False)
    assert [r["metric"] for r in rows] == ["fid", "kid", "recognisable", "swd", "copies", "bpd"]
    for r in rows:
        assert np.isfinite(r["value"]) and r["seconds"] >= 0
    assert rows[0]["n"] == 20 and rows[0]["extractor"] == "digits" and rows[0]["steps"] == 5
    assert rows[3]["extractor"] is None and rows[3]["floor"] < rows[3]["value"]
    assert rows[5]["n"] == 8 and rows[5]["steps"] == 50 and "test" in rows[5]["sampler"]
    floor = evaluate(ckpt, 20, real=True, cache_dir=tmp_path / "cache")
    assert [r["metric"] for r in floor] == ["fid", "kid", "recognisable"]
    assert floor[0]["value"] < rows[0]["value"]  # real digits beat a 40-step model
    assert capsys.readouterr().err == ""  # no progress bars by default: programs call this
    out = tmp_path / "eval.json"
    cli_main(["evaluate", "--checkpoint", f"{cfg.train.out_dir}/ckpt.pt", "--n", "10",
              "--metrics", "fid,kid", "--cache-dir", str(tmp_path / "cache"), "--out", str(out),
              "--device", "cpu"])
    printed = capsys.readouterr()
    assert "fid" in printed.out and "kid" in printed.out
    assert "sampling:" in printed.err and "0/10 " in printed.err  # the command line's bar
    saved = json.loads(out.read_text())
    assert saved["step"] == 40 and [r["metric"] for r in saved["results"]] == ["fid", "kid"]
    assert set(saved["results"][0]) >= {"metric", "value", "n", "extractor", "sampler",
                                         "steps", "seconds"}


def test_evaluate_rejects_bad_input(tiny_cfg, tmp_path):
    smol_diffusion.train(tiny_cfg.override(sample_every=0, sample_n=0, steps=2), progress=False)
    ckpt = f"{tiny_cfg.train.out_dir}/ckpt.pt"
    with pytest.raises(SystemExit, match="unknown metrics"):
        cli_main(["evaluate", "--checkpoint", ckpt, "--metrics", "fid,isc"])
    with pytest.raises(SystemExit, match="batch_size at least 1; got 500, 0"):
        cli_main(["evaluate", "--checkpoint", ckpt, "--batch", "0"])
    with pytest.raises(SystemExit, match="no FID Inception weights"):
        cli_main(["evaluate", "--checkpoint", ckpt, "--extractor", "inception", "--metrics",
                  "fid", "--inception-weights", str(tmp_path / "none.pth")])


def test_training_evaluates_at_an_interval(tiny_cfg, tmp_path, fast_digits, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may land in ./data/cache: the run has its own
    cfg = tiny_cfg.override(sample_every=0, sample_n=0, checkpoint_every=0, eval_every=20,
                            eval_n=16, cache_dir=str(tmp_path / "run_cache"))
    history = smol_diffusion.train(cfg, progress=False)
    assert [e["step"] for e in history["eval"]] == [20, 40]
    assert set(history["eval"][0]) == {"step", "fid", "kid", "recognisable", "swd", "swd_floor",
                                       "copies"}
    assert any((tmp_path / "run_cache").iterdir()) and not (tmp_path / "data").exists()


def test_training_without_its_extractor_says_so_before_it_trains(tmp_path, monkeypatch):
    """Offline without the Inception weights (conftest: the fetch is refused), a colour run
    warns before its first step, then evaluates what needs no weights."""
    cfg = folder_cfg(tmp_path).override(eval_every=5, steps=10, batch_size=4, sample_steps=2,
                                        out_dir=str(tmp_path / "run"))
    steps = []
    train_module = sys.modules["smol_diffusion.training"]
    real_loss = train_module.simple_loss
    monkeypatch.setattr(train_module, "simple_loss", lambda *a, **k: steps.append(1)
                        or real_loss(*a, **k))

    def warned(message, *args, **kwargs):  # the module's warnings.warn, and only its
        said.append((str(message), len(steps)))
    said = []
    monkeypatch.setattr(sys.modules["smol_diffusion.evaluate"], "warnings",
                        type("Warnings", (), {"warn": staticmethod(warned)}))
    history = smol_diffusion.train(cfg, progress=False)
    assert len(said) == 1 and "no FID Inception weights" in said[0][0]
    assert said[0][1] == 0  # said before the first step
    assert [set(e) for e in history["eval"]] == [{"step", "swd", "swd_floor", "copies"}] * 2
