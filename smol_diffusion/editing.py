"""Editing real images with a trained model, through `samplers.sample`: inpainting (RePaint,
Lugmayr et al. 2022) and image-to-image (SDEdit, Meng et al. 2022), a class edit when a
conditional model is given another label.

Images are (B, C, H, W) in [-1, 1], the model's size and channels; a mask is 1 where the image
is known (kept) and 0 where the model fills it in, as RePaint's and diffusers' masks are.
"""
from __future__ import annotations

import torch
from torch import nn

from .diffusion import q_sample
from .samplers import randn, sample
from .schedule import NoiseSchedule, spaced_timesteps

# Named masks, by the part of the image the model fills in.
MASKS = ("bottom", "top", "left", "right", "centre")


def named_mask(name: str, size: int) -> torch.Tensor:
    """The mask (1, 1, size, size) that fills in the `name`d part of an image: the bottom, top,
    left or right half, or the centre box of half the side."""
    mask = torch.ones(1, 1, size, size)
    half, quarter = size // 2, size // 4
    parts = {"bottom": (slice(half, None), slice(None)), "top": (slice(None, half), slice(None)),
             "left": (slice(None), slice(None, half)), "right": (slice(None), slice(half, None)),
             "centre": (slice(quarter, size - quarter), slice(quarter, size - quarter))}
    if name not in parts:
        raise ValueError(f"unknown mask {name!r}; choose one of {', '.join(MASKS)}, or give a "
                         "mask image")
    rows, cols = parts[name]
    mask[..., rows, cols] = 0
    return mask


def check_images(images: torch.Tensor, in_channels: int, image_size: int) -> None:
    """A ValueError saying what to change unless `images` are (B, C, H, W) in [-1, 1] of the
    model's channels and size."""
    if images.ndim != 4 or images.shape[0] < 1:
        raise ValueError(f"images must be a batch (B, C, H, W); got shape {tuple(images.shape)}")
    _, c, h, w = images.shape
    if (c, h, w) != (in_channels, image_size, image_size):
        raise ValueError(f"images are {c}x{h}x{w} (channels x height x width) but the model "
                         f"takes {in_channels}x{image_size}x{image_size}: resize them (the "
                         "command line's --resize does)")
    if images.min() < -1 or images.max() > 1:
        raise ValueError(f"images must lie in [-1, 1] (data.to_model_range); got "
                         f"[{images.min():.3g}, {images.max():.3g}]")


def check_mask(mask: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """The mask as a float tensor broadcastable to `images`, or a ValueError: it must be
    (H, W), (1 or B, 1 or C, H, W), of 0s (fill in) and 1s (keep)."""
    mask = torch.as_tensor(mask, dtype=torch.float32, device=images.device)
    mask = mask[None, None] if mask.ndim == 2 else mask
    b, c, h, w = images.shape
    if (mask.ndim != 4 or mask.shape[0] not in (1, b) or mask.shape[1] not in (1, c)
            or mask.shape[2:] != (h, w)):
        raise ValueError(f"the mask has shape {tuple(mask.shape)}; for images {b}x{c}x{h}x{w} "
                         f"it must be {h}x{w}, or (1 or {b}, 1 or {c}, {h}, {w})")
    if not ((mask == 0) | (mask == 1)).all():
        raise ValueError("the mask must hold only 0 (fill in) and 1 (keep); threshold it first")
    return mask


class Pasting(nn.Module):
    """The network, shown the known pixels re-noised to each call's timestep, x_t ~ q(x_t | x_0)
    with fresh noise (RePaint Eq. 8): x_t <- mask x_t(known) + (1 - mask) x_t. Pasted before
    every network call, the sampler's own update carries the rest; batched calls of guidance
    (2B images) see the same known pixels in each half."""

    def __init__(self, model: nn.Module, schedule: NoiseSchedule, known: torch.Tensor,
                 mask: torch.Tensor, generator: torch.Generator | None):
        super().__init__()
        self.model, self.cfg = model, getattr(model, "cfg", None)
        self.schedule = schedule
        self.known, self.mask, self.generator = known, mask, generator

    def forward(self, x: torch.Tensor, t: torch.Tensor,
                y: torch.Tensor | None = None) -> torch.Tensor:
        B = self.known.shape[0]
        noise = randn(self.known.shape, self.generator, x.device)
        known_t = q_sample(self.schedule, self.known, t[:B], noise)
        reps = x.shape[0] // B  # 2 under guidance: conditional and unconditional halves
        mask = self.mask.repeat(reps, 1, 1, 1) if self.mask.shape[0] > 1 else self.mask
        x = mask * known_t.repeat(reps, 1, 1, 1) + (1 - mask) * x
        return self.model(x, t) if y is None else self.model(x, t, y)


def inpaint(model: nn.Module, schedule: NoiseSchedule, images: torch.Tensor, mask: torch.Tensor,
            *, sampler: str = "ddpm", resample: int = 1, jump_length: int = 10,
            generator: torch.Generator | None = None, **kwargs) -> torch.Tensor:
    """Fill in where `mask` is 0, keeping `images` where it is 1 (RePaint, Lugmayr et al. 2022):
    before each network call the known pixels are pasted in at that step's noise level
    (`Pasting`), and the result holds the known pixels exactly.

    `resample` > 1 walks RePaint's schedule with the ancestral sampler: every `jump_length` steps
    it goes back up as many and comes down again, resample - 1 times, so the filled region
    can agree with the known one. It costs steps + (resample - 1) * jump_length * (number of
    jumps) network calls (`samplers.repaint_levels`): 90, 210 and 410 for 50 steps at
    jump_length 10 and resample 2, 5 and 10. With resample 1 any sampler pastes at each of its
    steps; the deterministic ones cannot go back up (DDIM at eta 0 and the DPM-Solvers follow
    the ODE, whose multistep history a jump would break), so resampling is the ancestral
    sampler's. Other keywords go to `samplers.sample` (steps, labels, guidance, precision ...).
    """
    images = images.to(next(model.parameters()).device)
    mask = check_mask(mask, images)
    net = Pasting(model, schedule, images, mask, generator)
    x = sample(net, schedule, tuple(images.shape), sampler=sampler, resample=resample,
               jump_length=jump_length, generator=generator, **kwargs)
    return mask * images + (1 - mask) * x


def sdedit(model: nn.Module, schedule: NoiseSchedule, images: torch.Tensor, strength: float, *,
           steps: int | None = None, spacing: str = "trailing",
           generator: torch.Generator | None = None, **kwargs) -> torch.Tensor:
    """Noise `images` part of the way and denoise them (SDEdit, Meng et al. 2022): of the
    `steps` timesteps `spacing` picks, the last round(strength * steps) are run, from x_t ~
    q(x_t | x_0) at the first of them. Strength 0 returns the images, 1 starts from (nearly)
    pure noise, a new sample; in between the layout survives and the detail is redrawn. With a
    conditional model, `labels` of another class make it a class edit. Other keywords go to
    `samplers.sample` (sampler, labels, guidance, precision ...)."""
    if not 0 <= strength <= 1:
        raise ValueError(f"strength is the share of the trajectory re-run, from 0 to 1; got "
                         f"{strength}")
    ts = spaced_timesteps(schedule.T, schedule.T if steps is None else steps, spacing)
    ts = ts[len(ts) - round(strength * len(ts)):]
    if not ts:
        return images.clone()
    t = torch.full((images.shape[0],), ts[0], device=images.device, dtype=torch.long)
    x_t = q_sample(schedule, images, t, randn(tuple(images.shape), generator, images.device))
    return sample(model, schedule, tuple(images.shape), timesteps=ts, noise=x_t,
                  generator=generator, **kwargs)
