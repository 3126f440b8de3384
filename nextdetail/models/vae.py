"""The VQGAN-family convolutional encoder and decoder as VAR configures them (module and parameter
names follow VAR's `basic_vae.py`, so its released tokenizer's state dict maps on one to one).

Encoder: conv_in → per level `num_res_blocks` ResnetBlocks (+ self-attention after each block at the
lowest resolution) and a stride-2 downsample between levels → mid (block, attention, block) →
GroupNorm, SiLU, conv_out to z channels. Decoder mirrors it with `num_res_blocks + 1` blocks per level
and nearest ×2 upsampling. Downsampling is 2^(len(ch_mult) − 1): ch_mult (1, 1, 2, 2, 4) gives 16×.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def Normalize(channels: int) -> nn.GroupNorm:  # VAR's name
    return nn.GroupNorm(num_groups=32 if channels % 32 == 0 else _groups(channels), num_channels=channels, eps=1e-6)


def _groups(channels: int) -> int:
    """Tiny CPU models have widths that 32 does not divide: the largest divisor ≤ 32."""
    return max(g for g in range(1, 33) if channels % g == 0)


class Upsample2x(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Downsample2x(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric: (H, W) → (H/2, W/2) exactly


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout) if dropout > 1e-6 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.nin_shortcut = (nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels
                             else nn.Identity())

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H·W positions, residual."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.C = channels
        self.norm = Normalize(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, 3, c, h * w).transpose(-1, -2).unbind(1)  # 3 × (B, HW, C)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, HW, C), softmax(q kᵀ / √C) v
        return x + self.proj_out(out.transpose(1, 2).reshape(b, c, h, w))


def _attn(channels: int, using_sa: bool) -> nn.Module:
    return AttnBlock(channels) if using_sa else nn.Identity()


def _level(block_in: int, block_out: int, n_blocks: int, dropout: float, with_attn: bool) -> nn.Module:
    """One resolution level: `n_blocks` ResnetBlocks (`.block`), each followed by self-attention
    (`.attn`) at the lowest resolution. VAR's names: `down[i]` / `up[i]` hold these."""
    level = nn.Module()
    level.block = nn.ModuleList(ResnetBlock(block_in if j == 0 else block_out, block_out, dropout) for j in range(n_blocks))
    level.attn = nn.ModuleList(AttnBlock(block_out) for _ in range(n_blocks if with_attn else 0))
    return level


def _run_level(level: nn.Module, h: Tensor) -> Tensor:
    for i_block, block in enumerate(level.block):
        h = block(h)
        if len(level.attn) > 0:
            h = level.attn[i_block](h)
    return h


def _mid(channels: int, dropout: float, using_mid_sa: bool) -> nn.Module:
    """The bottleneck both halves share: block_1 → attn_1 → block_2 (VAR's names)."""
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, dropout)
    mid.attn_1 = _attn(channels, using_mid_sa)
    mid.block_2 = ResnetBlock(channels, channels, dropout)
    return mid


class Encoder(nn.Module):
    def __init__(self, *, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, dropout: float, in_channels: int,
                 z_channels: int, using_sa: bool = True, using_mid_sa: bool = True) -> None:
        super().__init__()
        self.num_resolutions, self.num_res_blocks = len(ch_mult), num_res_blocks
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)
        in_ch_mult = (1, *ch_mult)
        self.down = nn.ModuleList()
        last = self.num_resolutions - 1
        for i_level in range(self.num_resolutions):
            block_in = ch * ch_mult[i_level]
            down = _level(ch * in_ch_mult[i_level], block_in, num_res_blocks, dropout, using_sa and i_level == last)
            if i_level != last:
                down.downsample = Downsample2x(block_in)
            self.down.append(down)
        self.mid = _mid(block_in, dropout, using_mid_sa)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, z_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: Tensor) -> Tensor:  # (B, 3, H, W) in [-1, 1] → (B, z, H/d, W/d)
        h = self.conv_in(x)
        for i_level, down in enumerate(self.down):
            h = _run_level(down, h)
            if i_level != self.num_resolutions - 1:
                h = down.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, *, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, dropout: float, in_channels: int,
                 z_channels: int, using_sa: bool = True, using_mid_sa: bool = True) -> None:
        super().__init__()
        self.num_resolutions, self.num_res_blocks = len(ch_mult), num_res_blocks
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = _mid(block_in, dropout, using_mid_sa)
        self.up = nn.ModuleList()
        for i_level in reversed(range(self.num_resolutions)):
            block_out = ch * ch_mult[i_level]
            up = _level(block_in, block_out, num_res_blocks + 1, dropout, using_sa and i_level == self.num_resolutions - 1)
            block_in = block_out
            if i_level != 0:
                up.upsample = Upsample2x(block_in)
            self.up.insert(0, up)  # up[i] works at the resolution of down[i]
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, z: Tensor) -> Tensor:  # (B, z, h, w) → (B, 3, h·d, w·d)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for i_level in reversed(range(self.num_resolutions)):
            h = _run_level(self.up[i_level], h)
            if i_level != 0:
                h = self.up[i_level].upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))
