"""The noise-prediction network: a UNet with residual blocks and self-attention.

The architecture of Ho et al. 2020 (Appendix B), itself PixelCNN++'s backbone: residual blocks
with GroupNorm and a timestep embedding added in each, multi-head self-attention at chosen
resolutions and in the middle, skip connections from every encoder block to the decoder.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of timesteps (Vaswani et al. 2017, Sec. 3.5): (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return F.pad(emb, (0, dim % 2))


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups (Wu & He 2018), fewer for narrow layers: at least 4 channels a
    group, so a 32-channel layer is not normalised channel by channel; a number of groups that
    divides `channels` (18 channels: 2 groups)."""
    return nn.GroupNorm(math.gcd(32, max(1, channels // 4), channels), channels)


def zero_init(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters, so a residual branch starts as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, plus the projected timestep embedding, twice; then a residual."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, out_ch)
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, out_ch, H, W)
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head self-attention over the H*W positions, with a residual connection."""

    def __init__(self, channels: int, heads: int):
        super().__init__()
        if channels % heads:
            raise ValueError(f"{channels} channels do not split into {heads} attention heads")
        self.heads = heads
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        # Tokens (B, H*W, 3C), made contiguous (a copy unless x is channels_last) so that each
        # head's q, k, v have a contiguous last dim: CUDA's flash and memory-efficient SDPA
        # kernels refuse anything else and PyTorch would fall back to its slow math path.
        qkv = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).contiguous()
        qkv = qkv.view(B, H * W, 3, self.heads, C // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, H*W, C/heads)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, heads, H*W, C/heads)
        h = h.transpose(1, 2).reshape(B, H, W, C).permute(0, 3, 1, 2)  # (B, C, H, W)
        return x + self.proj(h)


class UNet(nn.Module):
    """eps_theta(x_t, t): predicts the noise in x_t (Ho et al. 2020, Eq. 11-12).

    `forward(x, t, y=None)` takes images (B, C, H, W), a LongTensor t of shape (B,) and, for a
    class-conditional model (`cfg.num_classes` > 0), labels y (B,) in [0, num_classes], where
    num_classes itself (or y=None) means "no label" (classifier-free guidance, Ho & Salimans
    2022); it returns a tensor shaped like x. With `cfg.patch_size` p > 1 each p x p block of
    pixels becomes p^2 channels of one position first (pixel unshuffle), and back at the end:
    the UNet runs at 1/p of the resolution (Hoogeboom et al. 2023, "simple diffusion"). Any H
    and W divisible by p 2^(levels-1) work; attention sits at the levels whose resolution
    (after patching) is in `cfg.attn_resolutions` when the input is `cfg.image_size`.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        ch, mults = cfg.channels, cfg.channel_mults
        levels = len(mults)
        p = cfg.patch_size
        attn_levels = {i for i in range(levels)
                       if cfg.image_size // p // 2**i in cfg.attn_resolutions}
        emb_dim = 4 * ch
        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(),
                                      nn.Linear(emb_dim, emb_dim))
        if cfg.num_classes:  # one row per class and a last one for "no label"
            self.label_emb = nn.Embedding(cfg.num_classes + 1, emb_dim)
        self.conv_in = nn.Conv2d(cfg.in_channels * p * p, ch, 3, padding=1)

        def block(i: int, o: int, level: int) -> nn.ModuleList:
            layers = [ResBlock(i, o, emb_dim, cfg.dropout)]
            if level in attn_levels:
                layers.append(Attention(o, cfg.heads))
            return nn.ModuleList(layers)

        # Encoder: `num_res_blocks` blocks a level, then a strided conv; every output is kept.
        self.down = nn.ModuleList()
        skips, cur = [ch], ch
        for level, mult in enumerate(mults):
            for _ in range(cfg.num_res_blocks):
                self.down.append(block(cur, ch * mult, level))
                cur = ch * mult
                skips.append(cur)
            if level < levels - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(cur, cur, 3, stride=2, padding=1)]))
                skips.append(cur)
        self.mid = nn.ModuleList([ResBlock(cur, cur, emb_dim, cfg.dropout),
                                  Attention(cur, cfg.heads),
                                  ResBlock(cur, cur, emb_dim, cfg.dropout)])
        # Decoder: one more block a level, each eating one skip, then nearest upsampling + conv.
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(mults))):
            for _ in range(cfg.num_res_blocks + 1):
                self.up.append(block(cur + skips.pop(), ch * mult, level))
                cur = ch * mult
            if level > 0:
                self.up.append(nn.ModuleList([nn.Upsample(scale_factor=2, mode="nearest"),
                                              nn.Conv2d(cur, cur, 3, padding=1)]))
        self.norm_out = group_norm(cur)
        self.conv_out = zero_init(nn.Conv2d(cur, cfg.output_channels * p * p, 3, padding=1))
        self.min_divisor = p * 2 ** (levels - 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor,
                y: torch.Tensor | None = None) -> torch.Tensor:
        """Predict eps for images x (B, C, H, W) at timesteps t (B,), given labels y (B,)."""
        B, C, H, W = x.shape
        if H % self.min_divisor or W % self.min_divisor:
            raise ValueError(f"image size {H}x{W} is not divisible by {self.min_divisor}; "
                             f"resize or pad the images, or use fewer channel multipliers")
        if C != self.cfg.in_channels:
            raise ValueError(f"the model takes {self.cfg.in_channels} channels, got {C}")
        emb = self.time_mlp(timestep_embedding(t, self.cfg.channels))  # (B, 4ch)
        if self.cfg.num_classes:
            if y is None:
                y = torch.full_like(t, self.cfg.num_classes)
            emb = emb + self.label_emb(y)  # the class embedding added to the time embedding
        elif y is not None:
            raise ValueError("this model is unconditional (num_classes=0); it takes no labels")
        h = self.conv_in(F.pixel_unshuffle(x, self.cfg.patch_size))  # (B, ch, H/p, W/p)
        hs = [h]
        for layers in self.down:
            h = self._run(layers, h, emb)
            hs.append(h)
        h = self.mid[0](h, emb)
        h = self.mid[1](h)
        h = self.mid[2](h, emb)
        for layers in self.up:
            if isinstance(layers[0], ResBlock):
                h = torch.cat([h, hs.pop()], dim=1)  # (B, C + C_skip, h, w)
            h = self._run(layers, h, emb)
        return F.pixel_shuffle(self.conv_out(F.silu(self.norm_out(h))), self.cfg.patch_size)

    @staticmethod
    def _run(layers: nn.ModuleList, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in layers:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        return h
