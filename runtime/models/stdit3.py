"""STDiT3 (Open-Sora v1.2's denoiser), its presets, TDTM, and its cut into blocks for CI-DL.

Written from the facts of upstream ``opensora/models/stdit/stdit3.py`` and
``opensora/models/layers/blocks.py`` (hpcaitech/Open-Sora tag v1.2.0, commit
17cce908b22283acc3c946816c81f46dd442a453) and rotary_embedding_torch 0.5.3 (the version v1.2 pins).
Module and parameter names equal upstream's, so a released checkpoint loads with
``load_state_dict(strict=True)``; ``rope.freqs`` is a parameter and ``y_embedder.y_embedding`` (the null
caption) a persistent buffer, as upstream has them. Nothing else is registered (no non-persistent
buffers), so a model built on ``meta`` and materialised with ``to_empty`` loses nothing.

Differences from upstream, all outside the checkpoint: cross-attention masks padded text tokens with an
attention mask instead of packing the valid tokens (same math; each sample needs >= 1 valid token); no
``x_mask`` (video conditioning) path; ``fps`` defaults to 24 and ``height``/``width`` (pixels) to 8x the
latent size; ``height``/``width`` are Python numbers, so every step also runs on the meta device.

TDTM (Temporal Dimension Token Merging, On-device Sora): on merged calls every block averages consecutive
latent frames (pairs 0-1, 2-3, ...) before spatial self-attention, temporal self-attention (RoPE over the
merged positions 0..T'-1) and cross-attention, then copies each result back to both frames; norms,
modulation and the MLP run on all T frames. Odd T: the last frame is a group of its own, so
T' = ceil(T/2) (T=15 -> 8) and no frame is dropped. (On-device Sora's ``merge.py`` drops the odd last
frame and copies the last pair's result to it; we keep every frame instead.)
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, model_validator
from torch import Tensor, nn

from cidl.runtime.models.checkpoint import load_strict, read_state_dict
from cidl.runtime.models.piece import Carry, Piece
from cidl.runtime.models.stdit3_layers import (
    CaptionEmbedder,
    PatchEmbed3D,
    PositionEmbedding2D,
    RotaryEmbedding,
    STDiT3Block,
    T2IFinalLayer,
    TimestepEmbedder,
    merged_frames,
    rope_frequencies,
    rope_tables,
)

# ----------------------------------------------------------------------------------------------- config


class STDiT3Config(BaseModel):
    """Shape of an STDiT3. ``text_len`` is upstream's ``model_max_length``; out channels = 2x in."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: int = 1
    name: str
    hidden_size: int
    num_heads: int
    depth: int
    mlp_ratio: float = 4.0
    patch_size: tuple[int, int, int] = (1, 2, 2)
    in_channels: int = 4
    caption_channels: int
    text_len: int
    input_sq_size: int = 512
    frequency_embedding_size: int = 256
    qk_norm: bool = True

    @model_validator(mode="after")
    def _check(self) -> STDiT3Config:
        if self.hidden_size % self.num_heads != 0:
            raise ValueError(f"hidden_size {self.hidden_size}: expected a multiple of num_heads")
        if self.hidden_size % 4 != 0:
            raise ValueError(f"hidden_size {self.hidden_size}: expected a multiple of 4 (2D sin-cos)")
        if self.head_dim % 2 != 0:
            raise ValueError(f"head dim {self.head_dim}: expected an even number (RoPE)")
        return self

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)


STDIT3_PRESETS: dict[str, STDiT3Config] = {
    # STDiT3-XL/2 as released (hpcai-tech/OpenSora-STDiT-v3).
    "full": STDiT3Config(
        name="full", hidden_size=1152, num_heads=16, depth=28, caption_channels=4096, text_len=300
    ),
    # Same code, smaller: 16 blocks, ~19 MB fp32 per block pair, 159 MB in all; a pair runs in ~25 ms on
    # 2 CPU cores at 64x64 px, 17 frames. Caption width = the small T5 preset's d_model.
    "small": STDiT3Config(
        name="small", hidden_size=384, num_heads=6, depth=8, caption_channels=512, text_len=300
    ),
    # Unit tests: every linear weight still has >= 2048 elements (int8 quantisation applies).
    "tiny": STDiT3Config(
        name="tiny", hidden_size=256, num_heads=4, depth=2, caption_channels=256, text_len=32
    ),
}


# ----------------------------------------------------------------------------------------------- model


class STDiT3(nn.Module):
    """The denoiser: ``embed``, ``block_pair`` x depth, ``finish`` -- both ``forward`` and the pieces."""

    def __init__(self, config: STDiT3Config) -> None:
        super().__init__()
        cfg = config
        self.config = cfg
        self.pos_embed = PositionEmbedding2D(cfg.hidden_size)
        self.rope = RotaryEmbedding(cfg.head_dim)
        self.x_embedder = PatchEmbed3D(cfg.patch_size, cfg.in_channels, cfg.hidden_size)
        self.t_embedder = TimestepEmbedder(cfg.hidden_size, cfg.frequency_embedding_size)
        self.fps_embedder = TimestepEmbedder(cfg.hidden_size, cfg.frequency_embedding_size)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(cfg.hidden_size, 6 * cfg.hidden_size, bias=True))
        self.y_embedder = CaptionEmbedder(cfg.caption_channels, cfg.hidden_size, cfg.text_len)
        self.spatial_blocks = nn.ModuleList([STDiT3Block(cfg, temporal=False) for _ in range(cfg.depth)])
        self.temporal_blocks = nn.ModuleList([STDiT3Block(cfg, temporal=True) for _ in range(cfg.depth)])
        self.final_layer = T2IFinalLayer(cfg.hidden_size, math.prod(cfg.patch_size), cfg.out_channels)

    # The three stages below take and return a carry; ``split_stdit3`` wraps them as pieces.

    def embed(self, carry: Carry) -> Carry:
        """part1: patch/pos embed, timestep+fps -> t, t_block, caption projection, text mask, RoPE."""
        cfg = self.config
        dtype = self.x_embedder.proj.weight.dtype
        x: Tensor = carry["x"].to(dtype)
        b, _, tx, hx, wx = x.shape
        pt, ph, pw = cfg.patch_size
        t, h, w = -(-tx // pt), -(-hx // ph), -(-wx // pw)
        s = h * w
        height, width = _pixels(carry.get("height"), hx * 8), _pixels(carry.get("width"), wx * 8)
        scale = math.sqrt(height * width) / cfg.input_sq_size
        pos = self.pos_embed(h, w, scale, round(s**0.5), x.device, dtype)

        timestep: Tensor = carry["timestep"].to(dtype)
        fps = carry.get("fps")
        if fps is None:
            fps = torch.full((1,), 24.0, device=x.device)
        fps = fps.reshape(-1).to(x.device)
        if fps.shape[0] != b:
            fps = fps.repeat(b // fps.shape[0])
        t_emb = self.t_embedder(timestep) + self.fps_embedder(fps)
        t_mlp = self.t_block(t_emb)

        y = self.y_embedder(carry["y"].to(dtype).squeeze(1))  # [B, L, C]
        mask = carry.get("mask")
        y_mask = None
        if mask is not None:
            if mask.shape[0] != b:  # upstream repeats the text mask over the CFG batch
                mask = mask.repeat(b // mask.shape[0], 1)
            y_mask = (mask != 0).to(x.device)[:, None, None, :]

        tdtm = bool(carry.get("tdtm", False))
        cos, sin = rope_tables(self.rope.freqs, merged_frames(t) if tdtm else t)
        x = self.x_embedder(x).view(b, t, s, -1) + pos
        return {
            "x": x.reshape(b, t * s, -1),
            "t": t_emb,
            "t_mlp": t_mlp,
            "y": y,
            "y_mask": y_mask,
            "rope_cos": cos,
            "rope_sin": sin,
            "T": t, "S": s, "H": h, "W": w,
            "Tx": tx, "Hx": hx, "Wx": wx,
            "tdtm": tdtm,
        }

    def block_pair(self, i: int, carry: Carry) -> Carry:
        """Spatial block i then temporal block i; updates ``carry["x"]``."""
        args = (carry["y"], carry["t_mlp"], carry["y_mask"], carry["T"], carry["S"])
        tdtm = carry["tdtm"]
        x = self.spatial_blocks[i](carry["x"], *args, tdtm=tdtm)
        x = self.temporal_blocks[i](x, *args, rope=(carry["rope_cos"], carry["rope_sin"]), tdtm=tdtm)
        return {**carry, "x": x}

    def finish(self, carry: Carry) -> Carry:
        """part2: final layer and unpatchify to [B, out_channels, Tx, Hx, Wx] (fp32, as upstream returns)."""
        x = self.final_layer(carry["x"], carry["t"])
        b = x.shape[0]
        t, h, w = carry["T"], carry["H"], carry["W"]
        pt, ph, pw = self.config.patch_size
        c = self.config.out_channels
        x = x.view(b, t, h, w, pt, ph, pw, c).permute(0, 7, 1, 4, 2, 5, 3, 6)
        x = x.reshape(b, c, t * pt, h * ph, w * pw)[:, :, : carry["Tx"], : carry["Hx"], : carry["Wx"]]
        return {"out": x.to(torch.float32)}

    def forward(
        self,
        x: Tensor,
        timestep: Tensor,
        y: Tensor,
        mask: Tensor | None = None,
        fps: Tensor | None = None,
        height: float | None = None,
        width: float | None = None,
        tdtm: bool = False,
    ) -> Tensor:
        """x [B,4,T,H,W] latent, timestep [B] in [0,1000], y [B,1,L,caption], mask [B,L] (0 = padded)."""
        carry = self.embed(
            {"x": x, "timestep": timestep, "y": y, "mask": mask, "fps": fps,
             "height": height, "width": width, "tdtm": tdtm}
        )
        for i in range(self.config.depth):
            carry = self.block_pair(i, carry)
        return self.finish(carry)["out"]

    def null_caption(self, batch: int) -> Tensor:
        """The learned null caption as a ``y`` input: [batch, 1, L, caption_channels]."""
        return self.y_embedder.y_embedding[None, None].expand(batch, 1, -1, -1)


# ----------------------------------------------------------------------------------------------- build / load


def _pixels(value: float | Tensor | None, default: int) -> float:
    """A video size in pixels: a number, or (as upstream passes it) a [B] tensor -- not on meta."""
    if value is None:
        return float(default)
    return float(value.reshape(-1)[0]) if isinstance(value, Tensor) else float(value)


def _resolve(preset: str | STDiT3Config) -> STDiT3Config:
    if isinstance(preset, STDiT3Config):
        return preset
    if preset not in STDIT3_PRESETS:
        raise ValueError(f"STDiT3 preset {preset!r}: expected one of {sorted(STDIT3_PRESETS)}")
    return STDIT3_PRESETS[preset]


_RESIDUAL_OUT = ("attn.proj.weight", "cross_attn.proj.weight", "mlp.fc2.weight")


@torch.no_grad()
def init_weights(model: STDiT3, seed: int = 0) -> None:
    """Deterministic seeded init, drawn on CPU in ``state_dict`` order (same weights on every device).

    Upstream zero-inits several layers (fps embedder output, temporal projections), which would make random
    models output near-constant values; we want a nonzero signal everywhere, so: every Linear/Conv weight
    N(0, 1/fan_in), with the three residual output projections of each block further scaled by
    1/sqrt(2*depth) so the residual stream stays O(1) over all blocks; biases N(0, 0.02^2); RMSNorm weights
    1 + N(0, 0.02^2); ``scale_shift_table``s N(0, 1/hidden) and the null caption N(0, 1/caption_channels) as
    upstream draws them; ``rope.freqs`` are RoPE's fixed frequencies.
    """
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    for name, tensor in model.state_dict(keep_vars=True).items():
        shape = tuple(tensor.shape)
        if name == "rope.freqs":
            value = rope_frequencies(cfg.head_dim)
        elif name.endswith("scale_shift_table"):
            value = torch.randn(shape, generator=gen) / cfg.hidden_size**0.5
        elif name == "y_embedder.y_embedding":
            value = torch.randn(shape, generator=gen) / cfg.caption_channels**0.5
        elif name.endswith("norm.weight"):
            value = 1 + 0.02 * torch.randn(shape, generator=gen)
        elif name.endswith(".bias"):
            value = 0.02 * torch.randn(shape, generator=gen)
        else:
            fan_in = math.prod(shape[1:])
            std = fan_in**-0.5 * ((2 * cfg.depth) ** -0.5 if name.endswith(_RESIDUAL_OUT) else 1.0)
            value = std * torch.randn(shape, generator=gen)
        tensor.copy_(value)


def build_stdit3(
    preset: str | STDiT3Config,
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> STDiT3:
    """An STDiT3 in eval mode without grads; weights from ``seed`` (on ``meta`` only shapes, no memory)."""
    cfg = _resolve(preset)
    with torch.device("meta"):
        model = STDiT3(cfg)
    model.eval().requires_grad_(False)
    if torch.device(device).type == "meta":
        return model.to(dtype=dtype)
    model.to_empty(device="cpu")
    init_weights(model, seed)
    return model.to(device=device, dtype=dtype)


def load_checkpoint(model: STDiT3, path: str | Path) -> STDiT3:
    """Load a released state dict (``.safetensors``, or ``.pt``/``.pth``/``.bin``) with ``strict=True``.

    Accepts a bare state dict or one nested under ``state_dict``/``model``/``module``, with an optional
    ``module.`` prefix (DDP checkpoints). A model on ``meta`` gets the loaded tensors assigned.
    """
    load_strict(model, read_state_dict(path), path, f"STDiT3 '{model.config.name}'")
    return model


# ----------------------------------------------------------------------------------------------- partition


def split_stdit3(model: STDiT3, layers_per_block: int = 1) -> list[Piece]:
    """On-device Sora's cut: ``part1`` (embedders), ``block00``.. (each k spatial+temporal pairs), ``part2``.

    Pieces look their modules up on ``model`` at call time, so an executor may swap module objects (e.g. load
    a block's weights into a fresh module) between calls. Every piece runs on the meta device.
    """
    depth = model.config.depth
    if layers_per_block < 1:
        raise ValueError(f"layers_per_block: expected >= 1, got {layers_per_block}")
    embed_owns = ("x_embedder", "t_embedder", "fps_embedder", "t_block", "y_embedder", "pos_embed", "rope")
    pieces = [Piece("part1", embed_owns, model.embed)]
    for n, start in enumerate(range(0, depth, layers_per_block)):
        idx = tuple(range(start, min(start + layers_per_block, depth)))
        owns = tuple(f"{kind}_blocks.{i}" for i in idx for kind in ("spatial", "temporal"))
        pieces.append(Piece(f"block{n:02d}", owns, _pairs_forward(model, idx)))
    pieces.append(Piece("part2", ("final_layer",), model.finish))
    return pieces


def _pairs_forward(model: STDiT3, idx: tuple[int, ...]):
    def forward(carry: Carry) -> Carry:
        for i in idx:
            carry = model.block_pair(i, carry)
        return carry

    return forward


def stdit3_inputs(
    config: str | STDiT3Config,
    *,
    batch: int,
    frames_latent: int,
    height_latent: int,
    width_latent: int,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    tdtm: bool = False,
) -> Carry:
    """Example ``part1`` input carry: random latent, timestep 500, random caption, a padded text mask.

    Sample i of the batch keeps ``L - i*L//4`` text tokens (at least 1), so masking is exercised.
    """
    cfg = _resolve(config)
    device = torch.device(device)
    shapes = {
        "x": (batch, cfg.in_channels, frames_latent, height_latent, width_latent),
        "y": (batch, 1, cfg.text_len, cfg.caption_channels),
    }
    if device.type == "meta":
        tensors = {k: torch.empty(v, device=device, dtype=dtype) for k, v in shapes.items()}
    else:
        gen = torch.Generator().manual_seed(seed)
        tensors = {k: torch.randn(v, generator=gen).to(device=device, dtype=dtype) for k, v in shapes.items()}
    lens = torch.tensor([max(1, cfg.text_len - i * cfg.text_len // 4) for i in range(batch)])
    mask = (torch.arange(cfg.text_len)[None, :] < lens[:, None]).to(torch.int64)
    return {
        "x": tensors["x"],
        "timestep": torch.full((batch,), 500.0, device=device, dtype=dtype),
        "y": tensors["y"],
        "mask": mask.to(device),
        "fps": torch.full((batch,), 24.0, device=device, dtype=dtype),
        "height": float(height_latent * 8),
        "width": float(width_latent * 8),
        "tdtm": tdtm,
    }
