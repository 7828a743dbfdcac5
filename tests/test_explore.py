"""The notebook's interactive panels: their controls reach the sampler and the editing
functions, a conditional model gets class and guidance, and without ipywidgets a hint is printed
instead."""
import sys
from pathlib import Path

import matplotlib
import pytest
import torch

import smol_diffusion
from smol_diffusion import editing, viz

matplotlib.use("Agg")
ipywidgets = pytest.importorskip("ipywidgets")


def controls(panel) -> dict:
    row = panel.children[0].children
    return {c.description: c for c in row}


@pytest.mark.parametrize("num_classes", [0, 10])
def test_the_panel_draws_with_the_chosen_settings(tiny_cfg, monkeypatch, num_classes):
    cfg = tiny_cfg.override(steps=2, sample_n=0, num_classes=num_classes)
    smol_diffusion.train(cfg, progress=False)
    ckpt = smol_diffusion.load_checkpoint(Path(cfg.train.out_dir) / "ckpt.pt")
    calls, real = [], ckpt.sample

    def sample(n, **kwargs):
        calls.append(kwargs | {"n": n, "seed": kwargs["generator"].initial_seed()})
        return real(n, **kwargs)

    monkeypatch.setattr(ckpt, "sample", sample)
    panel = viz.explore(ckpt, n=4)
    assert len(calls) == 1 and calls[0]["sampler"] == cfg.diffusion.sampler  # drawn at once
    c = controls(panel)
    c["sampler"].value, c["steps"].value, c["seed"].value = "ddim", 3, 7
    if num_classes:
        c["class"].value, c["guidance"].value = 5, 3.0
    else:
        assert "class" not in c and "guidance" not in c
    c["Draw"].click()
    last = calls[-1]
    assert (last["n"], last["sampler"], last["steps"], last["seed"]) == (4, "ddim", 3, 7)
    if num_classes:
        assert last["labels"] == [5] and last["guidance"] == 3.0  # all four: requested_labels


def test_without_ipywidgets_a_hint_is_printed(tiny_cfg, monkeypatch, capsys):
    smol_diffusion.train(tiny_cfg.override(steps=1, sample_n=0), progress=False)
    ckpt = smol_diffusion.load_checkpoint(Path(tiny_cfg.train.out_dir) / "ckpt.pt")
    monkeypatch.setitem(sys.modules, "ipywidgets", None)  # import fails
    monkeypatch.setattr(ckpt, "sample", lambda *a, **k: pytest.fail("sampled"))
    assert viz.explore(ckpt) is None
    assert "needs ipywidgets (pip install ipywidgets)" in capsys.readouterr().out


@pytest.mark.parametrize("num_classes", [0, 10])
def test_the_editing_panel_inpaints_and_edits_with_the_chosen_settings(tiny_cfg, monkeypatch,
                                                                      num_classes):
    cfg = tiny_cfg.override(steps=2, sample_n=0, num_classes=num_classes, sample_steps=3)
    smol_diffusion.train(cfg, progress=False)
    ckpt = smol_diffusion.load_checkpoint(Path(cfg.train.out_dir) / "ckpt.pt")
    m = cfg.model
    images = torch.rand(3, m.in_channels, m.image_size, m.image_size) * 2 - 1
    calls = []

    def recorded(name: str):
        real = getattr(ckpt, name)

        def edit(x, how, **kwargs):
            calls.append(kwargs | {"edit": name, "how": how,
                                   "seed": kwargs["generator"].initial_seed()})
            assert x is images
            return real(x, how, **kwargs)
        return edit

    for name in ("inpaint", "sdedit"):
        monkeypatch.setattr(ckpt, name, recorded(name))
    panel = viz.explore_edits(ckpt, images)
    assert [c["edit"] for c in calls] == ["inpaint"]  # drawn at once, the first mask
    assert torch.equal(calls[0]["how"], editing.named_mask(editing.MASKS[0], m.image_size))
    c = controls(panel)
    c["fill in"].value, c["resample"].value, c["seed"].value = "centre", 2, 7
    if num_classes:
        assert c["class"].value is None  # unconditional until a class is chosen
        c["class"].value, c["guidance"].value = 5, 3.0
    else:
        assert "class" not in c and "guidance" not in c
    c["Inpaint"].click()
    last = calls[-1]
    assert (last["edit"], last["resample"], last["seed"]) == ("inpaint", 2, 7)
    assert torch.equal(last["how"], editing.named_mask("centre", m.image_size))
    c["strength"].value, c["seed"].value = 0.35, 8
    c["SDEdit"].click()
    last = calls[-1]
    assert (last["edit"], last["how"], last["seed"]) == ("sdedit", 0.35, 8)
    for last in calls[-2:]:
        if num_classes:
            assert last["labels"] == [5] and last["guidance"] == 3.0
        else:
            assert "labels" not in last and "guidance" not in last


def test_without_ipywidgets_the_editing_panel_prints_a_hint(tiny_cfg, monkeypatch, capsys):
    smol_diffusion.train(tiny_cfg.override(steps=1, sample_n=0), progress=False)
    ckpt = smol_diffusion.load_checkpoint(Path(tiny_cfg.train.out_dir) / "ckpt.pt")
    monkeypatch.setitem(sys.modules, "ipywidgets", None)
    monkeypatch.setattr(ckpt, "inpaint", lambda *a, **k: pytest.fail("edited"))
    assert viz.explore_edits(ckpt, torch.zeros(1, 1, 8, 8)) is None
    out = capsys.readouterr().out
    assert "needs ipywidgets (pip install ipywidgets)" in out and "ckpt.sdedit(images" in out
