"""The notebook's interactive panel: its controls reach the sampler, a conditional model gets
class and guidance, and without ipywidgets a hint is printed instead."""
import sys
from pathlib import Path

import matplotlib
import pytest

import smol_diffusion
from smol_diffusion import viz

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
