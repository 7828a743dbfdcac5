"""Checkpoints: written atomically, loaded safely (a training checkpoint, or an export of one:
export.py writes those), able to rebuild their own model."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors

from .config import Config, DiffusionConfig, ModelConfig
from .editing import check_images, check_mask, inpaint, sdedit
from .files import shown, write_temp
from .hardware import pick_device
from .samplers import sample
from .schedule import NoiseSchedule
from .unet import UNet

REQUIRED_KEYS = ("model", "ema", "optimizer", "step", "config")
# An export (export.py): the EMA weights as safetensors and the rest as JSON, in one folder.
WEIGHTS, CONFIG = "model.safetensors", "config.json"
FORMAT, VERSION = "smol_diffusion.export", 1
HOW = "smol-diffusion export --checkpoint CKPT --out FOLDER"


def requested_labels(n: int, num_classes: int,
                     labels: torch.Tensor | list[int] | None = None) -> torch.Tensor:
    """The classes n images of a conditional model are asked for, in order: `labels` repeated
    in turn ([7]: all sevens), by default each class in turn, 0, 1, ..., K-1, 0, 1, ... The one
    rule for it: a grid's columns (`class_columns`), batches (`Checkpoint.sample`) and
    class_match (evaluate.py) all follow it."""
    if labels is None:
        return torch.arange(n) % num_classes
    labels = torch.as_tensor(labels, dtype=torch.long).flatten()
    if not 0 < len(labels) <= n:
        raise ValueError(f"{len(labels)} labels for {n} images; give at most one per image "
                         "(fewer are repeated in turn)")
    return labels.repeat(-(-n // len(labels)))[:n]


def class_columns(n: int, num_classes: int) -> int | None:
    """Grid columns for n images drawn class by class (`requested_labels`): one a class, so that
    column k holds class k, where a row holds them all; None (a square grid) otherwise."""
    return num_classes if 0 < num_classes <= n else None


def save_checkpoint(path: str | Path, state: dict) -> None:
    """Write `state` to `path` through a temporary file and a rename.

    The rename is atomic, so a crash mid-write leaves the previous checkpoint (or nothing),
    never half of one. Weights that are not finite are refused: they would replace a good
    checkpoint with one that samples blank images. A full disk is said as such, with the space
    needed and free; temporary files that killed saves left beside `path` are removed first
    (one live run per folder: see `files.lock_folder`).
    """
    path = Path(path)
    check_finite(state, path, "refusing to write")
    # pickle's share on top of the weights' bytes, for the out-of-space message
    tmp = write_temp(path, lambda f: torch.save(state, f), "checkpoint",
                     lambda: sum(t.nbytes for t in _tensors(state)) + 2**20)
    try:
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _tensors(obj):
    """Every tensor in a nest of dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def check_finite(state: dict, path: str | Path, doing: str) -> None:
    """Raise if the model or EMA weights in `state` hold NaN or infinity, naming the file and
    the first such tensor: a run that diverged, or a file that rotted."""
    weights = {(part, name): t for part in ("model", "ema")
               for name, t in state.get(part, {}).items() if t.is_floating_point()}
    if not weights or torch.stack([torch.isfinite(t).all() for t in weights.values()]).all():
        return  # one synchronisation for all of them
    part, name = next(k for k, t in weights.items() if not torch.isfinite(t).all())
    raise ValueError(f"{doing} {shown(path)}: its {part} weight {name} holds NaN or infinite "
                     "values (a diverged run?). Resume from an earlier checkpoint with a lower "
                     "lr, or train anew")


def read_checkpoint(path: str | Path) -> dict:
    """The raw checkpoint dict, loaded with `weights_only=True` and checked for its keys."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"could not read checkpoint {path}: {e}") from e
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        found = sorted(state)[:8] if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path} is not a smol_diffusion checkpoint: it needs the keys "
                         f"{', '.join(REQUIRED_KEYS)}, found {found}")
    check_finite(state, path, "refusing to load")
    return state


def check_out_dir(cfg: Config) -> dict | None:
    """Before any work, what out_dir's checkpoint means for this run: None where the run may go
    ahead (no checkpoint there, a resume of that one, or `overwrite`); the checkpoint's state
    where it holds this very run, finished (the same settings, `changed_fields`, and at least
    `steps` steps): there is nothing to train. Anything else would replace a checkpoint this run
    does not continue, and is refused with a ValueError that says how to go on from it."""
    tc = cfg.train
    ours = Path(tc.out_dir) / "ckpt.pt"  # what this run writes
    if not ours.is_file() or tc.overwrite:
        return None
    if tc.resume:
        if Path(tc.resume).is_file() and not ours.samefile(tc.resume):
            beside = Path(tc.resume).parent
            there = "" if beside.resolve() == ours.parent.resolve() else f" ({beside}: beside it)"
            raise ValueError(f"resuming {tc.resume} would overwrite {shown(ours)}, another "
                             f"checkpoint; move that one away, or set out_dir to another "
                             f"folder{there}")
        return None
    fresh = "start a new run in another --out_dir, or --overwrite true replaces it"
    try:
        state = read_checkpoint(ours)
        changed = changed_fields(stored_config(state, ours), cfg)
    except ValueError as e:
        raise ValueError(f"{shown(ours)} already holds a checkpoint, which this new run would "
                         f"replace, and it cannot be read ({e}); {fresh}") from None
    step, resume = int(state["step"]), f"--resume {shown(ours)} (resume='{shown(ours)}')"
    if not changed and step >= tc.steps:
        return state
    if not changed:
        raise ValueError(f"{shown(ours)} holds this run, stopped at step {step} of {tc.steps}; "
                         f"continue it with {resume}, or {fresh}")
    differ = ", ".join(f"{k}: {a!r} there, {b!r} here" for k, (a, b) in changed.items())
    if any(k in OBJECTIVE_FIELDS or k in _MODEL_FIELDS for k in changed):  # check_same_model
        raise ValueError(f"{shown(ours)} already holds a checkpoint of another model or task "
                         f"({differ}), which this new run would replace; {fresh}")
    raise ValueError(f"{shown(ours)} already holds a checkpoint with other settings ({differ}, "
                     f"at step {step}), which this new run would replace; go on from it with "
                     f"these settings with {resume}, or {fresh}")


# Where a run writes and whether it starts anew: they say nothing of what it trains.
RUN_FIELDS = ("out_dir", "resume", "overwrite")


def changed_fields(stored: Config, cfg: Config) -> dict[str, tuple]:
    """{field: (stored value, cfg's value)} for each setting, but RUN_FIELDS, that differs."""
    def flat(c: Config) -> dict:
        return {k: v for section in dataclasses.asdict(c).values() for k, v in section.items()}

    a, b = flat(stored), flat(cfg)
    return {k: (a[k], b[k]) for k in b if k not in RUN_FIELDS and a[k] != b[k]}


# The diffusion fields that define what the network learns (the forward process and the
# target); the loss weighting (min_snr_gamma) and the sampling ones may change.
OBJECTIVE_FIELDS = ("T", "schedule", "zero_terminal_snr", "prediction")
_MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig))


def check_same_model(state: dict, cfg: Config, path: str | Path) -> None:
    """Raise if the checkpoint's model config, or the diffusion fields it was trained for
    (OBJECTIVE_FIELDS), differ from `cfg`, naming the fields: resuming would silently train
    another network or another task. A field an older checkpoint lacks counts as its default
    (what that version used)."""
    for section, default, fields, what in (
            ("model", ModelConfig(), None, "holds another architecture"),
            ("diffusion", DiffusionConfig(), OBJECTIVE_FIELDS, "was trained for another task")):
        stored = dataclasses.asdict(default) | state["config"].get(section, {})
        wanted = dataclasses.asdict(getattr(cfg, section))
        for d in (stored, wanted) if section == "model" else ():  # None: as many as come in
            d["out_channels"] = ModelConfig(in_channels=d["in_channels"],
                                            out_channels=d["out_channels"]).output_channels
        diff = {k: (stored.get(k), v) for k, v in wanted.items()
                if (fields is None or k in fields) and stored.get(k) != v}
        if diff:
            lines = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}"
                              for k, (a, b) in diff.items())
            raise ValueError(f"checkpoint {path} {what} ({lines}); resume with the "
                             "checkpoint's own settings or start a new run")


def load_weights(model: torch.nn.Module, weights: dict, path: str | Path) -> None:
    """`model.load_state_dict(weights)` with an error that names the checkpoint."""
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise ValueError(f"the weights in {path} do not fit the model its config describes "
                         f"(was it written by another version?): {e}") from e


def resume_from(path: str | Path, cfg: Config, model: torch.nn.Module, ema: torch.nn.Module,
                opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> tuple[int, dict]:
    """Load the training state at `path` into `model`, `ema`, `opt` and (fp16) `scaler` after
    checking it is the same model and task (`check_same_model`); returns (step, history). The
    optimizer keeps `cfg`'s weight decay (the learning rate is set every step)."""
    state = read_checkpoint(path)
    check_same_model(state, cfg, path)
    load_weights(model, state["model"], path)
    load_weights(ema, state["ema"], path)
    opt.load_state_dict(state["optimizer"])
    for group in opt.param_groups:
        group["weight_decay"] = cfg.train.weight_decay
    if scaler.is_enabled() and state.get("scaler"):  # fp16 goes on at its own scale
        scaler.load_state_dict(state["scaler"])
    return int(state["step"]), state.get("history", {})


@dataclass
class Checkpoint:
    """A loaded checkpoint: the EMA model in eval mode, its schedule, config and step, and for
    a class-conditional model the names of its classes."""

    model: UNet
    schedule: NoiseSchedule
    config: Config
    step: int
    history: dict
    classes: list[str] | None = None

    def sample(self, n: int, *, generator: torch.Generator | None = None,
               steps: int | None = None, batch_size: int | None = None,
               labels: torch.Tensor | list[int] | None = None, **kwargs) -> torch.Tensor:
        """n images (n, C, H, W) in [-1, 1] from the EMA model, `batch_size` at a time (default:
        all at once). The sampler, steps, spacing, variance and prediction default to the
        config's, and so does the precision (the one training used: `autocast_dtype`); other
        keywords go to `smol_diffusion.sample` (`guidance=` for a conditional model, `noise=`,
        `progress=True` for a progress bar). A conditional model is asked for `labels` repeated
        in turn, by default each class in turn, over all n images whatever the batches
        (`requested_labels`; `guidance=0` for unconditional samples)."""
        m, d = self.config.model, self.config.diffusion
        if m.num_classes or labels is not None:  # unconditional with labels: sample() says why
            labels = requested_labels(n, m.num_classes, labels)
        if batch_size and batch_size < n:  # each batch its share of the labels and x_T
            noise = kwargs.pop("noise", None)
            return torch.cat([self.sample(
                min(batch_size, n - i), generator=generator, steps=steps, **kwargs,
                **{k: v[i:i + batch_size] for k, v in (("labels", labels), ("noise", noise))
                   if v is not None}) for i in range(0, n, batch_size)])
        if kwargs.get("timesteps") is None and steps is None:
            steps = d.sample_steps
        return sample(self.model, self.schedule, (n, m.in_channels, m.image_size, m.image_size),
                      steps=steps, generator=generator, labels=labels, **self._defaults(kwargs))

    def inpaint(self, images: torch.Tensor, mask: torch.Tensor, *, resample: int = 1,
                batch_size: int | None = None, **kwargs) -> torch.Tensor:
        """`editing.inpaint` with the EMA model: `images` (B, C, H, W) in [-1, 1] kept where
        `mask` is 1 and filled in where it is 0 (RePaint). Defaults as `sample`'s, but with
        `resample` > 1 the ancestral sampler, which resampling needs. A conditional model
        fills in unconditionally unless given `labels` (one per image, or repeated in turn)."""
        if resample > 1:  # else the config's sampler, as `_defaults` gives every edit
            kwargs.setdefault("sampler", "ddpm")
        return self._edit(inpaint, images, batch_size, kwargs, mask=mask, resample=resample)

    def sdedit(self, images: torch.Tensor, strength: float, *, batch_size: int | None = None,
               **kwargs) -> torch.Tensor:
        """`editing.sdedit` with the EMA model: `images` (B, C, H, W) in [-1, 1] noised to
        `strength` (0..1 of the trajectory) and denoised; with a conditional model and `labels`
        of another class, a class edit. Defaults as `sample`'s."""
        return self._edit(sdedit, images, batch_size, kwargs, strength=strength)

    def _edit(self, edit, images: torch.Tensor, batch_size: int | None, kwargs: dict,
              **args) -> torch.Tensor:
        """`edit(model, schedule, images, ...)` over batches of `batch_size` images, each with
        its share of the labels and of a per-image mask."""
        m = self.config.model
        check_images(images, m.in_channels, m.image_size)
        kwargs = self._defaults(kwargs)
        kwargs.setdefault("steps", self.config.diffusion.sample_steps)
        n, batch_size = len(images), batch_size or len(images)
        if kwargs.get("labels") is not None:
            kwargs["labels"] = requested_labels(n, m.num_classes, kwargs["labels"])
        mask = args.get("mask")
        if mask is not None:
            args["mask"] = check_mask(mask, images)
        out = []
        for i in range(0, n, batch_size):
            part = {k: v[i:i + batch_size] if torch.is_tensor(v) and v.ndim and len(v) == n
                    else v for k, v in (kwargs | args).items() if k != "generator"}
            out.append(edit(self.model, self.schedule, images[i:i + batch_size], **part,
                            generator=kwargs.get("generator")))
        return torch.cat(out)

    def _defaults(self, kwargs: dict) -> dict:
        """Sampling keywords with the config's sampler, spacing, variance, prediction and
        precision (the one training used) where not given."""
        d = self.config.diffusion
        kwargs = {name: getattr(d, name) for name in ("sampler", "spacing", "variance",
                                                      "prediction")} | kwargs
        return {"precision": self.config.train.precision} | kwargs


def stored_config(state: dict, path: str | Path) -> Config:
    """The config a checkpoint stores, with an error that names the file."""
    try:
        return Config.from_dict(state["config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"the settings stored in {shown(path)} are not valid for this version "
                         f"of smol_diffusion ({e}); train anew, or use the version that wrote "
                         "it") from None


def load_checkpoint(path: str | Path, device: str | torch.device = "auto") -> Checkpoint:
    """Load a checkpoint written by `train`, or an export of one (`export.export_weights`: its
    folder, or the model.safetensors in it), and rebuild its EMA model from the stored config.
    An export has no training history (`history` is {})."""
    path = Path(path)
    if path.is_dir() or path.suffix == ".safetensors":  # an export: safetensors and JSON only
        state, path = read_export(path)  # later errors name the weights file
    else:
        state = read_checkpoint(path)
    cfg = stored_config(state, path)
    model = UNet(cfg.model)
    load_weights(model, state["ema"], path)
    model.to(pick_device(device) if isinstance(device, str) else device).eval()
    schedule = NoiseSchedule.from_name(cfg.diffusion.schedule, cfg.diffusion.T,
                                       cfg.diffusion.zero_terminal_snr)
    return Checkpoint(model, schedule, cfg, int(state["step"]), state.get("history", {}),
                      state.get("classes"))


def read_export(path: str | Path) -> tuple[dict, Path]:
    """The state of an export (its folder, or its model.safetensors) shaped like a checkpoint's
    (`ema`, `config`, `step`, `classes`), and its weights file, which later errors name. No
    pickle is read: the weights are safetensors, the rest JSON."""
    path = Path(path)
    weights = path if path.suffix == ".safetensors" else path / WEIGHTS
    config = weights.parent / CONFIG
    if not weights.is_file():
        hint = ""
        if (path / "ckpt.pt").is_file():
            hint = f"; it holds {shown(path / 'ckpt.pt')}, a training checkpoint: load that"
        raise FileNotFoundError(f"no exported weights at {shown(weights)}{hint}; an export is a "
                                f"folder holding {WEIGHTS} and {CONFIG}, written by {HOW}")
    if not config.is_file():
        raise FileNotFoundError(f"no {CONFIG} beside {shown(weights)}: it holds the model's "
                                f"settings, without which the weights cannot be used; export "
                                f"the checkpoint again ({HOW})")
    try:
        meta = json.loads(config.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise ValueError(f"could not read {shown(config)}: {e}; export the checkpoint again "
                         f"({HOW})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        diffusers = isinstance(meta, dict) and "_class_name" in meta
        what = " (a diffusers one: load it with diffusers)" if diffusers else ""
        raise ValueError(f"{shown(config)} is not a smol_diffusion export's config{what}; "
                         f"export a checkpoint with {HOW}")
    if meta.get("version") != VERSION:
        raise ValueError(f"{shown(config)} is export version {meta.get('version')!r}, and this "
                         f"smol_diffusion reads version {VERSION}; use the version that wrote it")
    data = weights.read_bytes()
    if hashlib.sha256(data).hexdigest() != meta.get("weights_sha256"):
        raise ValueError(f"{shown(weights)} is not the file {shown(config)} was written with "
                         "(changed since, damaged, or an export interrupted while replacing "
                         f"it); export the checkpoint again ({HOW})")
    try:
        ema = load_safetensors(data)
    except Exception as e:  # safetensors' own error type varies between its releases
        raise ValueError(f"could not read {shown(weights)}: {e}") from None
    state = {"ema": ema, "config": meta.get("config"), "step": meta.get("step", 0),
             "classes": meta.get("classes")}
    check_finite(state, weights, "refusing to load")
    stored_config(state, config)  # a config this version cannot build: the error names the file
    return state, weights
