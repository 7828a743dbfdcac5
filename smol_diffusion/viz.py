"""Plotting: image grids, the forward process, the denoising trajectory, the loss curve, and
the notebook's interactive panels for sampling and editing."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from torchvision.utils import make_grid, save_image

from .diffusion import q_sample
from .runlog import read_log
from .samplers import SAMPLERS
from .schedule import NoiseSchedule


# The file types a grid is written as (by Pillow, which reads the type from the suffix).
GRID_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


def to_grid(images: torch.Tensor, nrow: int | None = None) -> torch.Tensor:
    """Images (B, C, H, W) in [-1, 1] as one (C, H', W') grid in [0, 1], `nrow` a row."""
    nrow = nrow or max(1, round(len(images) ** 0.5))
    x = (images.detach().float().cpu().clamp(-1, 1) + 1) / 2
    return make_grid(x, nrow=nrow, padding=1, pad_value=1.0)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Write images in [-1, 1] as one PNG grid; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(to_grid(images, nrow), path)
    return path


def show_grid(images: torch.Tensor, title: str | None = None, nrow: int | None = None,
              ax: plt.Axes | None = None) -> plt.Axes:
    """Draw images in [-1, 1] as a grid on `ax` (a new figure if None)."""
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 6))
    grid = to_grid(images, nrow)
    cmap = "gray" if grid.shape[0] == 1 else None
    ax.imshow(grid[0] if cmap else grid.permute(1, 2, 0), cmap=cmap, vmin=0, vmax=1)
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    return ax


def plot_copies(samples: torch.Tensor, train: torch.Tensor, found: dict,
                k: int = 12) -> plt.Figure:
    """The k samples closest to a training image (top row, each with its distance; red where it
    is a near-copy) above those training images (bottom row): `found` is `metrics.copies`'s
    result for samples and training images (N, C, H, W) in [-1, 1]."""
    order = found["distances"].argsort()[:k]
    fig, axes = plt.subplots(2, len(order), figsize=(1.1 * len(order), 2.6), squeeze=False)
    for j, i in enumerate(order.tolist()):
        d = found["distances"][i].item()
        match = train[found["nearest"][i]]
        match = match.flip(-1) if found["mirrored"][i] else match  # as the sample was compared
        for row, image in enumerate((samples[i], match)):
            ax = axes[row, j]
            ax.imshow(to_grid(image[None]).permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray",
                      vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0, j].set_title(f"{d:.3f}", fontsize=8,
                             color="red" if d < found["threshold"] else "black")
    axes[0, 0].set_ylabel("sample", fontsize=8)
    axes[1, 0].set_ylabel("nearest\ntraining", fontsize=8)
    fig.suptitle(f"closest to training images: {found['value']:.1%} of samples are near-copies "
                 f"(RMS distance < {found['threshold']:.3f}, which {found['real_share']:.1%} of "
                 "held-out images come)", fontsize=8)
    fig.tight_layout()
    return fig


def save_figure(fig: plt.Figure, path: str | Path) -> Path:
    """Write a matplotlib figure as a PNG (its folder made if missing) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def display_inline(path: str | Path) -> None:
    """Show a PNG inline when running inside a Jupyter kernel; do nothing elsewhere."""
    if "ipykernel" in sys.modules:
        from IPython.display import Image, display

        display(Image(filename=str(path)))


def plot_forward_process(x0: torch.Tensor, schedule: NoiseSchedule, timesteps: list[int],
                         generator: torch.Generator | None = None) -> plt.Figure:
    """One image (C, H, W) noised by q(x_t | x_0) at each of `timesteps`, left to right."""
    noise = torch.randn(x0.shape, generator=generator)
    fig, axes = plt.subplots(1, len(timesteps), figsize=(1.6 * len(timesteps), 1.9))
    for ax, t in zip(axes, timesteps):
        xt = q_sample(schedule, x0[None], torch.tensor([t]), noise[None])
        ab = float(schedule.alpha_bar[t])
        show_grid(xt, title=f"t={t}\nᾱ={ab:.3f}", ax=ax)
    fig.tight_layout()
    return fig


def plot_trajectory(frames: list[dict], n_show: int = 8, index: int = 0) -> plt.Figure:
    """x_t (top) and x0_hat (bottom) of image `index` at `n_show` steps of a sampler's run.

    `frames` are the dicts a sampler passes to its callback.
    """
    pick = torch.linspace(0, len(frames) - 1, min(n_show, len(frames))).round().long().tolist()
    fig, axes = plt.subplots(2, len(pick), figsize=(1.6 * len(pick), 3.6), squeeze=False)
    for col, k in enumerate(pick):
        f = frames[k]
        show_grid(f["x"][index:index + 1], title=f"t={f['t']}", ax=axes[0, col])
        show_grid(f["x0_hat"][index:index + 1], ax=axes[1, col])
    axes[0, 0].text(-0.15, 0.5, "x_t", transform=axes[0, 0].transAxes, ha="right")
    axes[1, 0].text(-0.15, 0.5, "x̂_0", transform=axes[1, 0].transAxes, ha="right")
    fig.tight_layout()
    return fig


def plot_loss(run: str | Path | dict, ax: plt.Axes | None = None) -> plt.Axes:
    """The training loss against the step, on a log scale, from a run's folder (or its
    log.jsonl: the whole run, resumes and interrupted runs included) or a history dict."""
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.5))
    if isinstance(run, dict):
        steps, losses = run["step"], run["loss"]
    else:
        rows = read_log(run)["train"]
        steps = [r["step"] for r in rows]
        losses = [math.nan if r["loss"] is None else r["loss"] for r in rows]
    ax.plot(steps, losses)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    return ax


def _widgets(hint: str):
    """ipywidgets, or None after printing that the panel needs it and `hint`, how to do the same
    without it."""
    try:
        import ipywidgets
    except ImportError:
        print(f"the interactive panel needs ipywidgets (pip install ipywidgets); without it: {hint}")
        return None
    return ipywidgets


def _panel(w, controls: dict, actions: dict):
    """Shows `controls` and a button for each of `actions` (a name and a function of the
    controls' values that draws a figure) above the figure the last button pressed drew. Draws
    the first action at once; returns the panel."""
    from IPython.display import display

    for control in controls.values():  # a slider in a row otherwise shrinks to its handle
        control.layout = w.Layout(width="300px", min_width="300px")
    out, buttons = w.Output(), []
    for name, act in actions.items():
        def press(_=None, act=act) -> None:
            with out:
                out.clear_output(wait=True)
                act({name: c.value for name, c in controls.items()})
                plt.show()
        buttons.append(w.Button(description=name, button_style="primary"))
        buttons[-1].on_click(press)
    # the controls wrap onto a second row rather than run off a narrow notebook's right edge
    row = w.HBox(list(controls.values()) + buttons, layout=w.Layout(flex_flow="row wrap"))
    panel = w.VBox([row, out])
    display(panel)
    buttons[0].click()
    return panel


def _class_controls(w, ckpt, none: str | None = None) -> dict:
    """A conditional model's class (with a `none` choice, unconditional, where given) and
    guidance scale controls; none for an unconditional one."""
    if not ckpt.classes:
        return {}
    options = [(name, i) for i, name in enumerate(ckpt.classes)]
    return {"label": w.Dropdown(options=[(none, None)] + options if none else options,
                                description="class"),
            "guidance": w.FloatSlider(value=2.0, min=0.0, max=8.0, step=0.5,
                                      description="guidance")}


def _class_title(ckpt, v: dict) -> str:
    return "" if v.get("label") is None else (f", class {ckpt.classes[v['label']]}, guidance "
                                              f"{v['guidance']:g}")


def explore(ckpt, n: int = 16):
    """An interactive panel in a notebook: the sampler, its steps and the seed (and for a
    class-conditional model the class and the guidance scale), and a Draw button that samples
    `n` images from `ckpt` (a `Checkpoint`) and redraws the grid below. Draws one grid at once.

    Returns the ipywidgets panel. Without ipywidgets, prints how to get it and how to sample
    without it, and returns None."""
    w = _widgets("viz.show_grid(ckpt.sample(16, sampler='ddim', steps=20, "
                 "generator=torch.Generator().manual_seed(0)))")
    if w is None:
        return None
    d = ckpt.config.diffusion
    controls = {"sampler": w.Dropdown(options=list(SAMPLERS), value=d.sampler,
                                      description="sampler"),
                "steps": w.IntSlider(value=d.sample_steps, min=1, max=ckpt.schedule.T,
                                     description="steps"),
                "seed": w.IntText(value=0, description="seed")} | _class_controls(w, ckpt)

    def draw(v: dict) -> None:
        extra = {"labels": [v["label"]], "guidance": v["guidance"]} if ckpt.classes else {}
        x = ckpt.sample(n, sampler=v["sampler"], steps=v["steps"], progress=True,
                        generator=torch.Generator().manual_seed(v["seed"]), **extra)
        show_grid(x, title=f"{v['sampler']}, {v['steps']} steps, seed {v['seed']}"
                  + _class_title(ckpt, v))

    return _panel(w, controls, {"Draw": draw})


def explore_edits(ckpt, images: torch.Tensor):
    """An interactive panel in a notebook for editing `images` (B, C, H, W) in [-1, 1] with
    `ckpt` (a `Checkpoint`): a mask (the part filled in) and RePaint's resampling count for
    the Inpaint button, a strength for the SDEdit button, the seed, and for a conditional model
    a class to steer towards (or none) and the guidance scale. A button redraws the grid below:
    the images, masked and inpainted; or the images above their edits. Inpaints at once.

    Returns the ipywidgets panel. Without ipywidgets, prints how to edit without it and returns
    None."""
    from .editing import MASKS, named_mask

    w = _widgets("viz.show_grid(ckpt.inpaint(images, named_mask('bottom', images.shape[-1]))) "
                 "and viz.show_grid(ckpt.sdedit(images, 0.6)), with named_mask from "
                 "smol_diffusion.editing")
    if w is None:
        return None
    controls = {"mask": w.Dropdown(options=list(MASKS), description="fill in"),
                "resample": w.IntSlider(value=1, min=1, max=10, description="resample"),
                "strength": w.FloatSlider(value=0.6, min=0.0, max=1.0, step=0.05,
                                          description="strength"),
                "seed": w.IntText(value=0, description="seed")} | _class_controls(w, ckpt, "none")

    def steer(v: dict) -> dict:
        return {"generator": torch.Generator().manual_seed(v["seed"]), "progress": True} | (
            {} if v.get("label") is None else {"labels": [v["label"]],
                                               "guidance": v["guidance"]})

    def inpaint(v: dict) -> None:
        mask = named_mask(v["mask"], images.shape[-1])
        x = ckpt.inpaint(images, mask, resample=v["resample"], **steer(v))
        show_grid(torch.cat([images, mask * images, x]), nrow=len(images),
                  title=f"{v['mask']} filled in, resample {v['resample']}, seed {v['seed']}"
                  + _class_title(ckpt, v))

    def sdedit(v: dict) -> None:
        x = ckpt.sdedit(images, v["strength"], **steer(v))
        show_grid(torch.cat([images, x]), nrow=len(images),
                  title=f"SDEdit, strength {v['strength']:g}, seed {v['seed']}"
                  + _class_title(ckpt, v))

    return _panel(w, controls, {"Inpaint": inpaint, "SDEdit": sdedit})
