"""The notebook runs top to bottom headless (papermill), in a smoke configuration of a
class-conditional model (so every section draws), after the command line trained the same run
(as after the README's first command): it loads that run instead of training it again."""
import json
from pathlib import Path

import pytest

from smol_diffusion.cli import main as cli_main

papermill = pytest.importorskip("papermill")

ROOT = Path(__file__).resolve().parents[1]


def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the notebook imports the package from the repo root
    overrides = {"image_size": 8, "channels": 16, "channel_mults": [1, 2], "attn_resolutions": [4],
                 "heads": 2, "steps": 30, "batch_size": 16, "warmup": 5, "log_every": 10,
                 "sample_every": 15, "sample_n": 4, "sample_steps": 5, "num_classes": 10,
                 "out_dir": str(tmp_path / "run")}
    cli_main(["train", "--preset", "demo", *[s for k, v in overrides.items()
                                             for s in (f"--{k}", ",".join(map(str, v))
                                                       if isinstance(v, list) else str(v))]])
    trained = (tmp_path / "run" / "ckpt.pt").read_bytes()
    out = tmp_path / "out.ipynb"
    papermill.execute_notebook(str(ROOT / "DDPM_train_and_sample.ipynb"), str(out),
                               parameters={"preset": "demo", "overrides": overrides,
                                           "interactive": False,
                                           # JSON text, as `papermill -p` gives it
                                           "evaluation": json.dumps({
                                               "n": 16, "bpd_n": 4, "batch_size": 16,
                                               "cache_dir": str(tmp_path / "cache")})},
                               cwd=str(ROOT), progress_bar=False, kernel_name="python3")
    import nbformat

    nb = nbformat.read(out, as_version=4)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    # data grid, forward process, schedule, the run's final grid, loss, samples, trajectory,
    # samplers, interpolation, a row per class, guidance scales
    assert len(images) >= 11
    assert not any(o.get("output_type") == "error" for o in outputs)
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "ckpt.pt holds this run, finished at step 30: nothing to train" in text
    assert "trained to step 30 of 30" in text
    assert (tmp_path / "run" / "ckpt.pt").read_bytes() == trained
    assert "recognisable" in text and "bpd" in text and "real (test split)" in text
    assert text.count("class_match") == 4  # the evaluation (guidance 1), then 1, 2 and 4
    # headless, the panel's cell draws a plain grid (the panel itself: test_explore.py)
    panel = next(c for c in nb.cells if c.get("id") == "explore")
    assert any("image/png" in o.get("data", {}) for o in panel.outputs)
