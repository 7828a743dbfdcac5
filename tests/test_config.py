"""Settings are checked when a config is built, whichever way it is built (constructor,
`override`, `from_dict`, the command line, the notebook), so a bad one fails at once and says
which field, which value and what the field accepts."""
import dataclasses
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from smol_diffusion import NoiseSchedule, UNet
from smol_diffusion.checkpoint import Checkpoint
from smol_diffusion.config import Config, ModelConfig, TrainConfig, field_owner, overrides_from
from smol_diffusion.presets import PRESETS, get_preset
from smol_diffusion.evaluate import evaluate
from smol_diffusion.cli import main as cli_main
from smol_diffusion.cli import parse_train as parse_args

ROOT = Path(__file__).resolve().parents[1]


def build(name, value):
    """The section holding field `name`, built directly with `value` (no text parsing)."""
    section = type(getattr(Config(), field_owner(name)))
    return section(**{name: value})


@pytest.mark.parametrize("name, value, message", [
    ("steps", 2.5, "steps must be an integer; got 2.5 (float)"),
    ("steps", 10.0, "steps must be an integer; got 10.0 (float)"),
    ("steps", True, "steps must be an integer; got True (bool)"),
    ("steps", "10", "steps must be an integer; got '10' (str)"),
    ("steps", None, "steps must be an integer; got None"),
    ("lr", "1e-4", "lr must be a number; got '1e-4' (str)"),
    ("lr", False, "lr must be a number; got False (bool)"),
    ("compile", 1, "compile must be True or False; got 1 (int)"),
    ("hflip", "false", "hflip must be True or False; got 'false' (str)"),
    ("device", 0, "device must be a string; got 0 (int)"),
    ("resume", 1, "resume must be a string or None; got 1 (int)"),
    ("min_snr_gamma", "5", "min_snr_gamma must be a number or None; got '5' (str)"),
    ("out_channels", 1.0, "out_channels must be an integer or None; got 1.0 (float)"),
    ("channel_mults", (1, 2.0), "channel_mults must be a tuple of integers; got (1, 2.0)"),
    ("attn_resolutions", 16, "attn_resolutions must be a tuple of integers; got 16 (int)"),
])
def test_a_wrong_type_is_named(name, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build(name, value)


def test_right_types_are_stored_as_annotated():
    tc = TrainConfig(lr=1, weight_decay=np.float32(0.5), steps=np.int64(7), grad_clip=math.inf)
    assert type(tc.lr) is float and type(tc.weight_decay) is float and type(tc.steps) is int
    mc = ModelConfig(channel_mults=[1, 2], attn_resolutions=[16], out_channels=None)
    assert mc.channel_mults == (1, 2) and mc.attn_resolutions == (16,) and mc.out_channels is None


@pytest.mark.parametrize("change, message", [
    ({"image_size": 0}, "image_size must be an integer >= 1; got 0"),
    ({"image_size": 15}, "image_size 15 is not divisible by 8, which 4 channel_mults need"),
    ({"in_channels": 0}, "in_channels must be an integer >= 1; got 0"),
    ({"out_channels": 0}, "out_channels must be an integer >= 1; got 0"),
    ({"channels": 0}, "channels must be an integer >= 1; got 0"),
    ({"channel_mults": ()}, "channel_mults must hold one multiplier a level"),
    ({"channel_mults": (1, 0)}, "channel_mults must be integers >= 1; got (1, 0)"),
    ({"num_res_blocks": 0}, "num_res_blocks must be an integer >= 1; got 0"),
    ({"attn_resolutions": (16, 0)}, "attn_resolutions must be integers >= 1; got (16, 0)"),
    ({"heads": 0}, "heads must be an integer >= 1; got 0"),
    ({"heads": 3}, "256 channels at resolution 16 do not split into 3 attention heads"),
    ({"dropout": 1.0}, "dropout must be a number in [0, 1); got 1.0"),
    ({"dropout": math.nan}, "dropout must be a number in [0, 1); got nan"),
    ({"num_classes": -1}, "num_classes must be an integer >= 0; got -1"),
    ({"T": 0}, "sample_steps in [1, T]; got T=0"),
    ({"sampler": "euler"}, "sampler must be one of"),
    ({"dataset": "imagenet"}, "dataset must be one of mnist, cars, folder; got 'imagenet'"),
    ({"split": "val"}, "split must be one of train, test, all; got 'val'"),
    ({"num_workers": -1}, "num_workers must be an integer >= 0; got -1"),
    ({"steps": 0}, "steps must be an integer >= 1; got 0"),
    ({"batch_size": 0}, "batch_size must be an integer >= 1; got 0"),
    ({"grad_accum": 0}, "grad_accum must be an integer >= 1; got 0"),
    ({"lr": 0.0}, "lr must be a number > 0 and finite; got 0.0"),
    ({"lr": math.inf}, "lr must be a number > 0 and finite; got inf"),
    ({"lr": math.nan}, "lr must be a number > 0 and finite; got nan"),
    ({"warmup": -1}, "warmup must be an integer >= 0; got -1"),
    ({"lr_schedule": "linear"}, "lr_schedule must be one of constant, cosine; got 'linear'"),
    ({"weight_decay": -0.1}, "weight_decay must be a number >= 0 and finite; got -0.1"),
    ({"grad_clip": 0.0}, "grad_clip must be a number > 0 (float('inf') turns clipping off)"),
    ({"grad_clip": math.nan}, "grad_clip must be a number > 0"),
    ({"ema_decay": 1.5}, "ema_decay must be a number in [0, 1]; got 1.5"),
    ({"label_dropout": -0.1}, "label_dropout must be a number in [0, 1]; got -0.1"),
    ({"precision": "fp8"}, "precision must be one of auto, bf16, fp16, fp32; got 'fp8'"),
    ({"seed": -1}, "seed must be an integer in [0, 2**64); got -1"),
    ({"seed": 2**64}, "seed must be an integer in [0, 2**64)"),
    ({"log_every": 0}, "log_every must be an integer >= 1; got 0"),
    ({"sample_every": -1}, "sample_every must be an integer >= 0; got -1"),
    ({"sample_n": -1}, "sample_n must be an integer >= 0; got -1"),
    ({"checkpoint_every": -1}, "checkpoint_every must be an integer >= 0; got -1"),
    ({"eval_every": -1}, "eval_every must be an integer >= 0; got -1"),
    ({"eval_every": 5, "eval_n": 1}, "eval_n must be an integer >= 2 when eval_every > 0; got 1"),
])
def test_a_value_out_of_range_is_named_with_its_range(change, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        Config().override(**change)


def test_the_edges_of_each_range_are_accepted():
    cfg = Config().override(dropout=0.0, num_classes=0, warmup=0, weight_decay=0.0, ema_decay=1.0,
                            label_dropout=1.0, grad_clip=math.inf, seed=2**64 - 1, sample_n=0,
                            eval_n=1, image_size=8, heads=1)
    assert cfg.train.grad_clip == math.inf and cfg.model.image_size == 8


def test_a_colour_dataset_on_the_demo_preset_gets_colour_outputs():
    cfg = get_preset("demo").override(in_channels=3)  # out_channels None: as many as come in
    assert UNet(cfg.model)(torch.zeros(1, 3, 16, 16), torch.tensor([0])).shape == (1, 3, 16, 16)


def test_settings_that_need_the_run_are_checked_against_it():
    tc = TrainConfig(batch_size=12, grad_accum=2)
    assert tc.per_process(1) == (12, 6) and tc.per_process(2) == (6, 3)
    with pytest.raises(ValueError, match=re.escape("batch_size 12 does not split into 4 "
                                                   "processes x 2 accumulation steps; make it "
                                                   "a multiple of 8")):
        tc.per_process(4)
    cfg = Config().override(batch_size=64, num_classes=10)
    cfg.check_dataset(64, [str(d) for d in range(10)])
    with pytest.raises(ValueError, match="the dataset has 63 images, fewer than one batch of 64"):
        cfg.check_dataset(63, [str(d) for d in range(10)])
    with pytest.raises(ValueError, match="num_classes=10, but the dataset has no labels; set "
                                         "num_classes to 0 or use a dataset with labels"):
        cfg.check_dataset(100, None)


def test_text_is_read_as_the_fields_type():
    """As YAML (`1e-4` is text there) and papermill give values: override reads them."""
    cfg = Config().override(lr="1e-4", steps="10", warmup="1e3", grad_clip="inf", compile="true",
                            hflip="0", channel_mults="1,2", attn_resolutions="[8, 4]",
                            min_snr_gamma="none", resume="None", device="cpu")
    assert (cfg.train.lr, cfg.train.steps, cfg.train.warmup) == (1e-4, 10, 1000)
    assert cfg.train.grad_clip == math.inf and cfg.train.compile and not cfg.data.hflip
    assert cfg.model.channel_mults == (1, 2) and cfg.model.attn_resolutions == (8, 4)
    assert cfg.diffusion.min_snr_gamma is None and cfg.train.resume is None
    for change, message in [({"steps": "1e400"}, "steps '1e400' is not a finite number"),
                            ({"steps": "inf"}, "steps 'inf' is not a finite number"),
                            ({"steps": "2.5"}, "steps '2.5' is not a whole number"),
                            ({"steps": "many"}, "steps 'many' is not an integer"),
                            ({"lr": "fast"}, "lr 'fast' is not a number"),
                            ({"lr": "nan"}, "lr must be a number > 0 and finite; got nan"),
                            ({"compile": "yes please"}, "compile 'yes please' is not true or"),
                            ({"channel_mults": "1,x"}, "channel_mults '1,x' is not a list of")]:
        with pytest.raises(ValueError, match=message):
            Config().override(**change)


def test_overrides_may_be_json_text():
    """papermill -p passes a dict parameter as its JSON text."""
    assert overrides_from('{"steps": 10, "lr": "1e-4"}') == {"steps": 10, "lr": "1e-4"}
    assert overrides_from({"steps": 10}) == {"steps": 10} and overrides_from(None) == {}
    with pytest.raises(ValueError, match=r"overrides '\{steps: 10\}' is not JSON"):
        overrides_from("{steps: 10}")
    with pytest.raises(ValueError, match=r"overrides must be a dict .*; got \[10\] \(list\)"):
        overrides_from("[10]")
    assert overrides_from('{"n": 16}', "evaluation") == {"n": 16}  # the notebook's evaluation
    with pytest.raises(ValueError, match=r"evaluation must be a dict or its JSON text, such as "
                                         r"\{\"n\": 500\}; got 16 \(int\)"):
        overrides_from("16", "evaluation", '{"n": 500}')


def test_the_notebook_reads_its_overrides_as_papermill_and_yaml_give_them():
    """The notebook's config cell, run with the parameters `-p` (JSON text) and `-y` (YAML:
    1e-4 is text) pass."""
    nb = json.loads((ROOT / "DDPM_train_and_sample.ipynb").read_text())
    cell = "".join(nb["cells"][2]["source"])
    assert "overrides_from(overrides)" in cell
    for overrides in ['{"steps": 10, "lr": 1e-4}', {"steps": 10, "lr": "1e-4"}]:
        scope = {"preset": "demo", "overrides": overrides}
        exec(cell, scope)
        assert scope["cfg"].train.steps == 10 and scope["cfg"].train.lr == 1e-4


def test_the_command_line_refuses_bad_values_by_name(capsys):
    with pytest.raises(ValueError, match="image_size must be an integer >= 1; got 0"):
        parse_args(["--image_size", "0"])
    with pytest.raises(ValueError, match="channels must be an integer >= 1; got 0"):
        parse_args(["--channels", "0"])
    with pytest.raises(SystemExit, match="error: --steps '2.5' is not a whole number"):
        parse_args(["--steps", "2.5"])
    with pytest.raises(SystemExit, match="error: channels must be an integer >= 1; got 0"):
        cli_main(["train", "--channels", "0"])
    assert parse_args(["--overwrite"]).train.overwrite  # a bare bool flag means true
    assert not parse_args(["--overwrite", "false"]).train.overwrite
    assert not Config().train.overwrite


def test_an_overflowing_number_is_an_error_not_a_traceback():
    r = subprocess.run([sys.executable, "-m", "smol_diffusion", "train", "--steps", "1e400"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "error: --steps '1e400' is not a finite number" in r.stderr


def test_bits_per_dim_needs_at_least_one_image(tmp_path):
    with pytest.raises(SystemExit, match="--bpd_n, the held-out images for bits/dim, must be at "
                                         "least 1; got -1"):
        cli_main(["evaluate", "--checkpoint", str(tmp_path / "ckpt.pt"), "--bpd-n", "-1"])
    cfg = get_preset("demo").override(image_size=8, channel_mults=(1, 2))
    ckpt = Checkpoint(UNet(cfg.model), NoiseSchedule.from_name("cosine", 1000), cfg, 0, {})
    with pytest.raises(ValueError, match=r"bpd_n \(--bpd_n\).* must be at least 1; got 0"):
        evaluate(ckpt, metrics=("bpd",), bpd_n=0)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_a_checkpoints_dict(name):
    cfg = get_preset(name)
    assert Config.from_dict(dataclasses.asdict(cfg)) == cfg
    # through JSON too, where tuples come back as lists
    assert Config.from_dict(json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg
