"""Open-Sora v1.2 VAE decoders: sizes and keys on meta, On-device Sora's cut, pieces == whole (tiny)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

from cidl.runtime.models.piece import Carry, run_pieces
from cidl.runtime.models.vae import (
    VAE_PRESETS,
    build_vae,
    decode_video,
    load_checkpoint,
    split_vae_2d,
    split_vae_temporal,
    vae_2d_inputs,
    vae_call_counts,
    vae_latent_frames,
    vae_temporal_inputs,
)
from cidl.runtime.models.vae_temporal import depth_to_time

# Decoder parameters from layer shapes (shared/facts): both totals are the decoders alone; each VAE's 1x1
# post_quant_conv (4x4 + 4 = 20) sits outside them.
SPATIAL_DECODER = 49_490_179
TEMPORAL_DECODER = 165_265_924


def spatial_keys() -> set[str]:
    """diffusers AutoencoderKL decoder names (SDXL VAE: 4 up blocks of 3 resnets, mid block with one
    attention), under Open-Sora's ``spatial_vae.module`` (VideoAutoencoderKL.module = AutoencoderKL)."""
    conv = ("weight", "bias")
    resnet = [f"{m}.{w}" for m in ("norm1", "conv1", "norm2", "conv2") for w in conv]
    keys = {f"post_quant_conv.{w}" for w in conv}
    keys |= {f"decoder.{m}.{w}" for m in ("conv_in", "conv_norm_out", "conv_out") for w in conv}
    keys |= {f"decoder.mid_block.resnets.{i}.{r}" for i in range(2) for r in resnet}
    attn = ("group_norm", "to_q", "to_k", "to_v", "to_out.0")
    keys |= {f"decoder.mid_block.attentions.0.{m}.{w}" for m in attn for w in conv}
    keys |= {f"decoder.up_blocks.{i}.resnets.{j}.{r}" for i in range(4) for j in range(3) for r in resnet}
    keys |= {
        f"decoder.up_blocks.{i}.resnets.0.conv_shortcut.{w}" for i in (2, 3) for w in conv
    }  # 512->256->128
    keys |= {f"decoder.up_blocks.{i}.upsamplers.0.conv.{w}" for i in range(3) for w in conv}
    return {f"spatial_vae.module.{k}" for k in keys}


def temporal_keys() -> set[str]:
    """Upstream v1.2.0 ``vae_temporal.py`` Decoder names (CausalConv3d wraps ``conv``; res-block convs have no
    bias; conv3 is the 1x1x1 shortcut where the width changes; conv_blocks.0 is an Identity), plus the
    pipeline's ``scale``/``shift`` buffers (VideoAutoencoderPipeline)."""
    res = [
        "norm1.weight",
        "norm1.bias",
        "conv1.conv.weight",
        "norm2.weight",
        "norm2.bias",
        "conv2.conv.weight",
    ]
    keys = {"post_quant_conv.conv.weight", "post_quant_conv.conv.bias"}
    keys |= {f"decoder.{m}.conv.{w}" for m in ("conv1", "conv_out") for w in ("weight", "bias")}
    keys |= {"decoder.norm1.weight", "decoder.norm1.bias"}
    keys |= {f"decoder.res_blocks.{j}.{r}" for j in range(4) for r in res}
    keys |= {f"decoder.block_res_blocks.{i}.{j}.{r}" for i in range(4) for j in range(4) for r in res}
    keys |= {f"decoder.block_res_blocks.{i}.0.conv3.conv.weight" for i in (0, 2)}  # 256->128, 512->256
    keys |= {f"decoder.conv_blocks.{i}.conv.{w}" for i in (1, 2) for w in ("weight", "bias")}
    return {f"temporal_vae.{k}" for k in keys} | {"scale", "shift"}


@pytest.fixture(scope="module")
def full() -> torch.nn.Module:
    return build_vae("full", device="meta")


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    return build_vae("tiny", seed=0)


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_full_decoder_sizes(full: torch.nn.Module) -> None:
    assert count(full.spatial_vae.module.decoder) == SPATIAL_DECODER
    assert count(full.temporal_vae.decoder) == TEMPORAL_DECODER
    assert count(full.spatial_vae.module.post_quant_conv) == count(full.temporal_vae.post_quant_conv) == 20
    assert count(full) == SPATIAL_DECODER + TEMPORAL_DECODER + 40


def test_full_keys_match_upstream(full: torch.nn.Module) -> None:
    state = full.state_dict()
    assert set(state) == spatial_keys() | temporal_keys()
    assert state["temporal_vae.decoder.conv_blocks.2.conv.weight"].shape == (1024, 512, 3, 3, 3)
    assert state["temporal_vae.decoder.conv1.conv.weight"].shape == (512, 4, 3, 3, 3)
    assert state["spatial_vae.module.decoder.conv_in.weight"].shape == (512, 4, 3, 3)
    assert state["scale"].shape == state["shift"].shape == (1, 4, 1, 1, 1)


def owns(pieces: list, module: torch.nn.Module) -> dict[str, list[str]]:
    return {p.name: p.param_names(module) for p in pieces}


def test_full_cut_is_on_device_soras(full: torch.nn.Module) -> None:
    t = split_vae_temporal(full)
    assert [p.name for p in t] == [f"tdec{i}" for i in range(9)]
    # part1 (de-normalise, post_quant_conv, conv1, res_blocks), part2_1, part2_2, part2_3_1..4, part2_4,
    # part3.
    assert t[0].owns[:4] == ("scale", "shift", "temporal_vae.post_quant_conv", "temporal_vae.decoder.conv1")
    assert (
        t[1].owns[-1] == "temporal_vae.decoder.conv_blocks.2"
        and t[2].owns[-1] == "temporal_vae.decoder.conv_blocks.1"
    )
    assert [p.owns[0] for p in t[3:7]] == [f"temporal_vae.decoder.block_res_blocks.1.{j}" for j in range(4)]
    assert len(t[7].owns) == 4 and t[8].owns == (
        "temporal_vae.decoder.norm1",
        "temporal_vae.decoder.conv_out",
    )
    s = split_vae_2d(full)
    assert [p.name for p in s] == [f"sdec{i}" for i in range(9)]
    # part1 (post_quant_conv, conv_in), part2 (mid), part3_1..3 (up blocks 0-2), part3_4_1..3 (resnets),
    # part4.
    dec = "spatial_vae.module.decoder"
    assert s[1].owns == (f"{dec}.mid_block",)
    assert [p.owns[-1] for p in s[2:5]] == [f"{dec}.up_blocks.{i}.upsamplers" for i in range(3)]
    assert [p.owns for p in s[5:8]] == [(f"{dec}.up_blocks.3.resnets.{j}",) for j in range(3)]


@pytest.mark.parametrize("pieces", [None, 7, 9, 12, 15])
def test_every_key_in_exactly_one_piece(full: torch.nn.Module, pieces: int | None) -> None:
    cut = split_vae_temporal(full, pieces) + split_vae_2d(full, pieces)
    owned = [k for k in sum(owns(cut, full).values(), [])]
    assert sorted(owned) == sorted(full.state_dict())
    if pieces is not None:
        assert len(cut) == 2 * pieces


def test_piece_count_out_of_range(tiny: torch.nn.Module) -> None:
    with pytest.raises(ValueError, match="pieces: expected 6..7"):
        split_vae_temporal(tiny, 9)


def test_full_pieces_run_on_meta(full: torch.nn.Module) -> None:
    carry = vae_temporal_inputs(batch=1, height=256, width=256, device="meta")
    shapes = []
    with torch.no_grad():
        for piece in split_vae_temporal(full):
            carry = piece(carry)
            shapes.append(tuple((carry.get("x") if "x" in carry else carry["frames"]).shape))
    assert shapes[0] == (1, 512, 5, 32, 32) and shapes[1] == (1, 512, 10, 32, 32)
    assert shapes[2] == (1, 256, 20, 32, 32) and shapes[-1] == (1, 4, 17, 32, 32)
    carry = vae_2d_inputs(frames=4, height=256, width=256, device="meta")
    with torch.no_grad():
        carry = run_pieces(split_vae_2d(full), carry)
    assert carry["rgb"].shape == (4, 3, 256, 256) and carry["rgb"].device.type == "meta"


@pytest.mark.parametrize("pieces", [None, 7])
def test_temporal_pieces_equal_whole(tiny: torch.nn.Module, pieces: int | None) -> None:
    carry = vae_temporal_inputs(batch=2, height=64, width=48, seed=1)
    assert carry["z"].shape == (2, 4, 5, 8, 6) and carry["num_frames"] == 17
    with torch.no_grad():
        z = carry["z"] * tiny.scale + tiny.shift  # upstream: z * scale + shift, then decode with time crop
        expected = tiny.temporal_vae.decode(z, num_frames=17)
        out = run_pieces(split_vae_temporal(tiny, pieces), dict(carry))["frames"]
    assert expected.shape == (2, 4, 17, 8, 6) and torch.isfinite(expected).all()
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("pieces", [None, 9])
def test_2d_pieces_equal_diffusers_autoencoder(tiny: torch.nn.Module, pieces: int | None) -> None:
    spec = VAE_PRESETS["tiny"]["spatial"]
    ae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        **spec,
    ).eval()
    missing, unexpected = ae.load_state_dict(tiny.spatial_vae.module.state_dict(), strict=False)
    assert not unexpected and all(k.startswith(("encoder.", "quant_conv.")) for k in missing)
    carry = vae_2d_inputs(frames=4, height=64, width=48, seed=2)
    with torch.no_grad():
        expected = ae.decode(carry["latent"] / 0.18215).sample  # upstream VideoAutoencoderKL.decode
        out = run_pieces(split_vae_2d(tiny, pieces), dict(carry))["rgb"]
    assert expected.shape == (4, 3, 64, 48) and torch.isfinite(expected).all()
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_pipeline_decode_chunk_shape_and_pieces(tiny: torch.nn.Module) -> None:
    z = vae_temporal_inputs(batch=1, height=32, width=32, seed=3)["z"]
    with torch.no_grad():
        video = tiny.decode(z, num_frames=17)
        t, s = split_vae_temporal(tiny), split_vae_2d(tiny)
        by_pieces = decode_video(z, 17, lambda c: run_pieces(t, c), lambda c: run_pieces(s, c))
    assert video.shape == (1, 3, 17, 32, 32)
    torch.testing.assert_close(by_pieces, video, rtol=0, atol=1e-5)


def test_68_frames_make_4_temporal_and_17_2d_calls(tiny: torch.nn.Module) -> None:
    assert (
        vae_call_counts(68) == (4, 17)
        and vae_call_counts(51) == (3, 13)
        and vae_call_counts(68, batch=2) == (4, 34)
    )
    assert [vae_latent_frames(f) for f in (17, 51, 68, 102)] == [5, 15, 20, 30]
    calls: dict[str, list[tuple[int, ...]]] = {"t": [], "s": []}

    def temporal(c: Carry) -> Carry:
        calls["t"].append(tuple(c["z"].shape))
        return tiny.temporal_call(c)

    def spatial(c: Carry) -> Carry:
        calls["s"].append(tuple(c["latent"].shape))
        return tiny.spatial_call(c)

    z = torch.randn(1, 4, vae_latent_frames(68), 2, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        video = decode_video(z, 68, temporal, spatial)
    assert video.shape == (1, 3, 68, 16, 16)
    assert calls["t"] == [(1, 4, 5, 2, 2)] * 4 and calls["s"] == [(4, 4, 2, 2)] * 17


def test_weights_seeded_and_small_store_small() -> None:
    a, b = build_vae("tiny", seed=5), build_vae("tiny", seed=5)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert not torch.equal(
        a.temporal_vae.decoder.conv1.conv.weight,
        build_vae("tiny", seed=6).temporal_vae.decoder.conv1.conv.weight,
    )
    assert count(build_vae("small", device="meta")) * 4 < 200e6


def test_load_checkpoint_drops_encoder_and_is_strict(tiny: torch.nn.Module, tmp_path: Path) -> None:
    state = {k: v.clone() for k, v in tiny.state_dict().items()}
    state["temporal_vae.encoder.conv_in.conv.weight"] = torch.zeros(1)
    state["spatial_vae.module.quant_conv.weight"] = torch.zeros(1)
    path = tmp_path / "vae.safetensors"
    save_file(state, str(path))
    other = build_vae("tiny", seed=7)
    load_checkpoint(other, path)
    assert torch.equal(
        other.temporal_vae.decoder.conv_out.conv.weight, tiny.temporal_vae.decoder.conv_out.conv.weight
    )
    del state["shift"]
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=r"bad\.safetensors.*'shift'"):
        load_checkpoint(other, tmp_path / "bad.safetensors")


def test_depth_to_time_matches_upstream_rearrange() -> None:
    # einops "B (C ts) T H W -> B C (T ts) H W": channel c*ts + s of frame t -> channel c of frame t*ts + s.
    x = torch.arange(2 * 6 * 3 * 2 * 1, dtype=torch.float32).reshape(2, 6, 3, 2, 1)
    y = depth_to_time(x, 2)
    assert y.shape == (2, 3, 6, 2, 1)
    for c in range(3):
        for t in range(3):
            for s in range(2):
                assert torch.equal(y[:, c, t * 2 + s], x[:, c * 2 + s, t])
