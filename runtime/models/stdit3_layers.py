"""The layers of STDiT3 (Open-Sora v1.2), under upstream's module and parameter names.

Split from ``stdit3.py`` so the model file reads as config -> model -> build/load -> partition. TDTM's merge
and unmerge live here with the block that applies them.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:  # the config lives with the model; layers only read it
    from cidl.runtime.models.stdit3 import STDiT3Config


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


class RMSNorm(nn.Module):
    """LlamaRMSNorm over the head dim (upstream's q/k norm): statistics in fp32, ``weight`` scales."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Mlp(nn.Module):
    """timm's Mlp as upstream uses it (fc1, tanh-GELU, fc2; dropout 0)."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _rotate_half(x: Tensor) -> Tensor:
    # rotary_embedding_torch pairs adjacent features (interleaved): (x0, x1) -> (-x1, x0).
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def rope_tables(freqs: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """cos/sin tables [length, head_dim] for positions 0..length-1, each frequency twice (interleaved)."""
    pos = torch.arange(length, device=freqs.device, dtype=freqs.dtype)
    angles = (pos[:, None] * freqs[None, :]).repeat_interleave(2, dim=-1)
    return angles.cos(), angles.sin()


class Attention(nn.Module):
    """Self-attention: qkv with bias, q/k RMSNorm, optional RoPE on q and k after the norm, proj."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            cos, sin = rope
            q = (q * cos + _rotate_half(q) * sin).to(v.dtype)
            k = (k * cos + _rotate_half(k) * sin).to(v.dtype)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class MultiHeadCrossAttention(nn.Module):
    """Queries from video tokens, keys/values from the text tokens; ``mask`` [B,1,1,L] bool, True = attend."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, cond: Tensor, mask: Tensor | None) -> Tensor:
        b, n, c = x.shape
        q = self.q_linear(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        kv = self.kv_linear(cond).view(b, -1, 2, self.num_heads, self.head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


def merged_frames(t: int) -> int:
    """Latent frames after TDTM: pairs, and an odd last frame on its own."""
    return (t + 1) // 2


def _merge(x: Tensor) -> Tensor:
    """[B, T, S, C] -> [B, ceil(T/2), S, C], averaging frame pairs."""
    b, t, s, c = x.shape
    pairs = x[:, : t - t % 2].reshape(b, t // 2, 2, s, c).mean(dim=2)
    return torch.cat([pairs, x[:, t - 1 :]], dim=1) if t % 2 else pairs


def _unmerge(x: Tensor, t: int) -> Tensor:
    """[B, T', S, C] -> [B, T, S, C], each merged frame copied back to the frames it came from."""
    b, tm, s, c = x.shape
    return x.unsqueeze(2).expand(b, tm, 2, s, c).reshape(b, 2 * tm, s, c)[:, :t]


class STDiT3Block(nn.Module):
    """One spatial or temporal block: adaLN-single modulated self-attention, cross-attention, MLP."""

    def __init__(self, cfg: STDiT3Config, temporal: bool) -> None:
        super().__init__()
        self.temporal = temporal
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=1e-6, elementwise_affine=False)
        self.attn = Attention(cfg.hidden_size, cfg.num_heads, cfg.qk_norm)
        self.cross_attn = MultiHeadCrossAttention(cfg.hidden_size, cfg.num_heads)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=1e-6, elementwise_affine=False)
        self.mlp = Mlp(cfg.hidden_size, cfg.mlp_hidden)
        self.scale_shift_table = nn.Parameter(torch.zeros(6, cfg.hidden_size))

    def forward(
        self,
        x: Tensor,
        y: Tensor,
        t_mlp: Tensor,
        y_mask: Tensor | None,
        t: int,
        s: int,
        rope: tuple[Tensor, Tensor] | None = None,
        tdtm: bool = False,
    ) -> Tensor:
        b, n, c = x.shape
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + t_mlp.reshape(b, 6, -1)
        ).chunk(6, dim=1)

        x_m = _modulate(self.norm1(x), shift_msa, scale_msa).view(b, t, s, c)
        if tdtm:
            x_m = _merge(x_m)
        tm = x_m.shape[1]
        if self.temporal:
            x_m = x_m.transpose(1, 2).reshape(b * s, tm, c)
            x_m = self.attn(x_m, rope).view(b, s, tm, c).transpose(1, 2)
        else:
            x_m = self.attn(x_m.reshape(b * tm, s, c)).view(b, tm, s, c)
        if tdtm:
            x_m = _unmerge(x_m, t)
        x = x + gate_msa * x_m.reshape(b, n, c)

        if tdtm:
            x_c = self.cross_attn(_merge(x.view(b, t, s, c)).reshape(b, tm * s, c), y, y_mask)
            x = x + _unmerge(x_c.view(b, tm, s, c), t).reshape(b, n, c)
        else:
            x = x + self.cross_attn(x, y, y_mask)

        x_m = _modulate(self.norm2(x), shift_mlp, scale_mlp)
        return x + gate_mlp * self.mlp(x_m)


class PatchEmbed3D(nn.Module):
    def __init__(self, patch_size: tuple[int, int, int], in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        pt, ph, pw = self.patch_size
        _, _, d, h, w = x.shape
        x = F.pad(x, (0, (-w) % pw, 0, (-h) % ph, 0, (-d) % pt))
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, T*H*W, C], (T, H, W) order


def _sinusoid(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1) if dim % 2 else emb


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding (256) -> Linear -> SiLU -> Linear; also upstream's SizeEmbedder for fps."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256) -> None:
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(_sinusoid(t, self.frequency_embedding_size).to(self.mlp[0].weight.dtype))


class CaptionEmbedder(nn.Module):
    """Projects T5 tokens to the hidden size; holds the learned null caption used for CFG."""

    def __init__(self, in_channels: int, hidden_size: int, token_num: int) -> None:
        super().__init__()
        self.y_proj = Mlp(in_channels, hidden_size, hidden_size)
        self.register_buffer("y_embedding", torch.zeros(token_num, in_channels))

    def forward(self, caption: Tensor) -> Tensor:
        return self.y_proj(caption)


class PositionEmbedding2D(nn.Module):
    """Parameter-free 2D sin-cos embedding (upstream's, including its w-before-h channel order)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def _sincos(self, pos: Tensor) -> Tensor:
        half = self.dim // 2
        inv_freq = 1.0 / (10000 ** (torch.arange(0, half, 2, device=pos.device).float() / half))
        out = pos[:, None] * inv_freq[None]
        return torch.cat([out.sin(), out.cos()], dim=-1)

    def forward(self, h: int, w: int, scale: float, base_size: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        grid_h = torch.arange(h, device=device) / scale * (base_size / h)
        grid_w = torch.arange(w, device=device) / scale * (base_size / w)
        # Token (i, j) at index i*w + j: upstream's first half encodes the w coordinate, the second half h.
        w_coord = grid_w[None, :].expand(h, w).reshape(-1)
        h_coord = grid_h[:, None].expand(h, w).reshape(-1)
        return torch.cat([self._sincos(w_coord), self._sincos(h_coord)], dim=-1).unsqueeze(0).to(dtype)


class RotaryEmbedding(nn.Module):
    """Holds only ``freqs`` (a parameter, as in rotary_embedding_torch); tables come from ``rope_tables``."""

    def __init__(self, dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        self.freqs = nn.Parameter(rope_frequencies(dim, theta), requires_grad=False)


def rope_frequencies(dim: int, theta: float = 10000.0) -> Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))


class T2IFinalLayer(nn.Module):
    def __init__(self, hidden_size: int, num_patch: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, num_patch * out_channels, bias=True)
        self.scale_shift_table = nn.Parameter(torch.zeros(2, hidden_size))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)
        return self.linear(_modulate(self.norm_final(x), shift, scale))
