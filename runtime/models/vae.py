"""Open-Sora v1.2's VAE (``OpenSoraVAE_V1_2``), decoder side, and its cut into blocks.

Text-to-video only decodes. Upstream ``VideoAutoencoderPipeline.decode`` (v1.2.0,
``opensora/models/vae/vae.py``): de-normalise the latent per channel (``z * scale + shift``), run the temporal
decoder on chunks of 5 latent frames (``micro_frame_size=17`` video frames each, the causal front padding
cropped), then the 2D decoder — the SDXL VAE, diffusers ``AutoencoderKL``'s decoder and ``post_quant_conv`` —
on micro-batches of 4 frames of ``x / 0.18215``. Module names follow upstream
(``spatial_vae.module.decoder.*``, ``temporal_vae.decoder.*``, buffers ``scale`` and ``shift``), so the
released ``hpcai-tech/OpenSora-VAE-v1.2`` state dict loads once its encoder keys are dropped.

The cut follows On-device Sora: each decoder is a list of *groups* (a stem, one group per resolution level, a
head); each group is a list of *units* (a res block, with the level's upsampler attached to its last one). A
group becomes one piece, except the decoder's hottest level — the one with the largest activation, channels x
frames x pixels — which is split into one piece per unit. For the full model that gives On-device Sora's 9 + 9
pieces.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers.models.autoencoders.vae import Decoder
from torch import nn

from cidl.runtime.models.checkpoint import load_strict, read_state_dict
from cidl.runtime.models.piece import Carry, Piece
from cidl.runtime.models.vae_temporal import TemporalVAE

LATENT_CHANNELS = 4
SPATIAL_FACTOR = 0.18215  # upstream VideoAutoencoderKL divides by this before decoding
SHIFT = (-0.10, 0.34, 0.27, 0.98)  # OpenSoraVAE_V1_2 latent normalisation, per channel
SCALE = (3.85, 2.32, 2.33, 3.06)
MICRO_FRAME_SIZE = 17  # video frames per temporal-decoder call (5 latent frames)
MICRO_BATCH_SIZE = 4  # frames per 2D-decoder call
SPATIAL_DOWNSAMPLE = 8

VAE_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # SDXL VAE (PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers) + VAE_Temporal_SD.
    "full": {
        "spatial": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32),
        "temporal": dict(filters=128, num_res_blocks=4, num_groups=32),
    },
    "small": {
        "spatial": dict(block_out_channels=(64, 128, 256, 256), layers_per_block=2, norm_num_groups=32),
        "temporal": dict(filters=64, num_res_blocks=2, num_groups=32),
    },
    "tiny": {
        "spatial": dict(block_out_channels=(32, 32, 64, 64), layers_per_block=1, norm_num_groups=8),
        "temporal": dict(filters=32, num_res_blocks=1, num_groups=8),
    },
}


class SpatialKL(nn.Module):
    """The decoding half of diffusers ``AutoencoderKL`` (same names: ``post_quant_conv``, ``decoder``)."""

    def __init__(self, block_out_channels: tuple[int, ...], layers_per_block: int, norm_num_groups: int):
        super().__init__()
        n = len(block_out_channels)
        self.decoder = Decoder(
            in_channels=LATENT_CHANNELS,
            out_channels=3,
            up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=block_out_channels,
            layers_per_block=layers_per_block,
            norm_num_groups=norm_num_groups,
            act_fn="silu",
            mid_block_add_attention=True,
        )
        self.post_quant_conv = nn.Conv2d(LATENT_CHANNELS, LATENT_CHANNELS, 1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """``AutoencoderKL.decode(z).sample`` without tiling or slicing."""
        return self.decoder(self.post_quant_conv(z))


class SpatialVAE(nn.Module):
    """Upstream ``VideoAutoencoderKL``: holds the KL model as ``module``."""

    def __init__(self, **kwargs: Any):
        super().__init__()
        self.module = SpatialKL(**kwargs)


class OpenSoraVAE(nn.Module):
    """Upstream ``VideoAutoencoderPipeline``, decoding only: ``spatial_vae``, ``temporal_vae``, ``scale``,
    ``shift``."""

    def __init__(self, spatial: dict[str, Any], temporal: dict[str, Any]):
        super().__init__()
        self.spatial_vae = SpatialVAE(**spatial)
        self.temporal_vae = TemporalVAE(**temporal)
        self.register_buffer("scale", torch.tensor(SCALE)[None, :, None, None, None])
        self.register_buffer("shift", torch.tensor(SHIFT)[None, :, None, None, None])

    def temporal_call(self, carry: Carry) -> Carry:
        """One temporal-decoder call, whole: ``{"z", "num_frames"} -> {"frames"}`` (z still normalised)."""
        z = carry["z"]
        z = z * self.scale.to(z.dtype) + self.shift.to(z.dtype)
        return {"frames": self.temporal_vae.decode(z, carry["num_frames"])}

    def spatial_call(self, carry: Carry) -> Carry:
        """One 2D-decoder call, unpartitioned: ``{"latent": [N, 4, h, w]} -> {"rgb": [N, 3, 8h, 8w]}``."""
        return {"rgb": self.spatial_vae.module.decode(carry["latent"] / SPATIAL_FACTOR)}

    def decode(self, z: torch.Tensor, num_frames: int) -> torch.Tensor:
        """Normalised latent [B, 4, T, h, w] -> video [B, 3, num_frames, 8h, 8w]."""
        return decode_video(z, num_frames, self.temporal_call, self.spatial_call)


def build_vae(
    preset: str, *, seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> OpenSoraVAE:
    """The VAE decoders of ``preset`` in eval mode, seeded weights; ``device="meta"`` allocates nothing."""
    if preset not in VAE_PRESETS:
        raise ValueError(f"vae preset: expected one of {sorted(VAE_PRESETS)}, got {preset!r}")
    spec = VAE_PRESETS[preset]
    if torch.device(device).type == "meta":
        with torch.device("meta"):
            vae = OpenSoraVAE(spec["spatial"], spec["temporal"])
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            vae = OpenSoraVAE(spec["spatial"], spec["temporal"])
        vae = vae.to(device)
    return vae.to(dtype).eval()


# Encoder-side keys of the released pipeline checkpoint; decoding never uses them.
_ENCODER_PREFIXES = (
    "spatial_vae.module.encoder.",
    "spatial_vae.module.quant_conv.",
    "temporal_vae.encoder.",
    "temporal_vae.quant_conv.",
)


def load_checkpoint(vae: OpenSoraVAE, path: str | Path) -> None:
    """Load a released ``OpenSoraVAE_V1_2`` state dict (``.safetensors`` or torch pickle), strict on the
    decoder keys."""
    state = {k: v for k, v in read_state_dict(path).items() if not k.startswith(_ENCODER_PREFIXES)}
    load_strict(vae, state, path, "Open-Sora VAE decoders")


def decode_video(
    z: torch.Tensor,
    num_frames: int,
    temporal: Callable[[Carry], Carry],
    spatial: Callable[[Carry], Carry],
) -> torch.Tensor:
    """Upstream ``VideoAutoencoderPipeline.decode`` over carries: pieces or whole decoders plug in.

    ``temporal`` runs once per chunk of 5 latent frames (``{"z", "num_frames"} -> {"frames"}``), ``spatial``
    once per micro-batch of 4 frames (``{"latent"} -> {"rgb"}``); see ``vae_call_counts``.
    """
    micro_z = _latent_frames(MICRO_FRAME_SIZE)
    chunks = []
    remaining = num_frames
    for i in range(0, z.shape[2], micro_z):
        n = min(MICRO_FRAME_SIZE, remaining)
        chunks.append(temporal({"z": z[:, :, i : i + micro_z], "num_frames": n})["frames"])
        remaining -= MICRO_FRAME_SIZE
    x = torch.cat(chunks, dim=2)
    b, c, t, h, w = x.shape
    frames = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
    rgb = [
        spatial({"latent": frames[i : i + MICRO_BATCH_SIZE]})["rgb"]
        for i in range(0, b * t, MICRO_BATCH_SIZE)
    ]
    out = torch.cat(rgb, dim=0)
    return out.reshape(b, t, *out.shape[1:]).permute(0, 2, 1, 3, 4)


def _latent_frames(frames: int, factor: int = 4) -> int:
    return (frames + (-frames) % factor) // factor


def vae_latent_frames(frames: int) -> int:
    """Latent frames of a ``frames``-frame video (upstream ``get_latent_size``): 17 -> 5, 68 -> 20."""
    whole, rest = divmod(frames, MICRO_FRAME_SIZE)
    return whole * _latent_frames(MICRO_FRAME_SIZE) + (_latent_frames(rest) if rest else 0)


def vae_call_counts(frames: int, batch: int = 1) -> tuple[int, int]:
    """(temporal-decoder calls, 2D-decoder calls) for ``batch`` videos of ``frames`` frames: 68 -> (4, 17)."""
    return math.ceil(frames / MICRO_FRAME_SIZE), math.ceil(batch * frames / MICRO_BATCH_SIZE)


def _example(
    shape: tuple[int, ...], device: str | torch.device, dtype: torch.dtype, seed: int
) -> torch.Tensor:
    if torch.device(device).type == "meta":
        return torch.empty(shape, device="meta", dtype=dtype)
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=dtype).to(device)


def vae_temporal_inputs(
    *,
    batch: int = 1,
    height: int = 256,
    width: int = 256,
    num_frames: int = MICRO_FRAME_SIZE,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> Carry:
    """One temporal-decoder call's carry for a ``height`` x ``width`` video: ``{"z": [B, 4, t, H/8, W/8]``
    (normalised latent, t = latent frames of ``num_frames``: 17 -> 5), ``"num_frames": int}``."""
    t = _latent_frames(num_frames)
    shape = (batch, LATENT_CHANNELS, t, height // SPATIAL_DOWNSAMPLE, width // SPATIAL_DOWNSAMPLE)
    return {"z": _example(shape, device, dtype, seed), "num_frames": num_frames}


def vae_2d_inputs(
    *,
    frames: int = MICRO_BATCH_SIZE,
    height: int = 256,
    width: int = 256,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> Carry:
    """One 2D-decoder call's carry: ``{"latent": [frames, 4, H/8, W/8]}`` (temporal-decoder output frames)."""
    shape = (frames, LATENT_CHANNELS, height // SPATIAL_DOWNSAMPLE, width // SPATIAL_DOWNSAMPLE)
    return {"latent": _example(shape, device, dtype, seed)}


# ------------------------------------------------------------------------------------------------- the cut


@dataclass(frozen=True)
class _Unit:
    owns: tuple[str, ...]
    fn: Callable[[torch.Tensor, Carry], torch.Tensor]


@dataclass(frozen=True)
class _Group:
    units: list[_Unit]
    # Channels x frames x pixels (relative to the latent) of its res blocks' outputs; 0 = never split.
    activation: int


def _temporal_groups(vae: OpenSoraVAE) -> list[_Group]:
    tv, dec = vae.temporal_vae, vae.temporal_vae.decoder
    p = "temporal_vae.decoder"

    def stem(x: torch.Tensor, carry: Carry) -> torch.Tensor:
        x = x * vae.scale.to(x.dtype) + vae.shift.to(x.dtype)
        return dec.conv1(tv.post_quant_conv(x))

    def head(x: torch.Tensor, carry: Carry) -> torch.Tensor:
        return dec.head(x)[:, :, tv.time_padding(carry["num_frames"]) :]

    def res(block: nn.Module, level: int | None = None) -> Callable[[torch.Tensor, Carry], torch.Tensor]:
        if level is None:
            return lambda x, carry: block(x)
        return lambda x, carry: dec.upsample(level, block(x))

    stem_units = [_Unit(("scale", "shift", "temporal_vae.post_quant_conv", f"{p}.conv1"), stem)]
    stem_units += [_Unit((f"{p}.res_blocks.{j}",), res(b)) for j, b in enumerate(dec.res_blocks)]
    groups = [_Group(stem_units, dec.res_blocks[0].filters if len(dec.res_blocks) else 0)]
    t_scale = 1  # frames at this level relative to the latent
    for i in reversed(range(dec.num_blocks)):
        blocks = dec.block_res_blocks[i]
        units = []
        for j, b in enumerate(blocks):
            last = j == len(blocks) - 1 and i > 0
            owns = (f"{p}.block_res_blocks.{i}.{j}",) + ((f"{p}.conv_blocks.{i - 1}",) if last else ())
            units.append(_Unit(owns, res(b, i if last else None)))
        groups.append(_Group(units, blocks[-1].filters * t_scale))
        t_scale *= dec.t_stride(i)
    groups.append(_Group([_Unit((f"{p}.norm1", f"{p}.conv_out"), head)], 0))
    return groups


def _spatial_groups(vae: OpenSoraVAE) -> list[_Group]:
    kl = vae.spatial_vae.module
    dec = kl.decoder
    p = "spatial_vae.module"

    def stem(x: torch.Tensor, carry: Carry) -> torch.Tensor:
        return dec.conv_in(kl.post_quant_conv(x / SPATIAL_FACTOR))

    def head(x: torch.Tensor, carry: Carry) -> torch.Tensor:
        return dec.conv_out(dec.conv_act(dec.conv_norm_out(x)))

    def resnet(block: nn.Module, up: nn.Module | None) -> Callable[[torch.Tensor, Carry], torch.Tensor]:
        if up is None:
            return lambda x, carry: block(x, temb=None)
        return lambda x, carry: up(block(x, temb=None))

    width = dec.conv_in.out_channels
    groups = [
        _Group([_Unit((f"{p}.post_quant_conv", f"{p}.decoder.conv_in"), stem)], 0),
        _Group([_Unit((f"{p}.decoder.mid_block",), lambda x, carry: dec.mid_block(x, None))], width),
    ]
    pixels = 1  # pixels at this level relative to the latent
    for i, up_block in enumerate(dec.up_blocks):
        ups = up_block.upsamplers
        units = []
        for j, block in enumerate(up_block.resnets):
            last = j == len(up_block.resnets) - 1 and ups is not None
            owns = (f"{p}.decoder.up_blocks.{i}.resnets.{j}",)
            owns += (f"{p}.decoder.up_blocks.{i}.upsamplers",) if last else ()
            units.append(_Unit(owns, resnet(block, ups[0] if last else None)))
        groups.append(_Group(units, up_block.resnets[-1].out_channels * pixels))
        pixels *= 4 if ups is not None else 1
    groups.append(_Group([_Unit((f"{p}.decoder.conv_norm_out", f"{p}.decoder.conv_out"), head)], 0))
    return groups


def _cut(groups: list[_Group], pieces: int | None) -> list[list[_Unit]]:
    """Groups -> pieces. ``None``: split the hottest group (ties: the later) into units. ``n``: split groups,
    hottest first, until there are ``n`` pieces (the last one split into balanced runs of units)."""
    n_units = sum(len(g.units) for g in groups)
    if pieces is not None and not len(groups) <= pieces <= n_units:
        raise ValueError(f"pieces: expected {len(groups)}..{n_units} for this decoder, got {pieces}")
    order = sorted(range(len(groups)), key=lambda i: (groups[i].activation, i), reverse=True)
    parts = {i: 1 for i in range(len(groups))}
    if pieces is None:
        parts[order[0]] = len(groups[order[0]].units)
    else:
        extra = pieces - len(groups)
        for i in order:
            add = min(extra, len(groups[i].units) - 1)
            parts[i] += add
            extra -= add
    out: list[list[_Unit]] = []
    for i, g in enumerate(groups):
        base, rem = divmod(len(g.units), parts[i])
        start = 0
        for k in range(parts[i]):
            size = base + (1 if k < rem else 0)
            out.append(g.units[start : start + size])
            start += size
    return out


def _pieces(units: list[list[_Unit]], prefix: str, in_key: str, out_key: str) -> list[Piece]:
    def make(k: int, run: list[_Unit]) -> Callable[[Carry], Carry]:
        first, last = k == 0, k == len(units) - 1

        def forward(carry: Carry) -> Carry:
            x = carry[in_key if first else "x"]
            for unit in run:
                x = unit.fn(x, carry)
            out = {key: v for key, v in carry.items() if key not in (in_key, "x")}
            out[out_key if last else "x"] = x
            return out

        return forward

    return [
        Piece(f"{prefix}{k}", sum((u.owns for u in run), ()), make(k, run)) for k, run in enumerate(units)
    ]


def split_vae_temporal(vae: OpenSoraVAE, pieces: int | None = None) -> list[Piece]:
    """The temporal decoder as ``tdec0``..: carry ``{"z": [B, 4, t, h, w], "num_frames": int}`` -> ... ->
    ``{"frames": [B, 4, num_frames, h, w], "num_frames"}``; between pieces
    ``{"x": [B, C, t', h, w], "num_frames"}``. ``tdec0`` also de-normalises z and owns the ``scale``/``shift``
    buffers. Full preset: 9 pieces by default."""
    return _pieces(_cut(_temporal_groups(vae), pieces), "tdec", "z", "frames")


def split_vae_2d(vae: OpenSoraVAE, pieces: int | None = None) -> list[Piece]:
    """The 2D decoder as ``sdec0``..: carry ``{"latent": [N, 4, h, w]}`` -> ... ->
    ``{"rgb": [N, 3, 8h, 8w]}``; between pieces ``{"x": [N, C, h', w']}``. ``sdec0`` applies the 1/0.18215
    factor. Full preset: 9 pieces by default."""
    return _pieces(_cut(_spatial_groups(vae), pieces), "sdec", "latent", "rgb")
