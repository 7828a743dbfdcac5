"""Configuration: one dataclass per concern (the presets, instances of it: presets.py).

A checkpoint stores `dataclasses.asdict(config)`, and `Config.from_dict` rebuilds it, so a
checkpoint knows its own model, schedule and data.

Every field is checked when a config is built (directly, by `override`, by `from_dict`): its
type against its annotation, then its range or its allowed names, so a wrong setting fails at
once with the field's name, the value and what it accepts, not hours into a run.
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass, field

from .diffusion import PREDICTIONS
from .hardware import PRECISIONS
from .samplers import SAMPLERS
from .schedule import SCHEDULES, SPACINGS

DATASETS = ("mnist", "cars", "folder")
SPLITS = ("train", "test", "all")
LR_SCHEDULES = ("constant", "cosine")

# The allowed names of each str field that has a fixed set of them.
_CHOICES = {"schedule": SCHEDULES, "prediction": PREDICTIONS, "sampler": tuple(SAMPLERS),
            "spacing": SPACINGS, "variance": ("small", "large"), "dataset": DATASETS,
            "split": SPLITS, "lr_schedule": LR_SCHEDULES, "precision": PRECISIONS}

# The range of each number field (of each item, in a tuple): a test and how messages state it.
# T, sample_steps and min_snr_gamma are checked in DiffusionConfig, eval_n in TrainConfig.
_AT_LEAST_0, _AT_LEAST_1 = (lambda v: v >= 0, ">= 0"), (lambda v: v >= 1, ">= 1")
_RANGES = {
    **dict.fromkeys(("image_size", "patch_size", "in_channels", "out_channels", "channels",
                     "channel_mults", "num_res_blocks", "attn_resolutions", "heads", "steps",
                     "batch_size", "grad_accum", "log_every"), _AT_LEAST_1),
    **dict.fromkeys(("num_classes", "num_workers", "warmup", "sample_every", "sample_n",
                     "checkpoint_every", "eval_every"), _AT_LEAST_0),
    "dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "lr": (lambda v: 0 < v < math.inf, "> 0 and finite"),
    "weight_decay": (lambda v: 0 <= v < math.inf, ">= 0 and finite"),
    "grad_clip": (lambda v: v > 0, "> 0 (float('inf') turns clipping off)"),
    "ema_decay": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "label_dropout": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "seed": (lambda v: 0 <= v < 2**64, "in [0, 2**64)"),  # torch.manual_seed's range
}


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


# Each annotation's kind: which values it takes, how they are stored, what messages call it.
_TYPES = {
    "int": (_is_int, int, "an integer"),
    "float": (lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool), float,
              "a number"),
    "bool": (lambda v: isinstance(v, bool), bool, "True or False"),
    "str": (lambda v: isinstance(v, str), str, "a string"),
    "tuple[int, ...]": (lambda v: isinstance(v, (tuple, list)) and all(map(_is_int, v)),
                        lambda v: tuple(map(int, v)), "a tuple of integers"),
}


def _check(section) -> None:
    """Check every field of a config section, converting it in place (an int given for a float,
    a list for a tuple): its type against its annotation, None only where that allows it; then
    its allowed names or its range. A ValueError names the field, the value and what it takes."""
    for f in dataclasses.fields(section):
        kind, _, optional = f.type.partition(" | ")
        accepts, convert, what = _TYPES[kind]
        value = getattr(section, f.name)
        if value is None and optional:
            continue
        if not accepts(value):
            raise ValueError(f"{f.name} must be {what}{' or None' if optional else ''}; got "
                             f"{value!r} ({type(value).__name__})")
        value = convert(value)
        setattr(section, f.name, value)
        if f.name in _CHOICES and value not in _CHOICES[f.name]:
            raise ValueError(f"{f.name} must be one of {', '.join(_CHOICES[f.name])}; got "
                             f"{value!r}")
        test, accepted = _RANGES.get(f.name, (None, ""))
        if test and not all(map(test, value if isinstance(value, tuple) else (value,))):
            what = "integers" if isinstance(value, tuple) else what
            raise ValueError(f"{f.name} must be {what} {accepted}; got {value!r}")


@dataclass
class ModelConfig:
    """The UNet (Ho et al. 2020, Appendix B)."""

    image_size: int = 32  # training resolution; sets where attn_resolutions fall
    patch_size: int = 1  # > 1: the UNet sees patch x patch pixel blocks as channels, at
    #                      image_size / patch_size (pixel unshuffle; Hoogeboom et al. 2023)
    in_channels: int = 3  # 1 for digits, 3 for colour images
    out_channels: int | None = None  # None: same as in_channels (the network predicts eps)
    channels: int = 128  # channels at the first level
    channel_mults: tuple[int, ...] = (1, 2, 2, 2)  # channels of each level, times `channels`
    num_res_blocks: int = 2  # residual blocks per level in the encoder (one more in the decoder)
    attn_resolutions: tuple[int, ...] = (16,)  # resolutions with self-attention
    heads: int = 4  # attention heads
    dropout: float = 0.1  # dropout inside residual blocks
    num_classes: int = 0  # > 0: class-conditional, a label embedding added to the time
    #                       embedding (Ho & Salimans 2022); 0: unconditional

    def __post_init__(self) -> None:
        _check(self)
        if not self.channel_mults:
            raise ValueError("channel_mults must hold one multiplier a level, e.g. (1, 2, 2); "
                             "got ()")
        levels = len(self.channel_mults)
        # patches first, then the UNet halves the resolution between levels
        if self.image_size % (self.patch_size * 2 ** (levels - 1)):
            raise ValueError(f"image_size {self.image_size} is not divisible by "
                             f"{self.patch_size * 2 ** (levels - 1)}, which {levels} "
                             f"channel_mults need" + (f" with patch_size {self.patch_size}"
                                                      if self.patch_size > 1 else ""))
        # each attention layer (at attn_resolutions, and the middle one, after the last level)
        # splits its channels into `heads`
        for level, mult in enumerate(self.channel_mults):
            size = self.image_size // self.patch_size // 2**level
            if ((size in self.attn_resolutions or level == levels - 1)
                    and self.channels * mult % self.heads):
                raise ValueError(f"heads must divide the channels of every attention layer; "
                                 f"{self.channels * mult} channels at resolution {size} do not "
                                 f"split into {self.heads} attention heads")

    @property
    def output_channels(self) -> int:
        """The channels the network outputs: out_channels, or in_channels where that is None."""
        return self.out_channels or self.in_channels


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
        _check(self)
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
    #                     test is the last 50 of each class; a folder: ~10% of files, by name)
    hflip: bool = False  # random horizontal flips, done on the training device
    cache_dir: str = "data/cache"  # image files are decoded once into a uint8 cache here
    num_workers: int = 0  # threads decoding images while the cache is built (0: one a core)

    def __post_init__(self) -> None:
        _check(self)


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
    precision: str = "auto"  # "bf16", "fp16" (loss-scaled) or "fp32"; "auto": resolve_precision
    compile: bool = False  # torch.compile the network (falls back to eager, with a warning)
    channels_last: bool = False  # channels_last memory format: faster where the convolutions
    #                              have channels_last kernels; measure it (docs/speed.md)
    device: str = "auto"  # "auto" (cuda, then mps, then cpu) or a torch device string
    seed: int = 0  # seeds the weights, the data order and the noise
    log_every: int = 100  # steps between loss readings (each one synchronises the device)
    sample_every: int = 5000  # steps between sample grids (0: only at the end)
    sample_n: int = 64  # images in a sample grid (0: no grids)
    checkpoint_every: int = 5000  # steps between checkpoints (0: only at the end)
    eval_every: int = 0  # steps between evaluations of the EMA model (0: never)
    eval_n: int = 500  # samples per evaluation (every metric of `evaluate` but bits/dim)
    out_dir: str = "checkpoints/run"  # checkpoints and sample grids go here
    resume: str | None = None  # a checkpoint to continue from
    overwrite: bool = False  # replace a checkpoint already in out_dir (else a new run is refused)

    def __post_init__(self) -> None:
        _check(self)  # all of it now, not when the run reaches a setting
        if self.eval_every and self.eval_n < 2:
            raise ValueError(f"eval_n must be an integer >= 2 when eval_every > 0; got "
                             f"{self.eval_n}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} does not split into "
                             f"{self.grad_accum} accumulation steps; make it a multiple of "
                             f"{self.grad_accum}")

    def per_process(self, world: int) -> tuple[int, int]:
        """(images per process in a step, images per micro-batch) for `world` processes."""
        if self.batch_size % (world * self.grad_accum):
            raise ValueError(f"batch_size {self.batch_size} does not split into {world} "
                             f"processes x {self.grad_accum} accumulation steps; make it a "
                             f"multiple of {world * self.grad_accum}")
        return self.batch_size // world, self.batch_size // world // self.grad_accum


@dataclass
class Config:
    """Everything a run needs; `override` changes fields by their (unique) names."""

    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def override(self, **changes) -> Config:
        """A copy with fields replaced, e.g. `cfg.override(lr=1e-4, steps=2000)`; text is read
        as the field's type (`parse_field`), as YAML and papermill give it: `lr="1e-4"`."""
        by_section = {f.name: {} for f in dataclasses.fields(self)}
        for name, value in changes.items():
            owner = field_owner(name)
            if owner is None:
                raise ValueError(f"unknown config field {name!r}; fields are: "
                                 f"{', '.join(sorted(all_fields()))}")
            by_section[owner][name] = parse_field(name, value)
        # one replace a section, so fields checked together (T, sample_steps) change together
        return Config(**{k: dataclasses.replace(getattr(self, k), **v)
                         for k, v in by_section.items()})

    def check_dataset(self, n_images: int, classes: list[str] | None) -> None:
        """Check the settings that depend on the dataset: one batch fits in it, and a
        class-conditional model has as many classes as it (`classes`: None without labels)."""
        if n_images < self.train.batch_size:
            raise ValueError(f"the dataset has {n_images} images, fewer than one batch of "
                             f"{self.train.batch_size}; lower batch_size")
        n = self.model.num_classes
        if n and (classes is None or len(classes) != n):
            found = "no labels" if classes is None else f"{len(classes)} classes"
            raise ValueError(f"num_classes={n}, but the dataset has {found}; set num_classes "
                             f"to {0 if classes is None else len(classes)}"
                             + (" (0: unconditional)" if classes is not None else
                                " or use a dataset with labels (see data/README.md)"))

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


def parse_field(name: str, value):
    """The value that text stands for in field `name`, read as the field's annotation: a number,
    true/false/1/0 for a bool, "8,4" for a tuple, "none" for None where the field allows it.
    Anything but text is returned as it is (the field's own check comes later). A ValueError
    starts with the field's name and the text, e.g. "steps '2.5' is not a whole number"."""
    if not isinstance(value, str):
        return value
    kind, _, optional = all_fields()[name].type.partition(" | ")
    text = value.strip()
    if optional and text.lower() == "none":
        return None
    if kind == "str":
        return value
    if kind == "bool":
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"{name} {value!r} is not true or false")
        return text.lower() in ("true", "1")
    if kind == "tuple[int, ...]":
        try:
            return tuple(int(v) for v in text.strip("()[]").split(",") if v.strip())
        except ValueError:
            raise ValueError(f"{name} {value!r} is not a list of integers such as 8,4") from None
    try:
        number = float(text)  # "1e-4", "inf"; for an int field also "1e3"
    except ValueError:
        raise ValueError(f"{name} {value!r} is not {_TYPES[kind][2]}") from None
    if kind == "float":
        return number
    try:
        return int(text)  # exact, however large
    except ValueError:
        if not math.isfinite(number):  # "1e400" reads as inf
            raise ValueError(f"{name} {value!r} is not a finite number") from None
        if not number.is_integer():
            raise ValueError(f"{name} {value!r} is not a whole number") from None
        return int(number)


def overrides_from(value: dict | str | None, name: str = "overrides",
                   example: str = '{"steps": 2000, "lr": 1e-4}') -> dict:
    """A notebook parameter that holds a dict (`overrides`, `evaluation`) as a dict: a dict, or
    its JSON text (`papermill -p overrides '{"steps": 10}'` passes text); None means none."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"{name} {value!r} is not JSON ({e}); write a dict such as "
                             f"{example}") from None
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a dict or its JSON text, such as {example}; got "
                         f"{value!r} ({type(value).__name__})")
    return dict(value)
