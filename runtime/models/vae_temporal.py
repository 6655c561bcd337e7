"""Open-Sora v1.2's temporal VAE (``VAE_Temporal_SD``), decoder side only: causal 3D convolutions.

Written from the facts of upstream ``opensora/models/vae/vae_temporal.py`` (v1.2.0): module and parameter
names match it, so ``temporal_vae.decoder.*`` / ``temporal_vae.post_quant_conv.*`` keys of the released
``hpcai-tech/OpenSora-VAE-v1.2`` state dict load without renaming. Text-to-video never encodes, so the encoder
and ``quant_conv`` are left out. Upsampling is temporal only (depth-to-time after a conv that multiplies
channels by the stride); spatial size is unchanged — the 2D VAE upsamples space.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CausalConv3d(nn.Module):
    """A 3D conv padded causally in time (all ``k_t - 1`` zero frames in front) and symmetrically in space."""

    def __init__(
        self, chan_in: int, chan_out: int, kernel_size: int | tuple[int, int, int], bias: bool = True
    ):
        super().__init__()
        kt, kh, kw = (kernel_size,) * 3 if isinstance(kernel_size, int) else kernel_size
        # Upstream keeps F.pad's order (w, w, h, h, t_front, t_back).
        self.time_causal_padding = (kw // 2, kw // 2, kh // 2, kh // 2, kt - 1, 0)
        self.conv = nn.Conv3d(chan_in, chan_out, (kt, kh, kw), bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, self.time_causal_padding, mode="constant"))


class ResBlock(nn.Module):
    """GroupNorm -> swish -> causal conv 3x3x3, twice, plus a 1x1x1 shortcut conv when the width changes."""

    def __init__(self, in_channels: int, filters: int, num_groups: int):
        super().__init__()
        self.in_channels = in_channels
        self.filters = filters
        self.activate = nn.SiLU()
        self.norm1 = nn.GroupNorm(num_groups, in_channels)
        self.conv1 = CausalConv3d(in_channels, filters, 3, bias=False)
        self.norm2 = nn.GroupNorm(num_groups, filters)
        self.conv2 = CausalConv3d(filters, filters, 3, bias=False)
        if in_channels != filters:
            self.conv3 = CausalConv3d(in_channels, filters, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.conv3(x) if self.in_channels != self.filters else x
        x = self.conv1(self.activate(self.norm1(x)))
        x = self.conv2(self.activate(self.norm2(x)))
        return x + residual


def depth_to_time(x: torch.Tensor, t_stride: int) -> torch.Tensor:
    """``B (C ts) T H W -> B C (T ts) H W`` (upstream's einops rearrange, channel-major split)."""
    b, c, t, h, w = x.shape
    x = x.reshape(b, c // t_stride, t_stride, t, h, w).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, c // t_stride, t * t_stride, h, w)


class TemporalDecoder(nn.Module):
    """Upstream ``Decoder``: ``conv1``, ``res_blocks`` at the widest level, then levels from last to first
    (``block_res_blocks[i]``; ``conv_blocks[i-1]`` + depth-to-time where ``temporal_downsample[i-1]``),
    ``norm1``, swish, ``conv_out``."""

    def __init__(
        self,
        in_out_channels: int,
        latent_embed_dim: int,
        filters: int,
        num_res_blocks: int,
        channel_multipliers: tuple[int, ...],
        temporal_downsample: tuple[bool, ...],
        num_groups: int,
    ):
        super().__init__()
        self.num_res_blocks = num_res_blocks
        self.num_blocks = len(channel_multipliers)
        self.temporal_downsample = temporal_downsample
        self.activate = nn.SiLU()
        width = filters * channel_multipliers[-1]
        self.conv1 = CausalConv3d(latent_embed_dim, width, 3, bias=True)
        self.res_blocks = nn.ModuleList([ResBlock(width, width, num_groups) for _ in range(num_res_blocks)])
        self.block_res_blocks = nn.ModuleList()
        self.conv_blocks = nn.ModuleList()
        prev = width
        for i in reversed(range(self.num_blocks)):
            width = filters * channel_multipliers[i]
            items = nn.ModuleList()
            for _ in range(num_res_blocks):
                items.append(ResBlock(prev, width, num_groups))
                prev = width
            self.block_res_blocks.insert(0, items)
            if i > 0:
                # Identity keeps conv_blocks indices (and so checkpoint keys) aligned with the levels.
                up = CausalConv3d(prev, prev * 2, 3) if temporal_downsample[i - 1] else nn.Identity()
                self.conv_blocks.insert(0, up)
        self.norm1 = nn.GroupNorm(num_groups, prev)
        self.conv_out = CausalConv3d(width, in_out_channels, 3)

    def t_stride(self, level: int) -> int:
        """Temporal upsampling factor applied after level ``level`` (1 for level 0 or no upsampling)."""
        return 2 if level > 0 and self.temporal_downsample[level - 1] else 1

    def upsample(self, level: int, x: torch.Tensor) -> torch.Tensor:
        """``conv_blocks[level-1]`` then depth-to-time: what follows level ``level``'s res blocks."""
        x = self.conv_blocks[level - 1](x)
        return depth_to_time(x, self.t_stride(level))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.activate(self.norm1(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for block in self.res_blocks:
            x = block(x)
        for i in reversed(range(self.num_blocks)):
            for block in self.block_res_blocks[i]:
                x = block(x)
            if i > 0:
                x = self.upsample(i, x)
        return self.head(x)


class TemporalVAE(nn.Module):
    """Decoder half of upstream ``VAE_Temporal``: ``post_quant_conv`` (1x1x1) then ``decoder``; ``decode``
    drops the causal time padding so ``num_frames`` come out (5 latent frames -> 20 -> 17)."""

    def __init__(
        self,
        *,
        in_out_channels: int = 4,
        latent_embed_dim: int = 4,
        embed_dim: int = 4,
        filters: int = 128,
        num_res_blocks: int = 4,
        channel_multipliers: tuple[int, ...] = (1, 2, 2, 4),
        temporal_downsample: tuple[bool, ...] = (False, True, True),
        num_groups: int = 32,
    ):
        super().__init__()
        self.time_downsample_factor = 2 ** sum(temporal_downsample)
        self.out_channels = in_out_channels
        self.post_quant_conv = CausalConv3d(embed_dim, latent_embed_dim, 1)
        self.decoder = TemporalDecoder(
            in_out_channels,
            latent_embed_dim,
            filters,
            num_res_blocks,
            channel_multipliers,
            temporal_downsample,
            num_groups,
        )

    def time_padding(self, num_frames: int) -> int:
        """Frames the encoder padded in front of ``num_frames`` (the decoder crops them): to a 4x."""
        return (-num_frames) % self.time_downsample_factor

    def latent_frames(self, num_frames: int) -> int:
        """Latent frames of ``num_frames`` video frames (17 -> 5)."""
        return (num_frames + self.time_padding(num_frames)) // self.time_downsample_factor

    def decode(self, z: torch.Tensor, num_frames: int) -> torch.Tensor:
        x = self.decoder(self.post_quant_conv(z))
        return x[:, :, self.time_padding(num_frames) :]
