"""The training loop's bookkeeping (readings.py), without a model: what a reading reports, and
when a run has diverged."""
import math

import torch

from smol_diffusion.readings import Readings


def steps(readings, losses, norm=1.0):
    """Add one step a loss; None: a step whose gradient was not finite (skipped)."""
    for loss in losses:
        bad = torch.tensor(loss is None)
        readings.add(torch.tensor(math.nan if loss is None else loss),
                     torch.tensor(math.inf if loss is None else norm), bad)


def test_a_reading_is_the_mean_over_the_finite_steps_since_the_last():
    r = Readings(step=10, batch_size=8, log_every=4)
    steps(r, [1.0, None, 3.0], norm=2.0)
    first = r.read(13)
    assert first["loss"] == 2.0 and first["grad_norm"] == 2.0 and first["skipped"] == 1
    assert first["img_per_s"] > 0 and r.pending == 0 and not r.diverged
    steps(r, [5.0])
    assert r.read(14)["loss"] == 5.0  # the sums started again
    steps(r, [None])
    assert math.isnan(r.read(15)["loss"])  # no finite step: no mean


def test_over_half_the_steps_skipped_is_divergence_once_log_every_steps_were_seen():
    r = Readings(step=0, batch_size=8, log_every=4)
    steps(r, [None, None, 1.0])
    r.read(3)
    assert not r.diverged  # 2 of 3: too few steps to judge
    steps(r, [None])
    r.read(4)
    assert r.diverged == "3 of the last 4 steps"


def test_half_skipped_or_a_falling_fp16_loss_scale_is_no_divergence():
    r = Readings(step=0, batch_size=8, log_every=4)
    steps(r, [None, None, 1.0, 1.0])
    r.read(4)
    assert not r.diverged  # exactly half
    steps(r, [None, None, None, 1.0])
    r.read(8, loss_scale=2.0**10)
    assert not r.diverged  # the scaler lowering its scale skips steps by design
    steps(r, [None, None, None, 1.0])
    r.read(12, loss_scale=1.0)
    assert r.diverged == "3 of the last 4 steps"


def test_the_judgement_window_starts_again_after_log_every_steps():
    r = Readings(step=0, batch_size=8, log_every=4)
    steps(r, [None, 1.0, 1.0, 1.0])
    r.read(4)
    steps(r, [None, None, 1.0, 1.0])  # 3 of 8 since the start, but 2 of 4 in this window
    r.read(8)
    assert not r.diverged and r.bad == r.seen == 0


def test_an_infinite_loss_is_divergence_at_once():
    r = Readings(step=0, batch_size=8, log_every=100)
    r.add(torch.tensor(math.inf), torch.tensor(1.0), torch.tensor(False))
    r.read(1)
    assert r.diverged == "0 of the last 1 steps"
