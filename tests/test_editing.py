"""Inpainting (RePaint) and image-to-image (SDEdit) with exact denoisers, whose answers are
known: a Gaussian's, where no pixel says anything of another, and that of flat images (every
pixel one value c ~ N(0, s^2)), where the known half says exactly what the other half is."""
import math
import re
from types import SimpleNamespace

import pytest
import torch
from conftest import GaussianDenoiser
from torch import nn

from smol_diffusion import NoiseSchedule
from smol_diffusion.diffusion import target
from smol_diffusion.editing import MASKS, check_images, inpaint, named_mask, sdedit
from smol_diffusion.samplers import SAMPLERS, repaint_calls, repaint_levels


class FlatDenoiser(nn.Module):
    """The exact denoiser of flat images x0 = c * 1, c ~ N(0, s^2), over D pixels: given x_t =
    alpha c 1 + sigma eps, c's posterior mean is (alpha / sigma^2) sum(x_t) / (1 / s^2 +
    D alpha^2 / sigma^2). `num_classes` > 0 gives it (ignored) labels, to be guided."""

    def __init__(self, schedule: NoiseSchedule, s: float, num_classes: int = 0):
        super().__init__()
        self.register_buffer("alpha_bar", schedule.alpha_bar.float())
        self.s, self.cfg = s, SimpleNamespace(num_classes=num_classes)
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x, t, y=None):
        ab = self.alpha_bar[t].view(-1, 1, 1, 1)
        alpha, sigma = ab.sqrt(), (1 - ab).sqrt()
        D = x[0].numel()
        c = (alpha / sigma**2 * x.sum(dim=(1, 2, 3), keepdim=True)
             / (1 / self.s**2 + D * alpha**2 / sigma**2))
        x0 = c.expand_as(x)
        return target(x0, (x - alpha * x0) / sigma, alpha, sigma, "eps")


def flat(n: int, size: int = 8, seed: int = 0) -> torch.Tensor:
    c = 0.5 * torch.randn(n, 1, 1, 1, generator=torch.Generator().manual_seed(seed))
    return c.clamp(-0.95, 0.95).expand(n, 3, size, size).clone()


def seeded(seed: int = 0) -> dict:
    return {"generator": torch.Generator().manual_seed(seed)}


def fill_error(out: torch.Tensor, images: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean absolute error of the filled-in pixels."""
    hole = (1 - mask).expand_as(images).bool()
    return (out - images)[hole].abs().mean().item()


@pytest.mark.parametrize("name", MASKS)
def test_named_masks_fill_what_they_say(name):
    mask = named_mask(name, 8)[0, 0]
    filled = {"bottom": mask[4:], "top": mask[:4], "left": mask[:, :4], "right": mask[:, 4:],
              "centre": mask[2:6, 2:6]}[name]
    assert (filled == 0).all() and mask.sum() == 64 - filled.numel()
    with pytest.raises(ValueError, match="unknown mask 'middle'; choose one of bottom"):
        named_mask("middle", 8)


def test_repaint_levels_jump_back_and_count_their_calls():
    assert repaint_levels(5) == [4, 3, 2, 1, 0, -1]
    levels = repaint_levels(12, jump_length=5, resample=3)
    assert levels[:9] == [11, 10, 9, 8, 7, 6, 5, 4, 9]  # called at level 5, back up to 9
    assert levels[-6:] == [4, 3, 2, 1, 0, -1] and levels.count(-1) == 3
    assert [repaint_calls(50, 10, r) for r in (1, 2, 5, 10)] == [50, 90, 210, 410]
    with pytest.raises(ValueError, match="needs more steps than that; got 10"):
        repaint_levels(10, jump_length=10, resample=2)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_inpainting_keeps_the_known_pixels_exactly_and_fills_the_rest(sampler):
    schedule = NoiseSchedule.linear(1000)
    model = FlatDenoiser(schedule, 0.5)
    images, mask = flat(64), named_mask("bottom", 8)
    out = inpaint(model, schedule, images, mask, sampler=sampler, steps=20, **seeded())
    assert torch.equal(out[..., :4, :], images[..., :4, :])  # kept, pixel for pixel
    # the known half says what the other is: filled close to it, where a sample of the model
    # (another c) is 0.5 away on average
    assert fill_error(out, images, mask) < 0.1
    free = sample_like(model, schedule, images)
    assert fill_error(free, images, mask) > 0.25


def sample_like(model, schedule, images):
    from smol_diffusion import sample
    return sample(model, schedule, tuple(images.shape), steps=20, **seeded())


def test_resampling_harmonises_the_filled_region():
    """With 5 steps and no resampling the filled half lags the known one; RePaint's jumps back
    give it the time to agree (Lugmayr et al., Fig. 3)."""
    schedule = NoiseSchedule.linear(1000)
    model = FlatDenoiser(schedule, 0.5)
    images, mask = flat(256), named_mask("right", 8)
    errors = [fill_error(inpaint(model, schedule, images, mask, steps=6, resample=r,
                                 jump_length=2, **seeded()), images, mask) for r in (1, 5)]
    assert errors[1] < 0.7 * errors[0]


def test_inpainting_where_pixels_are_independent_draws_the_data_distribution():
    """A Gaussian's pixels say nothing of each other: the filled pixels are N(0, sigma_d^2)
    whatever the known ones are, and the mask may differ per image and channel."""
    schedule = NoiseSchedule.cosine(1000)
    model = GaussianDenoiser(schedule, 0.5)
    images = torch.full((512, 2, 4, 4), 0.9)
    mask = (torch.rand(512, 2, 4, 4, generator=torch.Generator().manual_seed(1)) < 0.5).float()
    out = inpaint(model, schedule, images, mask, clip=False, **seeded())  # all 1,000 steps
    assert torch.equal(out[mask == 1], images[mask == 1])
    hole = out[mask == 0]
    assert abs(hole.mean().item()) < 0.03 and hole.std().item() == pytest.approx(0.5, rel=0.05)


def test_inpainting_a_conditional_model_under_guidance():
    schedule = NoiseSchedule.linear(1000)
    model = FlatDenoiser(schedule, 0.5, num_classes=3)
    images, mask = flat(16), named_mask("centre", 8)
    out = inpaint(model, schedule, images, mask, steps=10, labels=[2] * 16, guidance=3.0,
                  **seeded())
    assert torch.equal(out * mask, images * mask) and fill_error(out, images, mask) < 0.1
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\]"):
        inpaint(model, schedule, images, mask, steps=10, labels=[3] * 16)


def test_inpainting_refuses_a_bad_mask_or_resampling_it_cannot_do():
    schedule = NoiseSchedule.linear(1000)
    model, images = FlatDenoiser(schedule, 0.5), flat(4)
    with pytest.raises(ValueError, match="the mask has shape \\(1, 1, 4, 4\\); for images "
                                         "4x3x8x8 it must be 8x8"):
        inpaint(model, schedule, images, torch.ones(1, 1, 4, 4), steps=5)
    with pytest.raises(ValueError, match="only 0 \\(fill in\\) and 1 \\(keep\\)"):
        inpaint(model, schedule, images, torch.full((8, 8), 0.5), steps=5)
    with pytest.raises(ValueError, match="only the ancestral sampler's steps allow; use "
                                         "sampler='ddpm', or resample=1 with ddim"):
        inpaint(model, schedule, images, named_mask("left", 8), sampler="ddim", steps=20,
                resample=3)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_sdedit_of_gaussian_data_keeps_what_the_closed_form_says(sampler):
    """From x_t = alpha x + sigma z, the exact ancestral chain draws from p(x0 | x_t), whose
    correlation with x is ab s^2 / (ab s^2 + 1 - ab) (ab = alpha_bar_t, s the data's std); DDIM's
    ODE maps x_t to x_t s / sqrt(ab s^2 + 1 - ab), correlated with x as the square root of that.
    Strength 0 is the input itself, 1 a new sample (correlation 0); the variance stays s^2."""
    schedule = NoiseSchedule.cosine(1000)
    model, s = GaussianDenoiser(schedule, 0.5), 0.5
    images = s * torch.randn(2048, 1, 2, 2, generator=torch.Generator().manual_seed(3))
    assert torch.equal(sdedit(model, schedule, images, 0.0), images)
    for strength in (0.2, 0.5, 0.8, 1.0):
        out = sdedit(model, schedule, images, strength, sampler=sampler, clip=False, **seeded())
        ab = schedule.alpha_bar[round(strength * 1000) - 1].item()
        expected = ab * s**2 / (ab * s**2 + 1 - ab)
        expected = expected if sampler == "ddpm" else math.sqrt(expected)
        corr = torch.corrcoef(torch.stack([images.flatten(), out.flatten()]))[0, 1].item()
        assert corr == pytest.approx(expected, abs=0.03), strength
        assert out.std().item() == pytest.approx(s, rel=0.05)


def test_sdedit_runs_its_share_of_the_steps():
    schedule = NoiseSchedule.linear(1000)
    model, images = GaussianDenoiser(schedule, 0.5), torch.zeros(2, 1, 4, 4)
    sdedit(model, schedule, images, 0.3, steps=10, sampler="ddim")
    assert model.seen == [299, 199, 99]  # trailing spacing's last 3 of 10
    for s in (-0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match="strength is the share of the trajectory"):
            sdedit(model, schedule, images, s, steps=10)


def test_images_of_another_size_range_or_shape_are_refused():
    check_images(torch.zeros(2, 3, 8, 8), 3, 8)
    with pytest.raises(ValueError, match="images are 1x8x8 .* takes 3x8x8: resize them"):
        check_images(torch.zeros(2, 1, 8, 8), 3, 8)
    with pytest.raises(ValueError, match="images are 3x16x16 .* takes 3x8x8"):
        check_images(torch.zeros(2, 3, 16, 16), 3, 8)
    with pytest.raises(ValueError, match="must lie in \\[-1, 1\\]"):
        check_images(torch.full((2, 3, 8, 8), 2.0), 3, 8)
    with pytest.raises(ValueError, match="must be a batch"):
        check_images(torch.zeros(3, 8, 8), 3, 8)


def test_a_checkpoint_edits_in_batches_with_its_own_settings(tiny_cfg):
    import smol_diffusion
    from smol_diffusion.data import held_out

    cfg = tiny_cfg.override(num_classes=10, steps=4, sample_every=0, checkpoint_every=0,
                            sample_steps=4)
    smol_diffusion.train(cfg, progress=False)
    ckpt = smol_diffusion.load_checkpoint(f"{cfg.train.out_dir}/ckpt.pt", device="cpu")
    _, data = held_out(cfg)
    images = torch.stack([data[i] for i in range(5)])
    mask = named_mask("bottom", 8)
    whole = ckpt.inpaint(images, mask, **seeded())
    assert torch.equal(whole[..., :4, :], images[..., :4, :])
    assert not torch.equal(whole[..., 4:, :], images[..., 4:, :])
    # batches of 2 with labels repeated in turn and a mask per image, RePaint's resampling
    masks = mask.repeat(5, 1, 1, 1)
    masks[0] = 1  # nothing to fill in the first image
    out = ckpt.inpaint(images, masks, labels=[3, 8], guidance=2.0, resample=2, jump_length=2,
                       batch_size=2, **seeded())
    assert out.shape == images.shape and torch.equal(out[0], images[0])
    assert torch.equal(ckpt.sdedit(images, 0.0), images)
    edited = ckpt.sdedit(images, 0.6, labels=[8], guidance=2.0, batch_size=3, **seeded())
    assert edited.shape == images.shape and not torch.equal(edited, images)
    with pytest.raises(ValueError, match="images are 3x8x8 .* takes 1x8x8"):
        ckpt.sdedit(images.repeat(1, 3, 1, 1), 0.5)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 9\]"):
        ckpt.sdedit(images, 0.5, labels=[10])


def test_cli_edit_writes_a_grid_and_refuses_bad_input_writing_nothing(tiny_cfg, tmp_path,
                                                                      capsys):
    from PIL import Image

    import smol_diffusion
    from smol_diffusion.cli import main

    cfg = tiny_cfg.override(num_classes=10, steps=2, sample_every=0, checkpoint_every=0,
                            sample_steps=4)
    smol_diffusion.train(cfg, progress=False)
    ckpt = f"{cfg.train.out_dir}/ckpt.pt"
    Image.new("L", (8, 8), 200).save(tmp_path / "a.png")
    Image.new("RGB", (20, 16), (10, 200, 30)).save(tmp_path / "big.png")
    m = Image.new("L", (8, 8), 255)
    m.paste(0, (0, 4, 8, 8))
    m.save(tmp_path / "mask.png")
    out = tmp_path / "edits.png"
    main(["edit", "--checkpoint", ckpt, "--n", "3", "--mask", "bottom", "--resample", "2",
          "--jump_length", "2", "--variants", "2", "--out", str(out)])
    assert Image.open(out).size == (3 * 9 + 1, 4 * 9 + 1)  # inputs, masked, 2 results
    assert "3 image(s) inpainted (bottom), 2 each" in capsys.readouterr().out
    main(["edit", "--checkpoint", ckpt, "--images", str(tmp_path / "a.png"),
          str(tmp_path / "big.png"), "--resize", "--mask", str(tmp_path / "mask.png"),
          "--out", str(out)])
    main(["edit", "--checkpoint", ckpt, "--images", str(tmp_path / "a.png"), "--strength", "0.5",
          "--labels", "8", "--guidance", "2", "--out", str(out)])
    assert Image.open(out).size == (1 * 9 + 1, 2 * 9 + 1)
    out.unlink()
    Image.new("L", (8, 8), 128).save(tmp_path / "grey.png")
    Image.new("L", (4, 4), 255).save(tmp_path / "small.png")
    for args, message in [
        ([], "give --mask (inpaint: bottom, top, left, right, centre or a mask file) or"),
        (["--mask", "bottom", "--strength", "0.5"], "one of them"),
        (["--images", str(tmp_path / "big.png"), "--strength", "0.5"],
         "big.png is 20x16 with 3 channel(s), but the model takes 8x8 with 1: pass --resize"),
        (["--mask", "middle"], "unknown mask 'middle'; choose one of bottom"),
        (["--mask", str(tmp_path / "grey.png")], "holds grey levels (such as 128)"),
        (["--mask", str(tmp_path / "small.png")], "small.png is 4x4, but the images are 8x8"),
        (["--strength", "1.5"], "strength is the share of the trajectory re-run"),
        (["--strength", "0.5", "--labels", "12"], "labels must lie in [0, 9]"),
        (["--mask", "left", "--sampler", "ddim", "--resample", "3"], "only the ancestral"),
    ]:
        with pytest.raises(SystemExit, match=re.escape(message)):
            main(["edit", "--checkpoint", ckpt, "--n", "2", "--out", str(out), *args])
        assert not out.exists()
