"""smol_diffusion: a small, readable DDPM (Ho et al. 2020) that trains in minutes on a CPU.

Public names: NoiseSchedule, UNet, sample, train, load_checkpoint, and the config dataclasses.
The command line is `smol-diffusion` (cli.py), also `python -m smol_diffusion`.
"""
from .checkpoint import load_checkpoint
from .config import Config, DataConfig, DiffusionConfig, ModelConfig, TrainConfig
from .presets import get_preset
from .samplers import sample
from .schedule import NoiseSchedule
from .training import train
from .unet import UNet

__all__ = ["Config", "DataConfig", "DiffusionConfig", "ModelConfig", "TrainConfig",
           "NoiseSchedule", "UNet", "get_preset", "load_checkpoint", "sample", "train"]
