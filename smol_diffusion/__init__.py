"""smol_diffusion: a small, readable DDPM (Ho et al. 2020) that trains in minutes on a CPU.

Public names: NoiseSchedule, UNet, sample, train, load_checkpoint, and the config dataclasses.
"""
import warnings

# `python -m smol_diffusion.train` runs a module this package has already imported for its
# `train` function; runpy warns about that, harmlessly. Silence exactly that warning.
warnings.filterwarnings("ignore", message=r"'smol_diffusion\.\w+' found in sys\.modules",
                        category=RuntimeWarning)

from .checkpoint import load_checkpoint  # noqa: E402
from .config import (Config, DataConfig, DiffusionConfig, ModelConfig, TrainConfig,  # noqa: E402
                     get_preset)
from . import sample as _sample_cli  # noqa: E402, F401  (imported first: see `train` below)
from .samplers import sample  # noqa: E402
from .schedule import NoiseSchedule  # noqa: E402
# The modules `train` and `sample` (the command lines) are imported before their functions are
# bound to the same names, so a later `import smol_diffusion.train` cannot rebind them.
from .train import train  # noqa: E402
from .unet import UNet  # noqa: E402

__all__ = ["Config", "DataConfig", "DiffusionConfig", "ModelConfig", "TrainConfig",
           "NoiseSchedule", "UNet", "get_preset", "load_checkpoint", "sample", "train"]
