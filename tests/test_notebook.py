"""The notebook runs top to bottom headless (papermill), in smoke configurations: of the demo's
class-conditional model (so every section draws), after the command line trained the same run
(as after the README's first command), which it loads instead of training it again; and of the
colour preset on a folder of colour pictures, which it trains itself."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from smol_diffusion.cli import main as cli_main

papermill = pytest.importorskip("papermill")
nbformat = pytest.importorskip("nbformat")

ROOT = Path(__file__).resolve().parents[1]
SMOKE = {"image_size": 8, "channels": 16, "channel_mults": [1, 2], "attn_resolutions": [4],
         "heads": 2, "steps": 30, "batch_size": 16, "warmup": 5, "log_every": 10,
         "sample_every": 15, "sample_n": 4, "sample_steps": 5}


def run_notebook(tmp_path: Path, preset: str, overrides: dict, evaluation: dict):
    """The executed notebook's cells and its streamed text."""
    out = tmp_path / "out.ipynb"
    papermill.execute_notebook(str(ROOT / "DDPM_train_and_sample.ipynb"), str(out),
                               parameters={"preset": preset, "overrides": overrides,
                                           "interactive": False,
                                           # JSON text, as `papermill -p` gives it
                                           "evaluation": json.dumps(evaluation)},
                               cwd=str(ROOT), progress_bar=False, kernel_name="python3")
    cells = nbformat.read(out, as_version=4).cells
    outputs = [o for c in cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not any(o.get("output_type") == "error" for o in outputs)
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    return cells, text


def images_of(cells) -> list:
    return [o for c in cells if c.cell_type == "code" for o in c.get("outputs", [])
            if "image/png" in o.get("data", {})]


def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the notebook imports the package from the repo root
    overrides = SMOKE | {"num_classes": 10, "out_dir": str(tmp_path / "run")}
    cli_main(["train", "--preset", "demo", *[s for k, v in overrides.items()
                                             for s in (f"--{k}", ",".join(map(str, v))
                                                       if isinstance(v, list) else str(v))]])
    trained = (tmp_path / "run" / "ckpt.pt").read_bytes()
    cells, text = run_notebook(tmp_path, "demo", overrides, {
        "n": 16, "bpd_n": 4, "batch_size": 16, "cache_dir": str(tmp_path / "cache")})
    # data grid, forward process, schedule, the run's final grid, loss, samples, trajectory,
    # samplers, interpolation, inpainting, SDEdit strip, class edit, a row per class, guidance
    assert len(images_of(cells)) >= 14
    assert "ckpt.pt holds this run, finished at step 30: nothing to train" in text
    assert "trained to step 30 of 30" in text
    assert (tmp_path / "run" / "ckpt.pt").read_bytes() == trained
    assert "recognisable" in text and "bpd" in text and "real (test split)" in text
    assert text.count("class_match") == 4  # the evaluation (guidance 1), then 1, 2 and 4
    # headless, the panel's cell draws a plain grid (the panel itself: test_explore.py)
    panel = next(c for c in cells if c.get("id") == "explore")
    assert any("image/png" in o.get("data", {}) for o in panel.outputs)


def test_notebook_trains_the_colour_preset_on_a_folder(tmp_path, monkeypatch):
    """`preset = "icons32"; overrides = {"root": ...}`, as docs/colour.md says: the notebook
    trains on the folder's train split and scores the samples with the metrics that need no
    network (the kernel is not this process, so it is kept off the network by asking for them
    alone), swd and copies, with the copies picture."""
    monkeypatch.chdir(ROOT)
    rng = np.random.default_rng(0)
    for i in range(40):  # coloured boxes on white, as the icons are
        a = np.full((16, 16, 3), 255, np.uint8)
        x, y = rng.integers(0, 8, 2)
        a[y:y + 8, x:x + 8] = rng.integers(0, 256, 3)
        Image.fromarray(a).save(tmp_path / f"icon{i:02d}.png")
    overrides = SMOKE | {"root": str(tmp_path), "out_dir": str(tmp_path / "run"),
                         "cache_dir": str(tmp_path / "cache")}
    cells, text = run_notebook(tmp_path, "icons32", overrides, {
        "n": 16, "batch_size": 16, "metrics": ["swd", "copies"]})
    assert "images of shape (3, 8, 8)" in text and "trained to step 30 of 30" in text
    assert "swd" in text and "copies" in text and "real images:" not in text
    assert "This model is unconditional" in text
    evaluation = next(c for c in cells if c.get("id") == "evaluation")
    assert any("image/png" in o.get("data", {}) for o in evaluation.outputs)  # the pairs
    assert (tmp_path / "run" / "eval_copies.png").is_file()
    assert len(images_of(cells)) >= 11  # the demo's 14 less the 3 of class-conditional models
