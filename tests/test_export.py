"""Exports: a checkpoint's EMA weights as safetensors plus JSON load back to the same model
without any pickle, never replace an export unasked, never hold NaN; and where our UNet is
exactly a diffusers UNet2DModel, diffusers loads the export and computes the same outputs."""
import hashlib
import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import smol_diffusion
from smol_diffusion import NoiseSchedule, UNet, get_preset, load_checkpoint
from smol_diffusion.checkpoint import Checkpoint
from smol_diffusion.cli import main as cli_main
from smol_diffusion.export import diffusers_mismatch, export_diffusers, export_weights

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpt_path(tmp_path_factory):
    """A class-conditional tiny run (conftest's tiny_cfg) trained for 2 steps: its ckpt.pt."""
    out = tmp_path_factory.mktemp("trained") / "run"
    cfg = get_preset("demo").override(
        image_size=8, channels=16, channel_mults=(1, 2), attn_resolutions=(4,), heads=2,
        num_classes=10, steps=2, batch_size=16, warmup=5, log_every=1, sample_n=0,
        sample_steps=5, checkpoint_every=0, out_dir=str(out))
    smol_diffusion.train(cfg, progress=False)
    return out / "ckpt.pt"


def _no_pickle(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("pickle was used")
    for module, name in ((torch, "load"), (pickle, "load"), (pickle, "loads"),
                         (pickle, "Unpickler")):
        monkeypatch.setattr(module, name, refuse)


def _samples(ckpt: Checkpoint) -> torch.Tensor:
    return ckpt.sample(4, generator=torch.Generator().manual_seed(0), steps=3,
                       labels=torch.tensor([0, 3, 7, 9]))


def test_an_export_loads_without_pickle_as_the_same_model(ckpt_path, tmp_path, monkeypatch):
    original = load_checkpoint(ckpt_path, "cpu")
    out = export_weights(ckpt_path, tmp_path / "exported")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    meta = json.loads((out / "config.json").read_text())
    assert (meta["format"], meta["version"], meta["step"]) == ("smol_diffusion.export", 1, 2)
    _no_pickle(monkeypatch)
    for where in (out, out / "model.safetensors", str(out)):
        ckpt = load_checkpoint(where, "cpu")
        assert ckpt.config == original.config and ckpt.step == 2 and ckpt.history == {}
        assert ckpt.classes == original.classes == [str(i) for i in range(10)]
        theirs = original.model.state_dict()
        assert all(torch.equal(t, theirs[k]) for k, t in ckpt.model.state_dict().items())
        assert torch.equal(_samples(ckpt), _samples(original))  # bitwise the same model
    with pytest.raises(ValueError, match="pickle was used"):  # the patch does bite
        load_checkpoint(ckpt_path, "cpu")


def test_an_export_is_replaced_only_when_asked(ckpt_path, tmp_path):
    out = export_weights(ckpt_path, tmp_path / "exported")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(FileExistsError, match=r"model.safetensors already exists.*another "
                                              r"folder.*--overwrite"):
        export_weights(ckpt_path, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nor any temporary file
    ckpt = load_checkpoint(ckpt_path, "cpu")
    ckpt.step = 3
    export_weights(ckpt, out, overwrite=True)
    assert load_checkpoint(out, "cpu").step == 3
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]


def test_weights_that_are_not_finite_are_neither_exported_nor_loaded(ckpt_path, tmp_path):
    ckpt = load_checkpoint(ckpt_path, "cpu")
    with torch.no_grad():
        ckpt.model.conv_in.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"refusing to export to .*exported: its ema weight "
                                         r"conv_in.weight holds NaN"):
        export_weights(ckpt, tmp_path / "exported")
    assert not (tmp_path / "exported").exists()
    # refused on loading too, even where config.json vouches for the file (its sha256)
    out = export_weights(ckpt_path, tmp_path / "good")
    weights = load_file(out / "model.safetensors")
    weights["conv_in.weight"][0, 0, 0, 0] = float("inf")
    save_file(weights, out / "model.safetensors")
    meta = json.loads((out / "config.json").read_text())
    meta["weights_sha256"] = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    (out / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"refusing to load .*model.safetensors: its ema weight "
                                         r"conv_in.weight holds NaN or infinite"):
        load_checkpoint(out, "cpu")


def test_a_broken_export_is_refused_naming_the_file_and_the_fix(ckpt_path, tmp_path):
    out = export_weights(ckpt_path, tmp_path / "exported")
    config = (out / "config.json").read_bytes()
    (out / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"no config.json beside .*exported/model."
                                                r"safetensors.*export the checkpoint again"):
        load_checkpoint(out, "cpu")
    (out / "config.json").write_bytes(config)
    weights = load_file(out / "model.safetensors")  # other weights beside the config, as an
    weights["conv_in.bias"] += 1  # overwrite interrupted between its two renames leaves them
    save_file(weights, out / "model.safetensors")
    with pytest.raises(ValueError, match=r"model.safetensors is not the file .*config.json was "
                                         r"written with.*export the checkpoint again"):
        load_checkpoint(out, "cpu")
    with pytest.raises(FileNotFoundError, match=r"no exported weights at .*run/model.safetensors;"
                                                r" it holds .*ckpt.pt, a training checkpoint"):
        load_checkpoint(ckpt_path.parent, "cpu")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"_class_name": "UNet2DModel"}')
    save_file({"w": torch.zeros(1)}, tmp_path / "other" / "model.safetensors")
    with pytest.raises(ValueError, match="not a smol_diffusion export's config .*diffusers"):
        load_checkpoint(tmp_path / "other", "cpu")


def test_the_command_line(ckpt_path, tmp_path, capsys):
    out = tmp_path / "exported"
    cli_main(["export", "--checkpoint", str(ckpt_path), "--out", str(out)])
    assert "exported the EMA weights of step 2 to" in capsys.readouterr().out
    assert load_checkpoint(out, "cpu").step == 2
    with pytest.raises(SystemExit, match=r"^error: .*model.safetensors already exists"):
        cli_main(["export", "--checkpoint", str(ckpt_path), "--out", str(out)])
    cli_main(["export", "--checkpoint", str(ckpt_path), "--out", str(out), "--overwrite"])
    with pytest.raises(SystemExit, match=r"^error: no checkpoint at .*nope.pt"):
        cli_main(["export", "--checkpoint", str(tmp_path / "nope.pt"), "--out",
                  str(tmp_path / "x")])
    # the tiny UNet is not a UNet2DModel (see below): refused before anything is written
    with pytest.raises(SystemExit, match=r"^error: this model does not map exactly onto "
                                         r"diffusers' UNet2DModel: GroupNorm .* groups"):
        cli_main(["export", "--checkpoint", str(ckpt_path), "--out", str(tmp_path / "d"),
                  "--diffusers"])
    assert not (tmp_path / "d").exists()
    r = subprocess.run([sys.executable, "-m", "smol_diffusion", "export", "--checkpoint",
                        str(ckpt_path), "--out", str(tmp_path / "cli")], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "cli" / "model.safetensors").is_file()


# --- diffusers --------------------------------------------------------------------------------

def test_the_first_difference_from_diffusers_is_named():
    # the demo's narrow layers: 2 GroupNorm groups at 8 channels, 4 at 16
    assert diffusers_mismatch(UNet(get_preset("demo").model)).startswith(
        "GroupNorm down.2.0.norm2 has 4 groups over 16 channels and down.0.0.norm1 2 over 8")
    assert diffusers_mismatch(UNet(get_preset("cars64").model)) is None
    patched = get_preset("cars64").override(patch_size=2, attn_resolutions=(8, 4))
    assert diffusers_mismatch(UNet(patched.model)).startswith("patch_size is 2")
    wide = get_preset("demo").override(image_size=16, channels=128, channel_mults=(1, 2),
                                       attn_resolutions=(16,))
    assert "one attention_head_dim for all" in diffusers_mismatch(UNet(wide.model))


def _wide_checkpoint(num_classes: int) -> Checkpoint:
    """An 8x8 UNet that maps onto UNet2DModel (every width a multiple of 128, so 32 GroupNorm
    groups throughout), all its weights random so that no zero-initialised layer hides a
    wrong mapping."""
    cfg = get_preset("demo").override(image_size=8, channels=128, channel_mults=(1, 2),
                                      attn_resolutions=(4,), heads=4, num_classes=num_classes,
                                      prediction="v", schedule="cosine", zero_terminal_snr=True)
    torch.manual_seed(0)
    model = UNet(cfg.model).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    d = cfg.diffusion
    return Checkpoint(model, NoiseSchedule.from_name(d.schedule, d.T, d.zero_terminal_snr), cfg,
                      5, {}, [str(i) for i in range(num_classes)] or None)


@pytest.mark.parametrize("num_classes", [0, 3])
def test_diffusers_loads_the_export_and_computes_the_same(tmp_path, num_classes):
    diffusers = pytest.importorskip("diffusers")
    ckpt = _wide_checkpoint(num_classes)
    out = export_diffusers(ckpt, tmp_path / "pipe")
    unet, info = diffusers.UNet2DModel.from_pretrained(out, subfolder="unet",
                                                       output_loading_info=True)
    assert not any(info.values()), info  # no weight missing, unexpected or misshapen
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 500, 999])
    y = torch.tensor([0, 1, 2, 3]) if num_classes else None  # 3: "no label"
    with torch.no_grad():
        ours = ckpt.model(x, t, y)
        theirs = unet.eval()(x, t, class_labels=y).sample
    assert ours.abs().mean() > 0.01  # not a trivially zero output
    assert (ours - theirs).abs().max() < 1e-4
    pipe = diffusers.DDPMPipeline.from_pretrained(out)
    s = pipe.scheduler
    assert type(s).__name__ == "DDPMScheduler" and s.config.prediction_type == "v_prediction"
    assert torch.allclose(s.betas.double(), ckpt.schedule.betas, atol=1e-7)
    assert s.config.timestep_spacing == ckpt.config.diffusion.spacing
    with pytest.raises(FileExistsError, match="already exists"):
        export_diffusers(ckpt, out)
    if not num_classes:  # DDPMPipeline passes no class labels
        images = pipe(batch_size=2, num_inference_steps=2, generator=torch.Generator()
                      .manual_seed(0), output_type="np").images
        assert images.shape == (2, 8, 8, 1)
