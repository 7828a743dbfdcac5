"""Shareable weights: a checkpoint's EMA model as safetensors, loadable without pickle.

    smol-diffusion export --checkpoint checkpoints/demo/ckpt.pt --out exported/demo

writes `model.safetensors` (the EMA weights) and `config.json` (the whole config, the step, the
class names and the sha256 of the weights), which `load_checkpoint` loads like a `ckpt.pt`.
With `--diffusers` the same folder also holds a diffusers pipeline (`model_index.json`, `unet/`,
`scheduler/`) that `DDPMPipeline.from_pretrained` loads, for models whose UNet is exactly a
diffusers `UNet2DModel` (`diffusers_mismatch` says why another is not). Nothing here imports
diffusers: it only writes files in its format.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save as save_safetensors
from torch import nn

from .checkpoint import (CONFIG, FORMAT, VERSION, WEIGHTS, Checkpoint, check_finite,
                         load_checkpoint)
from .files import shown, write_temp
from .unet import Attention, ResBlock, UNet

# The diffusers release whose file layout the diffusers export follows (checked against it by
# tests/test_export.py); diffusers reads this field to adapt configs written by old releases.
DIFFUSERS_VERSION = "0.42.1"


def export_weights(checkpoint: Checkpoint | str | Path, out_dir: str | Path, *,
                   diffusers: bool = False, overwrite: bool = False) -> Path:
    """Write the EMA weights of `checkpoint` (a loaded one, or the path of one) to
    `out_dir/model.safetensors` and its config, step and classes to `out_dir/config.json`;
    return `out_dir`, which `load_checkpoint` accepts. With `diffusers`, the folder also gets
    `export_diffusers`' files, all written together. An existing export there is refused
    unless `overwrite`, and so are weights that are not finite."""
    ckpt = _loaded(checkpoint)
    out_dir = Path(out_dir)
    files = _weights_files(ckpt, out_dir)
    if diffusers:
        files |= _diffusers_files(ckpt, out_dir)
    _write(files, overwrite)
    return out_dir


def export_diffusers(checkpoint: Checkpoint | str | Path, out_dir: str | Path, *,
                     overwrite: bool = False) -> Path:
    """Write `checkpoint` as a diffusers DDPMPipeline folder: `unet/` (config.json and
    diffusion_pytorch_model.safetensors, for `UNet2DModel.from_pretrained(out_dir,
    subfolder="unet")`), `scheduler/` (a DDPMScheduler with the exact betas) and
    `model_index.json`; return `out_dir`. Raises ValueError, naming the first difference, for
    a model that diffusers' UNet2DModel cannot hold exactly (`diffusers_mismatch`). A
    class-conditional UNet2DModel needs `class_labels` (num_classes means "no label"), which
    DDPMPipeline does not pass: sample such a model with its UNet."""
    ckpt = _loaded(checkpoint)
    out_dir = Path(out_dir)
    _write(_diffusers_files(ckpt, out_dir), overwrite)
    return out_dir


def diffusers_mismatch(model: UNet) -> str | None:
    """None if diffusers' UNet2DModel computes exactly what `model` does; else the first part
    it cannot hold. Everything else maps one to one (checked by tests/test_export.py): the
    cos-then-sin timestep embedding (flip_sin_to_cos, freq_shift 0), its two-layer SiLU MLP,
    the label embedding added to it, GroupNorm-SiLU-conv blocks with the embedding added after
    the first conv and a 1x1 skip, single-norm attention with a residual, strided-conv
    downsampling, nearest upsampling then a conv, and the skips in the same order."""
    cfg = model.cfg
    if cfg.patch_size != 1:
        return (f"patch_size is {cfg.patch_size}: UNet2DModel has no pixel unshuffle around "
                "its convolutions, so it must be 1")
    if cfg.channel_mults[0] != 1:  # diffusers: conv_in and the embedding use block_out_channels[0]
        return (f"channel_mults starts with {cfg.channel_mults[0]}: UNet2DModel's input conv "
                "and timestep embedding are as wide as its first level, so it must be 1")
    norms = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.GroupNorm)]
    first = norms[0][1]
    for name, m in norms:  # UNet2DModel passes one norm_num_groups and norm_eps to every layer
        if (m.num_groups, m.eps) != (first.num_groups, first.eps):
            return (f"GroupNorm {name} has {m.num_groups} groups over {m.num_channels} channels "
                    f"and {norms[0][0]} {first.num_groups} over {first.num_channels}: "
                    "UNet2DModel has one norm_num_groups for all (unet.group_norm picks "
                    "gcd(32, channels // 4, channels), one count only when every width is a "
                    "multiple of 128)")
    attn = [(name, m.qkv.in_channels // m.heads) for name, m in model.named_modules()
            if isinstance(m, Attention)]
    for name, head_dim in attn:  # UNet2DModel fixes the head width and derives the heads
        if head_dim != attn[0][1]:
            return (f"attention {name} has heads {head_dim} channels wide and {attn[0][0]} "
                    f"{attn[0][1]}: UNet2DModel has one attention_head_dim for all")
    return None


def _loaded(checkpoint: Checkpoint | str | Path) -> Checkpoint:
    return checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint, "cpu")


def _ema_weights(ckpt: Checkpoint, out_dir: Path) -> dict[str, torch.Tensor]:
    """The EMA model's weights, on the CPU and contiguous (as safetensors stores them), after
    refusing any that are not finite: an export of a diverged model samples blank images."""
    weights = {k: v.detach().cpu().contiguous() for k, v in ckpt.model.state_dict().items()}
    check_finite({"ema": weights}, out_dir, "refusing to export to")
    return weights


def _json(obj: dict) -> bytes:
    return (json.dumps(obj, indent=2) + "\n").encode("utf-8")


def _weights_files(ckpt: Checkpoint, out_dir: Path) -> dict[Path, bytes]:
    """The files of a smol_diffusion export, by path, in the order they are renamed into place:
    config.json last, naming the weights by their sha256, so that a crash between the renames
    leaves a folder `read_export` refuses (with the reason), never a mismatched pair it loads."""
    data = save_safetensors(_ema_weights(ckpt, out_dir), metadata={"format": "pt"})
    meta = {"format": FORMAT, "version": VERSION, "step": ckpt.step, "classes": ckpt.classes,
            "weights_sha256": hashlib.sha256(data).hexdigest(),
            "config": dataclasses.asdict(ckpt.config)}
    return {out_dir / WEIGHTS: data, out_dir / CONFIG: _json(meta)}


def _diffusers_files(ckpt: Checkpoint, out_dir: Path) -> dict[Path, bytes]:
    """The files of a diffusers DDPMPipeline folder, model_index.json last."""
    reason = diffusers_mismatch(ckpt.model)
    if reason:
        raise ValueError(f"this model does not map exactly onto diffusers' UNet2DModel: "
                         f"{reason}; export it without --diffusers")
    m, d = ckpt.config.model, ckpt.config.diffusion
    levels = len(m.channel_mults)
    attn_levels = {i for i in range(levels) if m.image_size // 2**i in m.attn_resolutions}  # p = 1
    norm = next(x for x in ckpt.model.modules() if isinstance(x, nn.GroupNorm))
    unet = {
        "_class_name": "UNet2DModel", "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": m.image_size, "in_channels": m.in_channels,
        "out_channels": m.output_channels, "center_input_sample": False,
        "time_embedding_type": "positional", "flip_sin_to_cos": True, "freq_shift": 0,
        "down_block_types": [("AttnDownBlock2D" if i in attn_levels else "DownBlock2D")
                             for i in range(levels)],
        "mid_block_type": "UNetMidBlock2D",
        "up_block_types": [("AttnUpBlock2D" if i in attn_levels else "UpBlock2D")
                           for i in reversed(range(levels))],
        "block_out_channels": [m.channels * k for k in m.channel_mults],
        "layers_per_block": m.num_res_blocks, "mid_block_scale_factor": 1,
        "downsample_padding": 1, "downsample_type": "conv", "upsample_type": "conv",
        "dropout": m.dropout, "act_fn": "silu",
        "attention_head_dim": m.channels * m.channel_mults[-1] // m.heads,
        "norm_num_groups": norm.num_groups, "attn_norm_num_groups": None,
        "norm_eps": norm.eps, "resnet_time_scale_shift": "default", "add_attention": True,
        "class_embed_type": None, "num_class_embeds": m.num_classes + 1 if m.num_classes else None,
    }
    prediction = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}[d.prediction]
    scheduler = {
        "_class_name": "DDPMScheduler", "_diffusers_version": DIFFUSERS_VERSION,
        "num_train_timesteps": ckpt.schedule.T,
        "trained_betas": ckpt.schedule.betas.tolist(),  # exact, whatever schedule made them
        "variance_type": f"fixed_{d.variance}", "clip_sample": True, "clip_sample_range": 1.0,
        "prediction_type": prediction, "timestep_spacing": d.spacing, "steps_offset": 0,
        "rescale_betas_zero_snr": False,  # the betas above are already rescaled if asked
    }
    index = {"_class_name": "DDPMPipeline", "_diffusers_version": DIFFUSERS_VERSION,
             "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"]}
    weights = _diffusers_weights(ckpt.model, _ema_weights(ckpt, out_dir))
    return {out_dir / "unet" / "diffusion_pytorch_model.safetensors":
            save_safetensors(weights, metadata={"format": "pt"}),
            out_dir / "unet" / "config.json": _json(unet),
            out_dir / "scheduler" / "scheduler_config.json": _json(scheduler),
            out_dir / "model_index.json": _json(index)}


# Our ResBlock's layers by their names in diffusers' ResnetBlock2D.
_RESNET = {"norm1": "norm1", "conv1": "conv1", "emb": "time_emb_proj", "norm2": "norm2",
           "conv2": "conv2", "skip": "conv_shortcut"}


def _diffusers_weights(model: UNet, ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`ours` (the UNet's state dict) under UNet2DModel's names. The qkv 1x1 conv becomes three
    Linear layers (a 1x1 conv is a Linear over channels; q, k, v are its thirds, in that order,
    as `Attention.forward` splits them) and the output 1x1 conv one more."""
    cfg, levels = model.cfg, len(model.cfg.channel_mults)
    layers = {"time_mlp.0": "time_embedding.linear_1", "time_mlp.2": "time_embedding.linear_2",
              "label_emb": "class_embedding", "conv_in": "conv_in",
              "norm_out": "conv_norm_out", "conv_out": "conv_out",
              "mid.0": "mid_block.resnets.0", "mid.1": "mid_block.attentions.0",
              "mid.2": "mid_block.resnets.1"}
    k = 0  # walk model.down as UNet.__init__ built it: blocks, then a strided conv, a level
    for level in range(levels):
        for j in range(cfg.num_res_blocks):
            layers[f"down.{k}.0"] = f"down_blocks.{level}.resnets.{j}"
            layers[f"down.{k}.1"] = f"down_blocks.{level}.attentions.{j}"
            k += 1
        if level < levels - 1:
            layers[f"down.{k}.0"] = f"down_blocks.{level}.downsamplers.0.conv"
            k += 1
    k = 0  # model.up: one block more a level, then upsampling (layer 0) and a conv (layer 1)
    for i, level in enumerate(reversed(range(levels))):
        for j in range(cfg.num_res_blocks + 1):
            layers[f"up.{k}.0"] = f"up_blocks.{i}.resnets.{j}"
            layers[f"up.{k}.1"] = f"up_blocks.{i}.attentions.{j}"
            k += 1
        if level > 0:
            layers[f"up.{k}.1"] = f"up_blocks.{i}.upsamplers.0.conv"
            k += 1
    modules = dict(model.named_modules())
    out = {}
    for name, theirs in layers.items():
        layer = modules.get(name)  # None: a level without attention, or an unconditional model
        if isinstance(layer, ResBlock):
            for sub, their_sub in _RESNET.items():
                for p in ("weight", "bias"):
                    if f"{name}.{sub}.{p}" in ours:  # no skip conv where widths match
                        out[f"{theirs}.{their_sub}.{p}"] = ours[f"{name}.{sub}.{p}"]
        elif isinstance(layer, Attention):
            for p in ("weight", "bias"):
                q, k_, v = _linear(ours[f"{name}.qkv.{p}"]).chunk(3)  # each (C, C) or (C,)
                out |= {f"{theirs}.to_q.{p}": q, f"{theirs}.to_k.{p}": k_,
                        f"{theirs}.to_v.{p}": v,
                        f"{theirs}.to_out.0.{p}": _linear(ours[f"{name}.proj.{p}"]),
                        f"{theirs}.group_norm.{p}": ours[f"{name}.norm.{p}"]}
        elif layer is not None:
            out |= {f"{theirs}.{p}": ours[f"{name}.{p}"] for p in ("weight", "bias")
                    if f"{name}.{p}" in ours}
    if sum(t.numel() for t in out.values()) != sum(t.numel() for t in ours.values()):
        raise RuntimeError("the diffusers export lost weights: UNet changed without "
                           "export._diffusers_weights")
    # own storage each: safetensors refuses tensors that share it (q, k, v are views of qkv)
    return {name: t.clone().contiguous() for name, t in out.items()}


def _linear(t: torch.Tensor) -> torch.Tensor:
    """A 1x1 conv's weight (O, I, 1, 1) as a Linear's (O, I); a bias as it is."""
    return t[:, :, 0, 0] if t.ndim == 4 else t


def _write(files: dict[Path, bytes], overwrite: bool) -> None:
    """Write each file to a temporary one beside it, then rename them into place in order.
    Refuses, before writing anything, to replace an existing file unless `overwrite`."""
    existing = [p for p in files if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{shown(existing[0])} already exists, and exporting would "
                              "replace it; export to another folder, or overwrite it "
                              "(--overwrite, overwrite=True)")
    temps = {}
    try:
        for path, data in files.items():
            temps[path] = write_temp(path, lambda f, data=data: f.write(data), "export",
                                     lambda data=data: len(data))
        for path, tmp in temps.items():
            os.replace(tmp, path)
    finally:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
