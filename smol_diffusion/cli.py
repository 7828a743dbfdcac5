"""The command line, one for everything:

    smol-diffusion train --preset demo [--lr 1e-3 --steps 2000 ...]
    smol-diffusion sample --checkpoint checkpoints/demo/ckpt.pt --n 64 --out grid.png
    smol-diffusion edit --checkpoint checkpoints/demo/ckpt.pt --mask bottom --resample 5
    smol-diffusion evaluate --checkpoint checkpoints/demo/ckpt.pt --n 500
    smol-diffusion export --checkpoint checkpoints/demo/ckpt.pt --out exported/demo
    smol-diffusion icons --size 32  (a colour image folder from Debian's icon theme)

`python -m smol_diffusion ...` is the same, and so is `torchrun ... -m smol_diffusion train ...`.
Each command checks its input and ends with "error: ..." saying how to fix it, not a traceback.
"""
from __future__ import annotations

import argparse
import inspect
import json
import re
import sys
import time
import warnings
from pathlib import Path

import torch

from .checkpoint import class_columns, load_checkpoint, read_checkpoint, stored_config
from .config import (Config, DataConfig, DiffusionConfig, ModelConfig, TrainConfig, all_fields,
                     parse_field)
from .data import held_out, random_images, to_model_range
from .editing import MASKS, named_mask
from .evaluate import (FEATURE_METRICS, METRICS, default_metrics, evaluate, format_table,
                       get_extractor, optional_extractor)
from .export import export_weights
from .files import check_output, shown
from .hardware import PRECISIONS, distributed_env
from .icons import LICENCE, OXYGEN, build_icons
from .images import read_image, read_mask
from .presets import PRESETS, get_preset
from .samplers import SAMPLERS
from .schedule import SPACINGS
from .training import TrainingDiverged, train
from .viz import GRID_SUFFIXES, save_grid

PROG = "smol-diffusion"
METAVARS = {"int": "N", "float": "X", "bool": "BOOL", "str": "TEXT", "tuple[int, ...]": "N,N"}


def field_comments() -> dict[str, str]:
    """Each config field's comment in config.py (continuation lines included), by name: the
    one place a default is explained, shown by `train --help`."""
    comments, name = {}, None
    for section in (ModelConfig, DiffusionConfig, DataConfig, TrainConfig):
        for line in inspect.getsource(section).splitlines():
            field = re.match(r"\s+(\w+): [^=]+=.*?  # (.*)$", line)
            more = re.match(r"\s+#\s+(.*)$", line)
            if field:
                name = field.group(1)
                comments[name] = field.group(2)
            elif more and name:
                comments[name] += " " + more.group(1)
            else:
                name = None
    return comments


def _train_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS),
                        help="the settings to start from (default: demo; with --resume, the "
                             "checkpoint's); the defaults below are the fields' own, which a "
                             "preset changes in part (presets.py)")
    comments = field_comments()
    for name, f in sorted(all_fields().items()):  # a bare bool flag (--compile) means true
        text = f"{comments.get(name, '')} (default {f.default!r})"
        kind = f.type.partition(" | ")[0]
        parser.add_argument(f"--{name}", type=str, default=None, metavar=METAVARS[kind],
                            help=text.replace("%", "%%"),
                            **{"nargs": "?", "const": "true"} if f.type == "bool" else {})


def train_config(args: argparse.Namespace) -> Config:
    """A Config from `--preset NAME` plus `--field value` overrides of any config field.

    With `--resume CKPT` the base is the checkpoint's own config instead, writing to the
    checkpoint's folder: the run goes on as it was, changed only by the flags given."""
    fields = {name: getattr(args, name) for name in all_fields()}
    preset, resume = args.preset, fields["resume"]
    if resume and resume.lower() != "none":
        if preset:
            raise ValueError("--resume goes on with the settings stored in the checkpoint; drop "
                             "--preset (flags given beside --resume still change settings)")
        stored = stored_config(read_checkpoint(resume), resume)
        cfg = stored.override(out_dir=str(Path(resume).parent))
    else:
        cfg = get_preset(preset or "demo")
    changes = {}
    for name, text in fields.items():
        if text is not None:
            try:
                changes[name] = parse_field(name, text)
            except ValueError as e:  # it starts with the field and the text: "steps 'many' is"
                raise SystemExit(f"error: --{e}") from None
    return cfg.override(**changes)  # out of range: a ValueError naming the field


def parse_train(argv: list[str]) -> Config:
    """The Config that `smol-diffusion train ARGV` trains (see `train_config`)."""
    return train_config(_parse(["train", *argv]))


def _error_text(e: Exception) -> str:
    """An error's text for a person: an OSError we raised with errno and a message, without
    its "[Errno 28]"; a system's own (it names the file) as it is."""
    if isinstance(e, OSError) and e.strerror and e.filename is None:
        return e.strerror
    return str(e)


def run_train(args: argparse.Namespace) -> None:
    """Train; exit 130 when interrupted (a checkpoint was written at the step reached)."""
    t0 = time.time()
    try:
        cfg = train_config(args)
        history = train(cfg)
    except (ValueError, OSError, TrainingDiverged) as e:  # the message says how to fix it
        raise SystemExit(f"error: {_error_text(e)}") from None
    except KeyboardInterrupt:  # before training began: nothing to keep
        raise SystemExit(130) from None
    if not history["step"] or history["step"][-1] < cfg.train.steps:  # interrupted, and saved
        raise SystemExit(130)
    if distributed_env()[0] == 0:
        print(f"done: {cfg.train.steps} steps in {time.time() - t0:.0f}s, final loss "
              f"{history['loss'][-1]:.4f}; checkpoint and samples in {cfg.train.out_dir}/")


def _sampling_options(parser: argparse.ArgumentParser, n: int, n_help: str,
                      batch: int) -> None:
    """The options sample and evaluate share: the checkpoint, how many images, how to draw."""
    parser.add_argument("--checkpoint", required=True,
                        help="a ckpt.pt written by training, or an export's folder")
    parser.add_argument("--n", type=int, default=n, help=n_help)
    parser.add_argument("--sampler", default=None, choices=sorted(SAMPLERS),
                        help="default: the checkpoint's")
    parser.add_argument("--steps", type=int, default=None,
                        help="network calls per image, a respacing of the training schedule "
                             "(default: the checkpoint's sample_steps)")
    parser.add_argument("--spacing", default=None, choices=SPACINGS,
                        help="default: the checkpoint's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=batch, help="images per network call")
    parser.add_argument("--device", default="auto")


def _sample_parser(parser: argparse.ArgumentParser) -> None:
    _sampling_options(parser, 64, "number of images", batch=256)
    parser.add_argument("--out", default="samples.png", help="PNG file for the grid")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM's noise (0: deterministic)")
    parser.add_argument("--labels", default=None,
                        help="conditional models: class indices or names, comma-separated, "
                             "repeated over the n images (--labels 7: all sevens)")
    parser.add_argument("--guidance", type=float, default=1.0,
                        help="classifier-free guidance scale (0: unconditional, 1: conditional); "
                             "without --labels each class is asked for in turn")
    parser.add_argument("--precision", default=None, choices=PRECISIONS,
                        help="autocast precision (default: the checkpoint's, as in training)")


def parse_labels(text: str, classes: list[str] | None) -> list[int]:
    """Class indices from "7" or "0,1,2" or class names ("BMW M3 Coupe 2012")."""
    if not classes:
        raise ValueError("--labels needs a class-conditional checkpoint (trained with "
                         "num_classes > 0); this one is unconditional")
    index = {name.lower(): i for i, name in enumerate(classes)}
    wanted = []
    for token in (t.strip() for t in text.split(",") if t.strip()):
        if token.lower() in index:
            wanted.append(index[token.lower()])
        elif token.lstrip("-").isdigit():
            wanted.append(int(token))
        else:
            raise ValueError(f"no class named {token!r}; classes are indices 0..{len(classes) - 1}"
                             f" or names such as {', '.join(classes[:3])}")
    return wanted


def run_sample(args: argparse.Namespace) -> None:
    """Sample a grid of images from a checkpoint into a PNG file."""
    if args.n < 1 or args.batch < 1:
        raise SystemExit("error: --n and --batch must be at least 1")
    try:
        ckpt = load_checkpoint(args.checkpoint, device=args.device)
        check_output(args.out, "--out", suffixes=GRID_SUFFIXES)
    except (ValueError, OSError) as e:  # bad input: the message says how to fix it
        raise SystemExit(f"error: {_error_text(e)}") from None
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    options = {k: v for k, v in [("sampler", args.sampler), ("spacing", args.spacing),
                                 ("eta", args.eta), ("precision", args.precision)] if v}
    if args.guidance != 1.0:
        options["guidance"] = args.guidance
    try:
        labels = parse_labels(args.labels, ckpt.classes) if args.labels else None
        images = ckpt.sample(args.n, batch_size=args.batch, labels=labels, generator=gen,
                             steps=args.steps, progress=True, **options)
    except ValueError as e:  # e.g. eta with a sampler other than DDIM
        raise SystemExit(f"error: {e}") from None
    path = save_grid(images, args.out, None if args.labels else
                     class_columns(args.n, ckpt.config.model.num_classes))
    d = ckpt.config.diffusion
    steps = d.sample_steps if args.steps is None else args.steps
    print(f"{args.n} images, {args.sampler or d.sampler}, {steps} steps, "
          f"{time.time() - t0:.1f}s -> {path}")


def _edit_parser(parser: argparse.ArgumentParser) -> None:
    _sampling_options(parser, 8, "held-out images of the checkpoint's own data to edit, drawn "
                      "at random (without --images)", batch=256)
    parser.add_argument("--images", nargs="+", default=None, help="image files to edit")
    parser.add_argument("--resize", action="store_true", help="centre-crop, resize and convert "
                        "images (and a mask file) of another size or number of channels")
    parser.add_argument("--mask", default=None,
                        help=f"inpaint (RePaint): {', '.join(MASKS)} (the part filled in), or a "
                             "mask file, white where kept and black where filled in")
    parser.add_argument("--strength", type=float, default=None,
                        help="image-to-image (SDEdit): the share of the trajectory re-run, from "
                             "0 (unchanged) to 1 (a new sample)")
    parser.add_argument("--resample", type=int, default=1,
                        help="inpainting: RePaint's resampling (> 1: the ancestral sampler, "
                             "about that many times the network calls)")
    parser.add_argument("--jump_length", type=int, default=10, help="RePaint's jump, in steps")
    parser.add_argument("--labels", default=None, help="conditional models: the class to edit "
                        "towards, or one per image, as sample's --labels")
    parser.add_argument("--guidance", type=float, default=1.0,
                        help="classifier-free guidance scale, with --labels")
    parser.add_argument("--variants", type=int, default=1, help="results per image")
    parser.add_argument("--out", default="edits.png", help="PNG file for the grid")


def run_edit(args: argparse.Namespace) -> None:
    """Inpaint (--mask) or edit (--strength) images with a checkpoint, into one grid: a column
    an image; rows: the inputs, (inpainting) the masked inputs, then --variants results."""
    if (args.mask is None) == (args.strength is None):
        raise SystemExit(f"error: give --mask (inpaint: {', '.join(MASKS)} or a mask file) or "
                         "--strength (image-to-image, 0..1): one of them")
    if min(args.n, args.batch, args.variants) < 1:
        raise SystemExit("error: --n, --batch and --variants must be at least 1")
    t0 = time.time()
    try:
        ckpt = load_checkpoint(args.checkpoint, device=args.device)
        check_output(args.out, "--out", suffixes=GRID_SUFFIXES)
        m = ckpt.config.model
        if args.images:
            images = to_model_range(torch.stack([read_image(p, m.image_size, m.in_channels,
                                                            args.resize) for p in args.images]))
        else:
            images = random_images(held_out(ckpt.config)[1], args.n, args.seed)
        options = {k: v for k, v in [("sampler", args.sampler), ("spacing", args.spacing),
                                     ("steps", args.steps)] if v is not None}
        if args.guidance != 1.0:
            options["guidance"] = args.guidance
        if args.labels:
            options["labels"] = parse_labels(args.labels, ckpt.classes)
        gen, rows = torch.Generator().manual_seed(args.seed), [images]
        if args.mask:
            mask = (read_mask(args.mask, m.image_size, args.resize) if Path(args.mask).is_file()
                    else named_mask(args.mask, m.image_size))
            rows.append(mask * images)  # the part to fill in, mid grey
            rows += [ckpt.inpaint(images, mask, resample=args.resample, batch_size=args.batch,
                                  jump_length=args.jump_length, generator=gen, progress=True,
                                  **options) for _ in range(args.variants)]
        else:
            rows += [ckpt.sdedit(images, args.strength, batch_size=args.batch, generator=gen,
                                 progress=True, **options) for _ in range(args.variants)]
    except (ValueError, OSError) as e:  # the message says how to fix it
        raise SystemExit(f"error: {_error_text(e)}") from None
    path = save_grid(torch.cat(rows), args.out, nrow=len(images))
    what = f"inpainted ({args.mask})" if args.mask else f"edited at strength {args.strength}"
    print(f"{len(images)} image(s) {what}, {args.variants} each, {time.time() - t0:.1f}s -> {path}")


def _evaluate_parser(parser: argparse.ArgumentParser) -> None:
    _sampling_options(parser, 500, "samples to score (bits/dim: --bpd_n)", batch=250)
    parser.add_argument("--metrics", default=None,
                        help=f"comma-separated, from {','.join(METRICS)} (default: all that "
                             "apply; recognisable needs the digits extractor)")
    parser.add_argument("--extractor", choices=["digits", "inception"], default=None,
                        help="default: digits for the embedded digits, else inception")
    parser.add_argument("--inception_weights", default=None,
                        help="path of the FID Inception weights (default: torch hub's cache)")
    parser.add_argument("--bpd_n", type=int, default=500, help="held-out images for bits/dim")
    parser.add_argument("--real", action="store_true",
                        help="score n real training images instead of samples (the floor)")
    parser.add_argument("--guidance", default=None,
                        help="conditional models: comma-separated guidance scales, e.g. 0,1,2,4 "
                             "(default 1); each class is asked for in turn, and class_match "
                             "scored")
    parser.add_argument("--cache_dir", default="data/cache",
                        help="the digit classifier and reference statistics are cached here")
    parser.add_argument("--out", default=None,
                        help="JSON file for the results (default: eval.json beside the "
                             "checkpoint, or in the export's folder)")


def run_evaluate(args: argparse.Namespace) -> None:
    """Every metric of a checkpoint (evaluate.py): a table, a JSON file, and the copies
    picture beside it."""
    if args.bpd_n < 1:
        raise SystemExit(f"error: --bpd_n, the held-out images for bits/dim, must be at least 1; "
                         f"got {args.bpd_n}")
    folder = Path(args.checkpoint) if Path(args.checkpoint).is_dir() else \
        Path(args.checkpoint).parent  # an export's folder, or a ckpt.pt's
    out = Path(args.out or folder / "eval.json")
    picture = out.with_name(f"{out.stem}_copies.png")  # the closest sample/training pairs
    try:
        ckpt = load_checkpoint(args.checkpoint, device=args.device)
        check_output(out, "--out")  # before the evaluation, not after it
        metrics = tuple(m for m in args.metrics.split(",") if m) if args.metrics else None
        wanted = metrics or default_metrics(ckpt.config, args.extractor, args.real)
        if "copies" in wanted:
            check_output(picture, "--out")
        scales = [float(g) for g in args.guidance.split(",")] if args.guidance else [None]
        extractor = args.extractor
        if set(wanted) & set(FEATURE_METRICS):  # one for every scale: it takes seconds to load
            where = (ckpt.config, args.cache_dir, args.inception_weights,
                     next(ckpt.model.parameters()).device)
            extractor = get_extractor(args.extractor, *where) if metrics else \
                optional_extractor(*where, name=args.extractor)
            if extractor is None:  # offline: the defaults go on without FID and KID
                wanted = tuple(m for m in wanted if m not in ("fid", "kid"))
        rows = []
        for j, g in enumerate(scales):  # bits/dim does not depend on the guidance: once
            wanted = tuple(m for m in wanted if m != "bpd" or j == 0)
            if not wanted:  # only bits/dim was asked for, and it is done
                break
            rows += evaluate(
                ckpt, args.n, metrics=wanted,
                extractor=extractor, sampler=args.sampler, steps=args.steps,
                spacing=args.spacing, real=args.real, bpd_n=args.bpd_n, batch_size=args.batch,
                seed=args.seed, cache_dir=args.cache_dir,
                inception_weights=args.inception_weights, guidance=g, progress=True,
                copies_figure=picture if j == 0 else None)
    except (ValueError, OSError) as e:  # bad input: the message says how to fix it
        raise SystemExit(f"error: {_error_text(e)}") from None
    print(format_table(rows))
    try:
        out.write_text(json.dumps({"checkpoint": str(args.checkpoint), "step": ckpt.step,
                                   "results": rows}, indent=1) + "\n")
    except OSError as e:  # the disk filled, say, since it was checked: the table is above
        raise SystemExit(f"error: cannot write {shown(out)} ({e.strerror}); the results are "
                         "in the table above") from None
    print(f"-> {shown(out)}" + (f", {shown(picture)}" if any(r["metric"] == "copies"
                                                            for r in rows) else ""))


def _export_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a ckpt.pt written by training")
    parser.add_argument("--out", required=True, help="the folder to write the export to")
    parser.add_argument("--diffusers", action="store_true",
                        help="also write a diffusers DDPMPipeline (model_index.json, unet/, "
                             "scheduler/) into the folder")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing export")


def run_export(args: argparse.Namespace) -> None:
    """Write a checkpoint's EMA weights as safetensors (and a diffusers pipeline)."""
    out = Path(args.out)
    try:
        ckpt = load_checkpoint(args.checkpoint, device="cpu")
        export_weights(ckpt, out, diffusers=args.diffusers, overwrite=args.overwrite)
    except (ValueError, OSError) as e:  # the message says how to fix it
        raise SystemExit(f"error: {_error_text(e)}") from None
    what = " and a diffusers DDPMPipeline" if args.diffusers else ""
    print(f"exported the EMA weights of step {ckpt.step}{what} to {shown(out)}/")


def _icons_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=None, help="the folder to build (default: "
                        "data/icons<size>, where the icons32 preset looks)")
    parser.add_argument("--size", type=int, default=32, help="width and height in pixels")
    parser.add_argument("--source", default=str(OXYGEN), help="the icon theme's folder")


def run_icons(args: argparse.Namespace) -> None:
    """Build the Oxygen icons into an image folder (icons.py)."""
    out = args.out or f"data/icons{args.size}"
    try:
        n = build_icons(out, args.size, args.source)
    except (ValueError, OSError) as e:  # the message says how to fix it
        raise SystemExit(f"error: {_error_text(e)}") from None
    print(f"{n} icons, {args.size}x{args.size} RGB on white, in {shown(out)}/\n"
          f"licence: {LICENCE}\n"
          f"train on them: {PROG} train --preset icons32 --root {shown(out)}")


COMMANDS = {
    "train": (_train_parser, run_train, "train a DDPM (Ho et al. 2020)"),
    "sample": (_sample_parser, run_sample, "sample a grid of images from a checkpoint"),
    "edit": (_edit_parser, run_edit, "inpaint (RePaint) or edit (SDEdit) images"),
    "evaluate": (_evaluate_parser, run_evaluate, ("FID, KID, recognisability, sliced "
                                                  "Wasserstein, copies and bits/dim")),
    "export": (_export_parser, run_export, "a checkpoint's EMA weights as safetensors, "
                                           "loadable without pickle"),
    "icons": (_icons_parser, run_icons, ("build a colour image folder from the Oxygen icon "
                                         "theme (Debian's oxygen-icon-theme)")),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="A small, readable DDPM: train, "
                                     "sample, evaluate and export. COMMAND --help for each.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (build, _, text) in COMMANDS.items():
        build(commands.add_parser(name, help=text, description=text[0].upper() + text[1:] + "."))
    return parser


def underscored(argv: list[str]) -> list[str]:
    """The options in argv spelled with underscores, as `--help` shows them: every multi-word
    flag takes both spellings (`--cache-dir` and `--cache_dir`, `--out-dir=x` and `--out_dir=x`);
    values are left as they are."""
    return [re.sub(r"^--[^=]+", lambda m: m[0][:2] + m[0][2:].replace("-", "_"), a) for a in argv]


def _parse(argv: list[str]) -> argparse.Namespace:
    return _parser().parse_args(underscored(argv))


def main(argv: list[str] | None = None) -> None:
    """The entry point of `smol-diffusion` and `python -m smol_diffusion`."""
    args = _parse(sys.argv[1:] if argv is None else argv)
    with warnings.catch_warnings():  # "warning: ..." for a person, not a source line
        warnings.showwarning = lambda message, *_, **__: print(f"warning: {message}",
                                                               file=sys.stderr)
        COMMANDS[args.command][1](args)
