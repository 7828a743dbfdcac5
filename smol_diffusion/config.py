"""Configuration: one dataclass per concern, presets as instances.

A checkpoint stores `dataclasses.asdict(config)`, and `Config.from_dict` rebuilds it, so a
checkpoint knows its own model, schedule and data.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

from .diffusion import PREDICTIONS
from .samplers import SAMPLERS
from .schedule import SCHEDULES, SPACINGS


@dataclass
class ModelConfig:
    """The UNet (Ho et al. 2020, Appendix B)."""

    image_size: int = 32  # training resolution; sets where attn_resolutions fall
    in_channels: int = 3  # 1 for digits, 3 for colour images
    out_channels: int | None = None  # None: same as in_channels (the network predicts eps)
    channels: int = 128  # channels at the first level
    channel_mults: tuple[int, ...] = (1, 2, 2, 2)  # channels of each level, times `channels`
    num_res_blocks: int = 2  # residual blocks per level in the encoder (one more in the decoder)
    attn_resolutions: tuple[int, ...] = (16,)  # resolutions with self-attention
    heads: int = 4  # attention heads
    dropout: float = 0.1  # dropout inside residual blocks
    num_classes: int = 0  # > 0: class-conditional, a label embedding added to the time's

    def __post_init__(self) -> None:
        if self.out_channels is None:
            self.out_channels = self.in_channels
        self.channel_mults = tuple(self.channel_mults)
        self.attn_resolutions = tuple(self.attn_resolutions)


@dataclass
class DiffusionConfig:
    """The forward process, what the network predicts, and how samples are drawn."""

    T: int = 1000  # diffusion steps the model is trained with
    schedule: str = "linear"  # "linear" (Ho et al. 2020) or "cosine" (Nichol & Dhariwal 2021)
    zero_terminal_snr: bool = False  # rescale so alpha_bar_T = 0 (Lin et al. 2023); needs v or x0
    prediction: str = "eps"  # the network's target: "eps", "x0" or "v" (Salimans & Ho 2022)
    min_snr_gamma: float | None = None  # None: L_simple; a number: Min-SNR-gamma weighting
    sampler: str = "dpm++2m-sde"  # or "ddpm" (ancestral), "ddim", "dpm++2m", "dpm++3m"
    sample_steps: int = 50  # network calls per sample: a respacing of the T-step schedule
    spacing: str = "trailing"  # which timesteps: "trailing", "linspace" or "leading"
    variance: str = "small"  # the ancestral sampler's: "small" beta_tilde_t or "large" beta_t

    def __post_init__(self) -> None:
        for name, allowed in [("schedule", SCHEDULES), ("prediction", PREDICTIONS),
                              ("sampler", tuple(SAMPLERS)), ("spacing", SPACINGS),
                              ("variance", ("small", "large"))]:
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got "
                                 f"{getattr(self, name)!r}")
        if self.T < 1 or not 1 <= self.sample_steps <= self.T:
            raise ValueError(f"T must be at least 1 and sample_steps in [1, T]; got T={self.T}, "
                             f"sample_steps={self.sample_steps}")
        if self.min_snr_gamma is not None and not self.min_snr_gamma > 0:
            raise ValueError(f"min_snr_gamma must be above 0 (5 is usual), or None for "
                             f"L_simple; got {self.min_snr_gamma}")
        if self.zero_terminal_snr and self.prediction == "eps":
            raise ValueError("with zero_terminal_snr the last step holds no signal, so eps "
                             "cannot be turned into x0 there; use prediction='v' (Lin et al. "
                             "2023) or 'x0'")


@dataclass
class DataConfig:
    """Where the images come from."""

    dataset: str = "mnist"  # "mnist" (embedded, offline), "cars" (Stanford Cars) or "folder"
    root: str = "data"  # where "cars" and "folder" look for images
    split: str = "all"  # "train", "test" or "all" (cars: both, as the original did; digits:
    #                     the test split is the last 50 of each class, held out for bits/dim)
    hflip: bool = False  # random horizontal flips, done on the training device
    cache_dir: str = "data/cache"  # image files are decoded once into a uint8 cache here
    num_workers: int = 0  # threads decoding images while the cache is built (0: one a core)


@dataclass
class TrainConfig:
    """The optimisation loop."""

    steps: int = 100_000  # optimizer steps
    batch_size: int = 64  # images per step, over all processes (torchrun) together
    grad_accum: int = 1  # micro-batches per step: batch_size / (processes * grad_accum) at once
    lr: float = 2e-4  # peak AdamW learning rate
    warmup: int = 5000  # steps of linear learning-rate warmup
    lr_schedule: str = "constant"  # after warmup: "constant" or "cosine" decay to 10% of lr
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # gradient-norm clipping threshold
    ema_decay: float = 0.9999  # EMA decay, reached after the warmup (1+n)/(10+n)
    label_dropout: float = 0.1  # conditional models: share of labels dropped (Ho & Salimans)
    precision: str = "auto"  # "bf16" autocast, "fp32", or "auto" (bf16 where it is faster)
    compile: bool = False  # torch.compile the network (falls back to eager, with a warning)
    channels_last: bool = False  # channels_last memory format (cars64 eager bf16, H100: 0.76x)
    device: str = "auto"  # "auto" (cuda, then mps, then cpu) or a torch device string
    seed: int = 0  # seeds the weights, the data order and the noise
    log_every: int = 100  # steps between loss readings (each one synchronises the device)
    sample_every: int = 5000  # steps between sample grids (0: only at the end)
    sample_n: int = 64  # images in a sample grid (0: no grids)
    checkpoint_every: int = 5000  # steps between checkpoints (0: only at the end)
    eval_every: int = 0  # steps between evaluations of the EMA model (0: never)
    eval_n: int = 500  # samples per evaluation (FID, KID and, on digits, recognisability)
    out_dir: str = "checkpoints/run"  # checkpoints and sample grids go here
    resume: str | None = None  # a checkpoint to continue from


@dataclass
class Config:
    """Everything a run needs; `override` changes fields by their (unique) names."""

    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def override(self, **changes) -> Config:
        """A copy with fields replaced, e.g. `cfg.override(lr=1e-4, steps=2000)`."""
        by_section = {f.name: {} for f in dataclasses.fields(self)}
        for name, value in changes.items():
            owner = field_owner(name)
            if owner is None:
                raise ValueError(f"unknown config field {name!r}; fields are: "
                                 f"{', '.join(sorted(all_fields()))}")
            by_section[owner][name] = value
        # one replace a section, so fields checked together (T, sample_steps) change together
        return Config(**{k: dataclasses.replace(getattr(self, k), **v)
                         for k, v in by_section.items()})

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        """Rebuild a config from `dataclasses.asdict(config)` (as stored in checkpoints); a
        field it lacks takes its default."""
        unknown = set(d) - set(_SECTIONS)
        unknown |= {f"{k}.{name}" for k, v in d.items() if k in _SECTIONS
                    for name in set(v) - {f.name for f in dataclasses.fields(_SECTIONS[k])}}
        if unknown:
            raise ValueError(f"unknown config fields {sorted(unknown)} (written by another "
                             "version of smol_diffusion?)")
        return cls(**{k: _SECTIONS[k](**v) for k, v in d.items()})


_SECTIONS = {"model": ModelConfig, "diffusion": DiffusionConfig, "data": DataConfig,
             "train": TrainConfig}


def all_fields() -> dict[str, dataclasses.Field]:
    """Every leaf field by name, across the sections."""
    return {f.name: f for kind in _SECTIONS.values() for f in dataclasses.fields(kind)}


def field_owner(name: str) -> str | None:
    """The section ("model", "train", ...) that holds field `name`, or None."""
    for section, kind in _SECTIONS.items():
        if any(f.name == name for f in dataclasses.fields(kind)):
            return section
    return None


PRESETS: dict[str, Config] = {
    # The embedded 5,000 MNIST digits on a 2-core CPU, sampling included, in under 5 minutes.
    # Measured there (recognisable digits, see the README): 16x16 fits the budget (28x28 trains 4x
    # slower per image); the cosine schedule and Min-SNR-5 weighting each made clearly more
    # samples recognisable than the linear schedule and L_simple; and within the budget a
    # narrow UNet taking many steps beat a wider one taking fewer (16 channels, 2,000 steps:
    # 81% confident; 32 channels, 1,000 steps: 79%).
    "demo": Config(
        model=ModelConfig(image_size=16, in_channels=1, channels=16, channel_mults=(1, 2, 2),
                          num_res_blocks=1, attn_resolutions=(), heads=4, dropout=0.0),
        diffusion=DiffusionConfig(T=1000, schedule="cosine", min_snr_gamma=5.0),
        data=DataConfig(dataset="mnist", split="train"),
        # channels_last: 1.04x img/s on that CPU (789 vs 759, medians of 3 interleaved runs)
        train=TrainConfig(steps=2200, batch_size=64, lr=2e-3, warmup=100,
                          lr_schedule="cosine", ema_decay=0.999, log_every=25,
                          sample_every=0, checkpoint_every=0, out_dir="checkpoints/demo",
                          channels_last=True),
    ),
    # Stanford Cars at 64x64 on a CUDA GPU: Ho et al.'s CIFAR-10 recipe (35.7M parameters,
    # lr 2e-4, EMA 0.9999, T=1000, linear betas, dropout 0.1) with attention at 16 and 8.
    "cars64": Config(
        model=ModelConfig(image_size=64, in_channels=3, channels=128, channel_mults=(1, 2, 2, 2),
                          num_res_blocks=2, attn_resolutions=(16, 8), heads=4, dropout=0.1),
        diffusion=DiffusionConfig(T=1000, schedule="linear"),
        data=DataConfig(dataset="cars", root="data", hflip=True),
        # compile: 1.46x img/s over eager bf16 on an H100 (1,236 vs 845 at batch 64, before
        # compile_model forced channels_last convolutions: 1.19x more at batch 256); the first
        # step takes one to two minutes to compile
        train=TrainConfig(steps=200_000, batch_size=64, lr=2e-4, warmup=5000, ema_decay=0.9999,
                          compile=True, out_dir="checkpoints/cars64"),
    ),
}


def get_preset(name: str) -> Config:
    """A fresh copy of a preset (`demo` or `cars64`)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
