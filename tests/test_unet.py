"""UNet shapes over configs and sizes, attention's symmetry, and clear errors."""
import dataclasses

import pytest
import torch

from smol_diffusion import ModelConfig, UNet, get_preset
from smol_diffusion.unet import Attention

SMALL = ModelConfig(image_size=16, in_channels=3, channels=16, channel_mults=(1, 2),
                    num_res_blocks=1, attn_resolutions=(8,), heads=2, dropout=0.0)


@pytest.mark.parametrize("changes,size", [
    ({}, 16),
    ({}, 24),  # any size divisible by 2^(levels-1), not only the configured one
    ({"in_channels": 1, "out_channels": 1}, 16),
    ({"channel_mults": (1, 2, 2), "attn_resolutions": (4,)}, 12),
    ({"num_res_blocks": 2, "heads": 4, "dropout": 0.1}, 32),
    ({"in_channels": 3, "out_channels": 6}, 8),
    ({"channels": 18}, 16),  # a width that is not a multiple of 4: GroupNorm's groups divide it
    ({"patch_size": 2, "in_channels": 1, "out_channels": 1, "image_size": 28,
      "attn_resolutions": (7,)}, 28),
])
def test_output_shape(changes, size):
    cfg = dataclasses.replace(SMALL, **changes)
    model = UNet(cfg)
    x = torch.randn(2, cfg.in_channels, size, size)
    out = model(x, torch.tensor([0, 999]))
    assert out.shape == (2, cfg.out_channels or cfg.in_channels, size, size)


def test_patches_are_pixel_blocks_in_and_out():
    """patch_size 2: each 2x2 block is one position of 4 channels (attention at 7x7 for 28x28
    images), and the output block i is made from output channel i, pixel for pixel."""
    cfg = dataclasses.replace(SMALL, in_channels=1, out_channels=1, image_size=28, patch_size=2,
                              attn_resolutions=(7,))
    model = UNet(cfg)
    assert model.conv_in.in_channels == 4 and model.conv_out.out_channels == 4
    assert sum(isinstance(m, Attention) for m in model.modules()) == 4  # 7x7 and the middle
    torch.nn.init.normal_(model.conv_out.weight)
    x = torch.randn(1, 1, 28, 28)
    blocks = torch.nn.functional.pixel_unshuffle(model(x, torch.tensor([3])), 2)  # (1, 4, 14, 14)
    h = {}
    model.conv_out.register_forward_hook(lambda m, i, o: h.update(out=o))
    model(x, torch.tensor([3]))
    torch.testing.assert_close(blocks, h["out"])
    with pytest.raises(ValueError, match="image_size 28 is not divisible by 8, which 2 "
                                         "channel_mults need with patch_size 4"):
        dataclasses.replace(cfg, patch_size=4)


def test_non_square_input():
    out = UNet(SMALL)(torch.randn(1, 3, 16, 32), torch.tensor([5]))
    assert out.shape == (1, 3, 16, 32)


def test_presets_build_without_batchnorm():
    for name in ("demo", "cars64"):
        model = UNet(get_preset(name).model)
        norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        assert not norms
        assert any(isinstance(m, Attention) for m in model.modules())


def test_timestep_changes_the_output():
    model = UNet(SMALL)
    for p in model.parameters():  # leave the zero-initialised output layers non-zero
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(1, 3, 16, 16)
    assert not torch.allclose(model(x, torch.tensor([1])), model(x, torch.tensor([900])))


def test_attention_is_permutation_equivariant_with_a_residual():
    torch.manual_seed(0)
    attn = Attention(8, heads=2)
    torch.nn.init.normal_(attn.proj.weight, std=0.3)
    x = torch.randn(2, 8, 4, 4)
    perm = torch.randperm(16)
    y = attn(x)
    y_perm = attn(x.flatten(2)[:, :, perm].view(2, 8, 4, 4))
    torch.testing.assert_close(y_perm.flatten(2), y.flatten(2)[:, :, perm], atol=1e-5, rtol=1e-5)
    # zero output projection: the block is exactly the identity (the residual)
    torch.nn.init.zeros_(attn.proj.weight)
    torch.testing.assert_close(attn(x), x)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_attention_hands_sdpa_a_contiguous_last_dim(monkeypatch, fmt):
    """CUDA's flash and memory-efficient kernels need q, k, v with stride 1 on the head dim
    (otherwise PyTorch falls back to its math path); the output keeps x's memory format."""
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, k, v: seen.append((q, k, v)) or sdpa(q, k, v))
    x = torch.randn(2, 8, 4, 4).contiguous(memory_format=fmt)
    y = Attention(8, heads=2)(x)
    assert [t.shape for t in seen[0]] == [(2, 2, 16, 4)] * 3
    assert all(t.stride(-1) == 1 for t in seen[0])
    assert y.is_contiguous(memory_format=fmt)


def test_attention_heads_are_independent():
    """Each head attends with its own channels: changing head 1's input leaves head 0's output."""
    torch.manual_seed(0)
    attn = Attention(4, heads=2)
    attn.norm = torch.nn.Identity()
    w = torch.zeros(12, 4, 1, 1)
    w[torch.arange(12), torch.arange(12) % 4] = 1.0  # q = k = v = x, channel by channel
    attn.qkv.weight.data, attn.qkv.bias.data = w, torch.zeros(12)
    attn.proj.weight.data = torch.eye(4)[:, :, None, None]
    attn.proj.bias.data.zero_()
    x = torch.randn(1, 4, 3, 3)
    x2 = x.clone()
    x2[:, 2:] = torch.randn(1, 2, 3, 3)  # head 1 holds channels 2-3
    torch.testing.assert_close(attn(x)[:, :2], attn(x2)[:, :2])
    assert not torch.allclose(attn(x)[:, 2:], attn(x2)[:, 2:])


def test_bad_sizes_give_clear_errors():
    with pytest.raises(ValueError, match="not divisible"):
        UNet(dataclasses.replace(SMALL, image_size=15))
    with pytest.raises(ValueError, match="not divisible by 2"):
        UNet(SMALL)(torch.randn(1, 3, 15, 16), torch.tensor([0]))
    with pytest.raises(ValueError, match="channels"):
        UNet(SMALL)(torch.randn(1, 1, 16, 16), torch.tensor([0]))
    with pytest.raises(ValueError, match="attention heads"):
        UNet(dataclasses.replace(SMALL, heads=3))
