"""Presets: complete configs, as instances, for the runs the README describes."""
from __future__ import annotations

import copy

from .config import Config, DataConfig, DiffusionConfig, ModelConfig, TrainConfig

PRESETS: dict[str, Config] = {
    # The embedded digits at their own 28x28 on a 2-core CPU, sampling included, in under 5
    # minutes: a narrow UNet (8, 16, 32 channels at 28, 14, 7 px) taking many steps, with the
    # budget put on the noisy timesteps that decide a digit's shape (cosine schedule, Min-SNR
    # weighting), and told which digit to draw (class-conditional: the unconditional recipes
    # fell short of 85% recognisable at every resolution). How it was chosen: docs/presets.md.
    "demo": Config(
        model=ModelConfig(image_size=28, in_channels=1, channels=8, channel_mults=(1, 2, 4),
                          num_res_blocks=1, attn_resolutions=(), heads=4, dropout=0.0,
                          num_classes=10),
        diffusion=DiffusionConfig(T=1000, schedule="cosine", min_snr_gamma=5.0),
        data=DataConfig(dataset="mnist", split="train"),
        train=TrainConfig(steps=1800, batch_size=64, lr=4e-3, warmup=100,
                          lr_schedule="cosine", ema_decay=0.999, log_every=25,
                          sample_every=0, sample_n=60, checkpoint_every=0,
                          out_dir="checkpoints/demo", channels_last=True),
    ),
    # A folder of colour images at 32x32 on a laptop CPU (`--root` names it; `smol-diffusion
    # icons` builds one from Debian's icon theme): the best 30-minute point of the colour
    # frontier on a 2-core CPU (docs/colour.md): a narrow three-level UNet (16, 32, 32 channels)
    # with attention at 8 px taking many steps, the v target on a zero-terminal-SNR cosine
    # schedule (with eps, the samples of white-backed images came out dark), Min-SNR weighting,
    # flips, and about 10% of the files held out to score the samples against.
    "icons32": Config(
        model=ModelConfig(image_size=32, in_channels=3, channels=16, channel_mults=(1, 2, 2),
                          num_res_blocks=1, attn_resolutions=(8,), heads=4, dropout=0.0),
        diffusion=DiffusionConfig(T=1000, schedule="cosine", zero_terminal_snr=True,
                                  prediction="v", min_snr_gamma=5.0),
        data=DataConfig(dataset="folder", root="data/icons32", split="train", hflip=True),
        train=TrainConfig(steps=8700, batch_size=64, lr=2e-3, warmup=100,
                          lr_schedule="cosine", ema_decay=0.999, log_every=25,
                          sample_every=0, sample_n=64, checkpoint_every=500,
                          out_dir="checkpoints/icons32", channels_last=True),
    ),
    # Stanford Cars at 64x64 on a CUDA GPU: Ho et al.'s CIFAR-10 recipe (35.7M parameters,
    # lr 2e-4, EMA 0.9999, T=1000, linear betas, dropout 0.1) with attention at 16 and 8.
    "cars64": Config(
        model=ModelConfig(image_size=64, in_channels=3, channels=128, channel_mults=(1, 2, 2, 2),
                          num_res_blocks=2, attn_resolutions=(16, 8), heads=4, dropout=0.1),
        diffusion=DiffusionConfig(T=1000, schedule="linear"),
        data=DataConfig(dataset="cars", root="data", hflip=True),
        # compile: fuses the GroupNorm / SiLU / residual chains that eager mode runs one
        # memory-bound kernel each (docs/speed.md); its first step compiles for a minute or two
        train=TrainConfig(steps=200_000, batch_size=64, lr=2e-4, warmup=5000, ema_decay=0.9999,
                          compile=True, out_dir="checkpoints/cars64"),
    ),
}


def get_preset(name: str) -> Config:
    """A fresh copy of a preset (`demo`, `icons32` or `cars64`)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
