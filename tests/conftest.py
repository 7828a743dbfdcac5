"""Shared fixtures: a tiny configuration that trains in seconds on two CPU cores."""
import pytest
import torch

from smol_diffusion import get_preset


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


@pytest.fixture
def tiny_cfg(tmp_path):
    """The demo preset shrunk: 8x8 digits, a 2-level UNet, 1,000-step schedule."""
    return get_preset("demo").override(
        image_size=8, channels=16, channel_mults=(1, 2), attn_resolutions=(4,), heads=2,
        steps=40, batch_size=16, warmup=5, log_every=10, sample_every=20, sample_n=4,
        sample_steps=5, checkpoint_every=20, out_dir=str(tmp_path / "run"))
