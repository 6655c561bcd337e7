"""T5 v1.1 XXL encoder: exact sizes and checkpoint keys on meta; the block cut equals the whole (tiny)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch.utils.flop_counter import FlopCounterMode

from cidl.runtime.models.piece import run_pieces
from cidl.runtime.models.t5 import build_t5, load_checkpoint, split_t5, t5_config, t5_inputs

# Parameter counts from layer shapes (shared/facts/open-sora-v1.2-models.md); the relative-attention-bias
# table (32 buckets x 64 heads) lives in encoder block 0 only.
FULL_TOTAL = 4_762_310_656
FULL_BLOCK = 192_946_176
FULL_EMBED = 131_596_288
BIAS_TABLE = 32 * 64

# Per-block keys of a released T5 v1.1 encoder (google/t5-v1_1-xxl's T5ForConditionalGeneration state dict,
# encoder half; DeepFloyd/t5-v1_1-xxl ships that half as T5EncoderModel): transformers' T5 module names,
# gated FFN (wi_0/wi_1) of v1.1, no biases, RMSNorm with weight only.
BLOCK_KEYS = (
    "layer.0.SelfAttention.q.weight",
    "layer.0.SelfAttention.k.weight",
    "layer.0.SelfAttention.v.weight",
    "layer.0.SelfAttention.o.weight",
    "layer.0.layer_norm.weight",
    "layer.1.DenseReluDense.wi_0.weight",
    "layer.1.DenseReluDense.wi_1.weight",
    "layer.1.DenseReluDense.wo.weight",
    "layer.1.layer_norm.weight",
)


def released_keys(layers: int) -> set[str]:
    # shared.weight and encoder.embed_tokens.weight are one tied tensor; torch.save'd checkpoints hold both.
    keys = {"shared.weight", "encoder.embed_tokens.weight", "encoder.final_layer_norm.weight"}
    keys.add("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    keys |= {f"encoder.block.{i}.{k}" for i in range(layers) for k in BLOCK_KEYS}
    return keys


@pytest.fixture(scope="module")
def full() -> torch.nn.Module:
    return build_t5("full", device="meta")


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    return build_t5("tiny", seed=0)


def numel(model: torch.nn.Module, keys: list[str]) -> int:
    state = model.state_dict(keep_vars=True)
    seen: dict[int, int] = {}
    for k in keys:  # count a tied tensor once
        seen[id(state[k])] = state[k].numel()
    return sum(seen.values())


def test_full_sizes_match_t5_v1_1_xxl(full: torch.nn.Module) -> None:
    assert sum(p.numel() for p in full.parameters()) == FULL_TOTAL
    pieces = split_t5(full)
    sizes = {p.name: numel(full, p.param_names(full)) for p in pieces}
    assert sizes["embed"] == FULL_EMBED
    assert sizes["block00"] == FULL_BLOCK + BIAS_TABLE
    assert {sizes[f"block{i:02d}"] for i in range(1, 24)} == {FULL_BLOCK}
    assert sizes["final_norm"] == 4096
    assert sum(sizes.values()) == FULL_TOTAL


def test_full_keys_match_release(full: torch.nn.Module) -> None:
    state = full.state_dict()
    assert set(state) == released_keys(24)
    assert state["encoder.block.7.layer.1.DenseReluDense.wi_0.weight"].shape == (10240, 4096)
    assert state["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape == (32, 64)
    assert state["shared.weight"].shape == (32128, 4096)
    assert full.shared.weight is full.encoder.embed_tokens.weight


@pytest.mark.parametrize("layers_per_block", [1, 2, 5])
def test_every_key_in_exactly_one_piece(full: torch.nn.Module, layers_per_block: int) -> None:
    pieces = split_t5(full, layers_per_block)
    owned = [k for p in pieces for k in p.param_names(full)]
    assert sorted(owned) == sorted(full.state_dict())
    blocks = [p for p in pieces if p.name.startswith("block")]
    assert len(blocks) == -(-24 // layers_per_block)
    assert [p.name for p in pieces][0] == "embed" and pieces[-1].name == "final_norm"
    assert blocks[-1].owns[-1] == "encoder.block.23"


def test_pieces_run_on_meta_and_carry_the_bias(full: torch.nn.Module) -> None:
    carry = t5_inputs(full.config, batch=2, tokens=300, device="meta")
    flops = []
    with torch.no_grad():
        for piece in split_t5(full):
            with FlopCounterMode(display=False) as counter:
                carry = piece(carry)
            flops.append(counter.get_total_flops())
            if piece.name.startswith("block"):
                assert carry["position_bias"].shape == (2, 64, 300, 300)
    assert carry["text"].shape == (2, 300, 4096) and carry["text"].device.type == "meta"
    assert carry["mask"].shape == (2, 300)
    # Linear layers of one block: 2 * tokens * (4 d^2 + 3 d d_ff); attention adds 4 * H * L^2 * d_kv.
    linear = 2 * 600 * (4 * 4096**2 + 3 * 4096 * 10240)
    assert flops[2] == linear + 2 * 2 * 2 * 64 * 300 * 300 * 64


@pytest.mark.parametrize("layers_per_block", [1, 2, 3])
def test_pieces_equal_whole_encoder_with_padding(tiny: torch.nn.Module, layers_per_block: int) -> None:
    carry = t5_inputs(tiny.config, batch=3, tokens=24, seed=1)
    assert carry["attention_mask"].sum(1).tolist() == [24, 20, 16]
    with torch.no_grad():
        expected = tiny(
            input_ids=carry["input_ids"], attention_mask=carry["attention_mask"]
        ).last_hidden_state
        out = run_pieces(split_t5(tiny, layers_per_block), dict(carry))
    assert torch.isfinite(expected).all() and expected.abs().max() > 0.1
    torch.testing.assert_close(out["text"], expected, rtol=0, atol=1e-5)
    assert torch.equal(out["mask"], carry["attention_mask"])


def test_padding_is_masked_in_every_block(tiny: torch.nn.Module) -> None:
    carry = t5_inputs(tiny.config, batch=2, tokens=16, seed=2)
    other = dict(carry, input_ids=carry["input_ids"].clone())
    other["input_ids"][1, 12:] = 7  # row 1 keeps 12 tokens; change only its padding
    with torch.no_grad():
        a = run_pieces(split_t5(tiny), dict(carry))["text"]
        b = run_pieces(split_t5(tiny), other)["text"]
    torch.testing.assert_close(a[1, :12], b[1, :12], rtol=0, atol=1e-6)
    assert not torch.allclose(a[1, 12:], b[1, 12:])


def test_weights_are_seeded_and_leave_global_rng_alone() -> None:
    state = torch.random.get_rng_state()
    a, b, c = build_t5("tiny", seed=3), build_t5("tiny", seed=3), build_t5("tiny", seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert not torch.equal(a.shared.weight, c.shared.weight)


def test_presets_match_stdit_caption_channels() -> None:
    assert [t5_config(p).d_model for p in ("full", "small", "tiny")] == [4096, 512, 256]
    small = build_t5("small", device="meta")
    assert sum(p.numel() for p in small.parameters()) * 4 < 150e6
    with pytest.raises(ValueError, match="t5 preset"):
        t5_config("huge")


def test_load_checkpoint_roundtrip_and_strictness(tiny: torch.nn.Module, tmp_path: Path) -> None:
    # A released encoder may store the tied embedding under one name only, and a full T5 its decoder too.
    state = {k: v.clone() for k, v in tiny.state_dict().items() if k != "encoder.embed_tokens.weight"}
    state["decoder.final_layer_norm.weight"] = torch.ones(256)
    path = tmp_path / "t5.safetensors"
    save_file(state, str(path))
    other = build_t5("tiny", seed=9)
    load_checkpoint(other, path)
    carry = t5_inputs(tiny.config, batch=1, tokens=8)
    with torch.no_grad():
        torch.testing.assert_close(other(**carry).last_hidden_state, tiny(**carry).last_hidden_state)
    del state["encoder.final_layer_norm.weight"]
    bad = tmp_path / "bad.safetensors"
    save_file(state, str(bad))
    with pytest.raises(ValueError, match=r"bad\.safetensors.*encoder\.final_layer_norm\.weight"):
        load_checkpoint(other, bad)


def test_checkpoint_loads_onto_meta_and_shape_mismatch_is_one_line(tiny: torch.nn.Module, tmp_path: Path) -> None:
    state = {k: v.clone() for k, v in tiny.state_dict().items() if k != "encoder.embed_tokens.weight"}
    good = tmp_path / "t5.pt"
    torch.save({"state_dict": state}, good)  # a training checkpoint: nested under state_dict
    on_meta = build_t5("tiny", device="meta")
    load_checkpoint(on_meta, good)
    assert not any(p.is_meta for p in on_meta.parameters())
    assert on_meta.shared.weight is on_meta.encoder.embed_tokens.weight  # the tie survives assignment
    state["encoder.final_layer_norm.weight"] = torch.ones(7)
    bad = tmp_path / "bad.safetensors"
    save_file(state, str(bad))
    with pytest.raises(ValueError, match=r"bad\.safetensors: not a T5 encoder checkpoint: .*size mismatch"):
        load_checkpoint(build_t5("tiny"), bad)
