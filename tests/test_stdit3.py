"""STDiT3: exact architecture (meta device), partition, TDTM, checkpoints (tiny preset on CPU)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch.utils.flop_counter import FlopCounterMode

from cidl.runtime.models.piece import run_pieces
from cidl.runtime.models.stdit3 import (
    STDIT3_PRESETS,
    STDiT3,
    build_stdit3,
    load_checkpoint,
    merged_frames,
    rope_tables,
    split_stdit3,
    stdit3_inputs,
)
from cidl.runtime.models.stdit3_layers import _merge, _unmerge

# Expected state-dict keys and shapes of the released STDiT3-XL/2, read off hpcaitech/Open-Sora tag v1.2.0
# (commit 17cce908b22283acc3c946816c81f46dd442a453): opensora/models/stdit/stdit3.py (STDiT3, STDiT3Block),
# opensora/models/layers/blocks.py (PatchEmbed3D, TimestepEmbedder, SizeEmbedder, CaptionEmbedder with its
# registered ``y_embedding`` buffer, Attention with LlamaRMSNorm q/k norms, MultiHeadCrossAttention,
# T2IFinalLayer, timm Mlp fc1/fc2) and rotary_embedding_torch 0.5.3 (``freqs`` is an nn.Parameter; its
# other buffers are non-persistent). LayerNorms have no affine parameters; PositionEmbedding2D has none.
FULL_TOP_LEVEL = {
    "rope.freqs": (36,),
    "x_embedder.proj.weight": (1152, 4, 1, 2, 2),
    "x_embedder.proj.bias": (1152,),
    "t_embedder.mlp.0.weight": (1152, 256),
    "t_embedder.mlp.0.bias": (1152,),
    "t_embedder.mlp.2.weight": (1152, 1152),
    "t_embedder.mlp.2.bias": (1152,),
    "fps_embedder.mlp.0.weight": (1152, 256),
    "fps_embedder.mlp.0.bias": (1152,),
    "fps_embedder.mlp.2.weight": (1152, 1152),
    "fps_embedder.mlp.2.bias": (1152,),
    "t_block.1.weight": (6912, 1152),
    "t_block.1.bias": (6912,),
    "y_embedder.y_embedding": (300, 4096),
    "y_embedder.y_proj.fc1.weight": (1152, 4096),
    "y_embedder.y_proj.fc1.bias": (1152,),
    "y_embedder.y_proj.fc2.weight": (1152, 1152),
    "y_embedder.y_proj.fc2.bias": (1152,),
    "final_layer.scale_shift_table": (2, 1152),
    "final_layer.linear.weight": (32, 1152),
    "final_layer.linear.bias": (32,),
}
FULL_PER_BLOCK = {
    "scale_shift_table": (6, 1152),
    "attn.qkv.weight": (3456, 1152),
    "attn.qkv.bias": (3456,),
    "attn.q_norm.weight": (72,),
    "attn.k_norm.weight": (72,),
    "attn.proj.weight": (1152, 1152),
    "attn.proj.bias": (1152,),
    "cross_attn.q_linear.weight": (1152, 1152),
    "cross_attn.q_linear.bias": (1152,),
    "cross_attn.kv_linear.weight": (2304, 1152),
    "cross_attn.kv_linear.bias": (2304,),
    "cross_attn.proj.weight": (1152, 1152),
    "cross_attn.proj.bias": (1152,),
    "mlp.fc1.weight": (4608, 1152),
    "mlp.fc1.bias": (4608,),
    "mlp.fc2.weight": (1152, 4608),
    "mlp.fc2.bias": (1152,),
}


@pytest.fixture(scope="module")
def full() -> STDiT3:
    return build_stdit3("full", device="meta")


@pytest.fixture(scope="module")
def tiny() -> STDiT3:
    return build_stdit3("tiny", seed=0)


def _inputs(t: int = 5, h: int = 8, w: int = 8, batch: int = 2) -> dict:
    return stdit3_inputs("tiny", batch=batch, frames_latent=t, height_latent=h, width_latent=w, seed=1)


def _call(model: STDiT3, carry: dict, **kw) -> torch.Tensor:
    return model(**{k: v for k, v in carry.items() if k != "tdtm"}, **kw)


def test_full_parameter_counts(full: STDiT3) -> None:
    assert sum(p.numel() for p in full.parameters()) == 1_207_643_972
    for blocks in (full.spatial_blocks, full.temporal_blocks):
        assert all(sum(p.numel() for p in b.parameters()) == 21_255_696 for b in blocks)
    in_blocks = {id(p) for b in [*full.spatial_blocks, *full.temporal_blocks] for p in b.parameters()}
    assert sum(p.numel() for p in full.parameters() if id(p) not in in_blocks) == 17_324_996
    block = full.spatial_blocks[0]
    assert sum(p.numel() for p in block.attn.parameters()) == 5_313_168
    assert sum(p.numel() for p in block.cross_attn.parameters()) == 5_313_024
    assert sum(p.numel() for p in block.mlp.parameters()) == 10_622_592
    # The null caption is a buffer (in the state dict, not a parameter); the RoPE frequencies a parameter.
    params = dict(full.named_parameters())
    assert "y_embedder.y_embedding" not in params and "rope.freqs" in params


def test_full_state_dict_keys_match_upstream(full: STDiT3) -> None:
    expected = dict(FULL_TOP_LEVEL)
    for i in range(28):
        for kind in ("spatial", "temporal"):
            expected.update({f"{kind}_blocks.{i}.{k}": s for k, s in FULL_PER_BLOCK.items()})
    got = {k: tuple(v.shape) for k, v in full.state_dict().items()}
    assert got == expected


def test_pieces_equal_model(tiny: STDiT3) -> None:
    carry = _inputs()
    assert carry["mask"].sum(dim=1).tolist() == [32, 24]  # sample 1 has padded text tokens
    ref = _call(tiny, carry)
    assert ref.shape == (2, 8, 5, 8, 8) and torch.isfinite(ref).all() and ref.abs().mean() > 0.1
    for k, names in ((1, ["part1", "block00", "block01", "part2"]), (2, ["part1", "block00", "part2"])):
        pieces = split_stdit3(tiny, layers_per_block=k)
        assert [p.name for p in pieces] == names
        out = run_pieces(pieces, dict(carry))["out"]
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_padded_text_tokens_are_ignored(tiny: STDiT3) -> None:
    carry = _inputs()
    ref = _call(tiny, carry)
    y = carry["y"].clone()
    y[1, :, 24:] = 100.0  # only sample 1's padded tokens
    torch.testing.assert_close(_call(tiny, {**carry, "y": y}), ref, rtol=0, atol=0)
    y[1, :, 23] = 100.0  # a valid token does matter
    assert not torch.allclose(_call(tiny, {**carry, "y": y}), ref)


@pytest.mark.parametrize("k", [1, 3])
def test_every_key_owned_by_exactly_one_piece(full: STDiT3, k: int) -> None:
    pieces = split_stdit3(full, layers_per_block=k)
    assert len(pieces) == 2 + math.ceil(28 / k)
    assert pieces[1].name == "block00" and pieces[-2].name == f"block{math.ceil(28 / k) - 1:02d}"
    owned = [key for p in pieces for key in p.param_names(full)]
    assert sorted(owned) == sorted(full.state_dict().keys())
    assert len(owned) == len(set(owned))
    assert "rope.freqs" in pieces[0].param_names(full)
    assert pieces[-1].param_names(full) == [k for k in FULL_TOP_LEVEL if k.startswith("final_layer")]


def test_pieces_run_on_meta_and_tdtm_cuts_flops(full: STDiT3) -> None:
    def flops(tdtm: bool) -> list[int]:
        carry = stdit3_inputs("full", batch=2, frames_latent=20, height_latent=32, width_latent=32,
                              device="meta", tdtm=tdtm)
        counts = []
        for piece in split_stdit3(full):
            with FlopCounterMode(display=False) as fc:
                carry = piece(carry)
            counts.append(fc.get_total_flops())
        assert carry["out"].shape == (2, 8, 20, 32, 32) and carry["out"].is_meta
        return counts

    plain, merged = flops(False), flops(True)
    assert plain[1] > 0 and all(c == plain[1] for c in plain[1:-1])  # blocks cost the same
    assert merged[0] == plain[0] and merged[-1] == plain[-1]
    assert 0.4 * plain[1] < merged[1] < 0.9 * plain[1]


def test_tdtm_switch(tiny: STDiT3) -> None:
    carry = _inputs(t=5)
    ref = _call(tiny, carry)
    assert torch.equal(_call(tiny, carry, tdtm=False), ref)
    assert torch.equal(run_pieces(split_stdit3(tiny), {**carry, "tdtm": False})["out"], ref)
    merged = _call(tiny, carry, tdtm=True)
    assert merged.shape == ref.shape and torch.isfinite(merged).all()
    assert (merged - ref).abs().max() > 1e-3
    torch.testing.assert_close(run_pieces(split_stdit3(tiny), {**carry, "tdtm": True})["out"], merged)
    even = _inputs(t=4)
    assert _call(tiny, even, tdtm=True).shape == (2, 8, 4, 8, 8)


def test_merge_groups_pairs_and_keeps_odd_last_frame() -> None:
    x = torch.arange(5.0).view(1, 5, 1, 1).expand(1, 5, 2, 3)
    m = _merge(x)
    assert merged_frames(5) == 3 and merged_frames(20) == 10 and merged_frames(15) == 8
    assert m[0, :, 0, 0].tolist() == [0.5, 2.5, 4.0]
    assert _unmerge(m, 5)[0, :, 0, 0].tolist() == [0.5, 0.5, 2.5, 2.5, 4.0]
    pairs = torch.randn(2, 3, 4, 8).repeat_interleave(2, dim=1)  # frames 0=1, 2=3, 4=5
    assert torch.equal(_unmerge(_merge(pairs), 6), pairs)


def test_rope_rotates_adjacent_pairs_by_position() -> None:
    freqs = torch.tensor([1.0, 0.1])
    cos, sin = rope_tables(freqs, 3)
    q = torch.tensor([1.0, 2.0, 3.0, 4.0])
    rot = q * cos[2] + torch.stack([-q[1::2], q[0::2]], dim=-1).flatten() * sin[2]
    expected = torch.view_as_real(torch.view_as_complex(q.view(2, 2)) * torch.polar(torch.ones(2), 2 * freqs))
    torch.testing.assert_close(rot, expected.flatten())


def test_pos_embed_matches_upstream_grid_order(tiny: STDiT3) -> None:
    h, w, scale, base = 3, 5, 0.5, 4
    emb = tiny.pos_embed(h, w, scale, base, torch.device("cpu"), torch.float32)[0]
    # upstream PositionEmbedding2D._get_cached_emb, verbatim in spirit
    grid_h = torch.arange(h) / scale * (base / h)
    grid_w = torch.arange(w) / scale * (base / w)
    gh, gw = torch.meshgrid(grid_w, grid_h, indexing="ij")
    gh, gw = gh.t().reshape(-1), gw.t().reshape(-1)
    inv = 1.0 / (10000 ** (torch.arange(0, 128, 2).float() / 128))

    def sincos(p: torch.Tensor) -> torch.Tensor:
        o = torch.einsum("i,d->id", p, inv)
        return torch.cat([o.sin(), o.cos()], dim=-1)

    torch.testing.assert_close(emb, torch.cat([sincos(gh), sincos(gw)], dim=-1))


def test_build_is_deterministic_and_presets_fit() -> None:
    a, b, c = (build_stdit3("tiny", seed=s) for s in (0, 0, 1))
    pairs = zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    assert all(torch.equal(x, y) for x, y in pairs)
    assert not torch.equal(a.spatial_blocks[0].attn.qkv.weight, c.spatial_blocks[0].attn.qkv.weight)
    torch.testing.assert_close(a.rope.freqs, 1.0 / 10000 ** (torch.arange(0, 64, 2).float() / 64))
    tiny = STDIT3_PRESETS["tiny"]
    assert tiny.hidden_size >= 256
    assert all(m.weight.numel() >= 2048 for m in a.modules() if isinstance(m, torch.nn.Linear))
    small = build_stdit3("small", device="meta")
    assert sum(t.numel() for t in small.state_dict().values()) * 4 < 200e6
    for name, cfg in STDIT3_PRESETS.items():
        assert cfg.caption_channels == {"full": 4096, "small": 512, "tiny": 256}[name]


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_checkpoint_round_trip_strict(tiny: STDiT3, tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"ckpt{suffix}"
    state = {k: v.contiguous() for k, v in tiny.state_dict().items()}
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    other = load_checkpoint(build_stdit3("tiny", seed=7), path)
    carry = _inputs()
    assert torch.equal(_call(other, carry), _call(tiny, carry))
    on_meta = load_checkpoint(build_stdit3("tiny", device="meta"), path)
    assert torch.equal(_call(on_meta, carry), _call(tiny, carry))


def test_checkpoint_with_missing_key_is_refused(tiny: STDiT3, tmp_path: Path) -> None:
    state = {k: v.contiguous() for k, v in tiny.state_dict().items() if k != "rope.freqs"}
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="bad.safetensors.*rope.freqs"):
        load_checkpoint(build_stdit3("tiny"), tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="expected one of"):
        build_stdit3("huge")
