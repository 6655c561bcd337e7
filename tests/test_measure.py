"""cidl.runtime.measure: FLOPs and live bytes per piece, on meta and on real CPU tensors, and weight bytes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cidl.runtime.measure import (
    count_flops,
    measure_pieces,
    piece_params,
    piece_weight_bytes,
)
from cidl.runtime.models.piece import Carry, Piece

B, N, D, H = 2, 6, 64, 256  # batch, tokens, width, hidden
F32 = 4


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(D, H)  # 16384 weights: int8
        self.down = nn.Linear(H, D)
        self.norm = nn.LayerNorm(D)  # 1-D: fp32
        self.head = nn.Linear(D, 16)  # 1024 weights (< 2048): fp32
        self.register_buffer("table", torch.zeros(4, D))  # persistent buffer: stored, not a parameter


def toy_pieces(m: Toy) -> list[Piece]:
    def up(c: Carry) -> Carry:
        y = m.up(c["x"])  # [B, N, H], alive until return
        z = F.gelu(y)
        return {"h": z}

    def views(c: Carry) -> Carry:
        x = c["h"]
        v = x.view(B, N, H // 8, 8).transpose(1, 2)  # a view: no bytes
        v.mul_(2.0)  # in place on the input's storage: no bytes
        r = v.sum(-1)  # [B, H/8, N]
        return {"h": x, "r": r}

    def rebinding(c: Carry) -> Carry:
        x = c["h"]
        a = x * 2
        del a  # dropped before the next allocation
        t = x + 1
        for _ in range(3):
            t = t + 1  # the new tensor exists before the old one is dropped: 2 alive at the peak
        return {"h": t}

    def attend(c: Carry) -> Carry:
        x = c["h"].view(B, N, 4, H // 4).transpose(1, 2)  # [B, 4, N, 64]
        o = F.scaled_dot_product_attention(x, x, x)
        return {"x": m.down(o.transpose(1, 2).reshape(B, N, H))}

    return [Piece("up", ("up",), up), Piece("views", (), views), Piece("rebinding", (), rebinding),
            Piece("attend", ("down",), attend), Piece("rest", ("norm", "head", "table"), lambda c: c)]


def _toy(device: str) -> tuple[Toy, list[Piece]]:
    torch.manual_seed(0)
    m = Toy().to(device).eval().requires_grad_(False)
    return m, toy_pieces(m)


@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_toy_live_bytes_and_flops_are_analytic(device: str) -> None:
    _, pieces = _toy(device)
    x = torch.randn(B, N, D) if device == "cpu" else torch.empty(B, N, D, device="meta")
    up, views, rebinding, attend, rest = measure_pieces(pieces, {"x": x})
    act = B * N * H * F32
    assert (up.flops, up.working_bytes) == (2 * B * N * D * H, 2 * act)
    assert (views.flops, views.working_bytes) == (0, B * N * (H // 8) * F32)  # only the sum is new
    assert rebinding.working_bytes == 2 * act
    assert rebinding.ops == ("mul", "add", "add", "add", "add")
    # live after each op: a; then t (a gone); then 2 at once, old one dropped after rebinding
    assert rebinding.live == (act, act, 2 * act, 2 * act, 2 * act)
    # attention: q@k^T and attn@v over 4 heads of 64, then the down projection
    assert attend.flops == 2 * (2 * B * 4 * N * N * (H // 4)) + 2 * B * N * H * D
    # the fused output [B,4,N,64] (laid out [B,N,4,64], so the reshape is a view) and its log-sum-exp
    # [B,4,N] (dropped at once), then the output
    lse = B * 4 * N * F32
    assert attend.live[attend.ops.index("_scaled_dot_product_flash_attention_for_cpu")] == act + lse
    assert attend.working_bytes == act + B * N * D * F32
    assert "_scaled_dot_product_flash_attention_for_cpu" in attend.ops
    assert (rest.flops, rest.working_bytes, rest.ops) == (0, 0, ())


def test_meta_runs_the_cpu_op_sequence() -> None:
    """With the CPU attention kernel substituted, meta and real CPU tensors give the same ops and bytes."""
    _, meta = _toy("meta")
    _, cpu = _toy("cpu")
    a = measure_pieces(meta, {"x": torch.empty(B, N, D, device="meta")})
    b = measure_pieces(cpu, {"x": torch.randn(B, N, D)})
    assert [(p.ops, p.live, p.flops) for p in a] == [(p.ops, p.live, p.flops) for p in b]


def test_substituted_attention_counts_the_flops_plain_flopcounter_counts() -> None:
    _, pieces = _toy("meta")
    mine = measure_pieces(pieces, {"x": torch.empty(B, N, D, device="meta")})
    plain = count_flops(pieces, {"x": torch.empty(B, N, D, device="meta")})
    assert [p.flops for p in mine] == plain and plain[3] > 0
    without = measure_pieces(pieces, {"x": torch.empty(B, N, D, device="meta")}, cpu_attention=False)
    # meta's own path is the math one: it materialises the attention matrix
    assert "bmm" in without[3].ops and without[3].working_bytes > mine[3].working_bytes


def test_weight_bytes_follow_the_int8_store_rule() -> None:
    m, pieces = _toy("meta")
    by = {p.name: p for p in pieces}
    assert piece_params(m, by["up"]) == D * H + H
    assert piece_weight_bytes(m, by["up"]) == {"fp32": 4 * (D * H + H), "fp16": 2 * (D * H + H),
                                               "int8": D * H + 4 * H + 4 * H}  # int8 + fp32 scales, fp32 bias
    rest = piece_weight_bytes(m, by["rest"])
    n_rest = 2 * D + 16 * D + 16 + 4 * D
    assert rest == {"fp32": 4 * n_rest, "fp16": 2 * n_rest, "int8": 4 * n_rest}  # nothing large enough
    assert piece_params(m, by["rest"]) == n_rest - 4 * D  # the buffer is stored but is no parameter


def test_tied_weights_count_once() -> None:
    from cidl.runtime.models.t5 import build_t5, split_t5

    t5 = build_t5("tiny", device="meta")
    embed = split_t5(t5)[0]
    n = t5.config.vocab_size * t5.config.d_model
    assert len(embed.param_names(t5)) == 2  # shared.weight and encoder.embed_tokens.weight, one tensor
    assert piece_params(t5, embed) == n and piece_weight_bytes(t5, embed)["fp32"] == 4 * n


@pytest.mark.parametrize("model", ["t5", "stdit", "vae_temporal", "vae_2d"])
def test_tiny_models_meta_equals_cpu(model: str) -> None:
    """Every piece of every tiny model: op sequence, live bytes after each op and FLOPs on meta equal the
    ones measured on real CPU tensors -- the meta measurement is the CPU's dataflow."""
    from cidl.runtime.inventory import PresetModels, stdit_shape

    shape = {"t5": {"B": 1, "L": 7}, "stdit": stdit_shape(2, 6, 4, 3, 5),
             "vae_temporal": {"B": 1, "H": 5, "W": 3, "P": 15, "F": 2},
             "vae_2d": {"B": 2, "H": 3, "W": 5, "P": 15}}[model]
    meta = PresetModels("tiny")
    got = meta.run(model, shape)  # type: ignore[arg-type]
    cpu_model = _cpu_tiny(model)
    carry = _to_cpu(meta.carry(model, shape))  # type: ignore[arg-type]
    want = measure_pieces(_cpu_pieces(model, cpu_model), carry)
    assert [p.name for p in got] == [p.name for p in want]
    for g, w in zip(got, want, strict=True):
        assert (g.ops, g.live, g.flops) == (w.ops, w.live, w.flops), g.name


def _cpu_tiny(model: str) -> nn.Module:
    if model == "t5":
        from cidl.runtime.models.t5 import build_t5

        return build_t5("tiny")
    if model == "stdit":
        from cidl.runtime.models.stdit3 import build_stdit3

        return build_stdit3("tiny")
    from cidl.runtime.models.vae import build_vae

    return build_vae("tiny")


def _cpu_pieces(model: str, m: nn.Module) -> list[Piece]:
    from cidl.runtime.models.stdit3 import split_stdit3
    from cidl.runtime.models.t5 import split_t5
    from cidl.runtime.models.vae import split_vae_2d, split_vae_temporal

    split = {"t5": split_t5, "stdit": split_stdit3, "vae_temporal": split_vae_temporal,
             "vae_2d": split_vae_2d}
    return split[model](m)  # type: ignore[operator]


def _to_cpu(carry: Carry) -> Carry:
    gen = torch.Generator().manual_seed(0)
    out: Carry = {}
    for k, v in carry.items():
        if isinstance(v, torch.Tensor) and v.is_meta:
            if v.dtype.is_floating_point:
                v = torch.randn(v.shape, generator=gen, dtype=v.dtype)
            elif k == "input_ids":
                v = torch.randint(1, 100, v.shape, generator=gen)
            else:  # masks: keep all tokens
                v = torch.ones(v.shape, dtype=v.dtype)
        out[k] = v
    return out
