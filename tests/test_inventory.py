"""The shipped cost model (scheduler/inventories/*.json): recomputed from the modules, checked exactly against
FlopCounterMode and live bytes at shapes the fit never saw, and against the facts of the real models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cidl.runtime.inventory import PresetModels, build_cost_model, stdit_shape
from cidl.runtime.measure import count_flops, cpu_allocator_peak, measure_pieces
from cidl.runtime.polyfit import fit_exact, mono, poly_value
from cidl.scheduler.costmodel import CostModel, dump_cost_model, inventory_path, load_cost_model
from cidl.scheduler.pipeline import open_sora_workload

# ------------------------------------------------------------------------------------------ exact fitting


def test_fit_recovers_integer_polynomials_and_rejects_the_rest() -> None:
    basis = [mono(t) for t in ("1", "S", "B*S*T", "B*S^2*T")]
    shapes = [{"B": b, "S": s, "T": t} for b, s, t in ((1, 2, 3), (2, 3, 2), (3, 1, 4), (2, 5, 5), (1, 4, 2))]
    truth = {mono("B*S^2*T"): 7, mono("S"): -3, (): 11}
    odd = [s["B"] * s["S"] * s["T"] // 2 + (s["S"] % 2) for s in shapes]  # not a polynomial
    values = np.array([[poly_value(truth, s), o] for s, o in zip(shapes, odd, strict=True)])
    got = fit_exact(basis, shapes, values)
    assert got == [truth, None]
    with pytest.raises(ValueError, match="not identifiable"):
        fit_exact(basis, shapes[:3], np.zeros((3, 1)))


# ------------------------------------------------------------------------------------------ tiny, regenerated


@pytest.fixture(scope="module")
def tiny_fresh() -> CostModel:
    return build_cost_model("tiny")


def test_shipped_tiny_equals_a_regeneration(tiny_fresh: CostModel) -> None:
    """The shipped file cannot go stale: regenerating from the modules gives it byte for byte."""
    assert inventory_path("tiny").read_text() == dump_cost_model(tiny_fresh)
    assert tiny_fresh.verified_shapes >= 10


NEW_SHAPES = {  # outside every range the fit sampled (see inventory._specs)
    ("t5", "default"): [{"B": 1, "L": 41}],
    ("stdit", "default"): [stdit_shape(2, 10, 6, 7, 13), stdit_shape(3, 4, 12, 9, 32)],
    ("stdit", "tdtm"): [stdit_shape(2, 10, 6, 7, 13), stdit_shape(2, 6, 14, 12, 32)],
    ("vae_temporal", "default"): [{"B": 1, "H": 9, "W": 7, "P": 63, "F": 6}],
    ("vae_2d", "default"): [{"B": 5, "H": 7, "W": 9, "P": 63}],
}


@pytest.mark.parametrize("key", list(NEW_SHAPES), ids=lambda k: "-".join(k))
def test_tiny_cost_model_is_exact_at_new_shapes(key: tuple[str, str]) -> None:
    model, variant = key
    cm = load_cost_model("tiny")
    pm = PresetModels("tiny")
    for shape in NEW_SHAPES[key]:
        plain = count_flops(pm.pieces(model), pm.carry(model, shape, variant))  # type: ignore[arg-type]
        got = pm.run(model, shape, variant)  # type: ignore[arg-type]
        for block, m, f in zip(cm.models[model].blocks, got, plain, strict=True):  # type: ignore[index]
            cost = block.exec[variant]  # type: ignore[index]
            assert block.name == m.name
            assert cost.flops(shape) == f == m.flops, (block.name, shape)
            assert cost.working_bytes(shape) == m.working_bytes, (block.name, shape)


def test_outside_the_domain_flops_stay_exact() -> None:
    """Batch 1 or a single latent frame turn some copies into views: FLOPs are still exact, working bytes
    can only be over-estimated by the copies that became views."""
    cm, pm = load_cost_model("tiny"), PresetModels("tiny")
    for shape in (stdit_shape(1, 6, 8, 3, 5), stdit_shape(2, 6, 8, 1, 5)):
        for block, m in zip(cm.models["stdit"].blocks, pm.run("stdit", shape), strict=True):
            assert block.exec["default"].flops(shape) == m.flops
            assert m.working_bytes <= block.exec["default"].working_bytes(shape) <= 1.25 * m.working_bytes


# ------------------------------------------------------------------------------------------ full, on meta


def test_full_blocks_are_exact_at_a_new_shape() -> None:
    cm, pm = load_cost_model("full"), PresetModels("full")
    cases = [("stdit", "default", stdit_shape(2, 48, 80, 10, 300)),  # 384x640 px, 34 frames
             ("t5", "default", {"B": 1, "L": 120}),
             ("vae_temporal", "default", {"B": 1, "H": 24, "W": 40, "P": 960, "F": 3}),
             ("vae_2d", "default", {"B": 3, "H": 24, "W": 40, "P": 960})]
    for model, variant, shape in cases:
        got = pm.run(model, shape, variant)  # type: ignore[arg-type]
        blocks = cm.models[model].blocks  # type: ignore[index]
        assert [b.name for b in blocks] == [m.name for m in got]
        for b, m in zip(blocks, got, strict=True):
            cost = b.exec[variant]  # type: ignore[index]
            got_cost = (cost.flops(shape), cost.working_bytes(shape))
            assert got_cost == (m.flops, m.working_bytes), (model, b.name)
    assert not any(p.device.type != "meta" for p in pm.stdit.parameters())  # nothing allocated


def test_full_parameters_and_weight_bytes_match_the_facts() -> None:
    cm = load_cost_model("full")
    params = {name: m.params for name, m in cm.models.items()}
    assert params["stdit"] == 1_207_643_972
    assert params["t5"] == 4_762_310_656
    # The facts count the VAE decoders alone; decoding also runs each one's 1x1 post_quant_conv (4x4 + 4).
    assert params["vae_2d"] == 49_490_179 + 20
    assert params["vae_temporal"] == 165_265_924 + 20
    assert cm.models["vae_2d"].params_by_module == {"decoder": 49_490_179, "post_quant_conv": 20}
    assert cm.models["vae_temporal"].params_by_module == {"decoder": 165_265_924, "post_quant_conv": 20}
    assert cm.models["t5"].params_by_module == {"shared": 131_596_288, "encoder": 4_630_714_368}
    stdit_modules = cm.models["stdit"].params_by_module
    assert sum(v for k, v in stdit_modules.items() if k.endswith("_blocks")) == 56 * 21_255_696
    t5_blocks = [b for b in cm.models["t5"].blocks if b.name.startswith("block")]
    assert len(t5_blocks) == 24 and all(192e6 < b.weight_bytes["int8"] < 194e6 for b in t5_blocks)
    int8_blocks = sum(b.weight_bytes["int8"] for b in t5_blocks)
    assert int8_blocks == pytest.approx(4.64e9, rel=0.005)  # the paper's 4.64 GB
    st = [b for b in cm.models["stdit"].blocks if b.name.startswith("block")]
    assert len(st) == 28 and all(b.weight_bytes["fp32"] == 2 * 21_255_696 * 4 for b in st)  # ~170 MB
    assert sum(b.weight_bytes["fp32"] for b in cm.models["stdit"].blocks) == pytest.approx(4.835e9, rel=1e-3)


def _stdit_step_flops(b: int, s: int, t: int, text: int, c: int = 1152, depth: int = 28, cap: int = 4096,
                      freq: int = 256, patch: int = 4, out_ch: int = 8) -> int:
    """Independent count: every linear layer at its real token count, attention matmuls, 2 FLOPs per MAC."""
    n = b * t * s  # video tokens
    self_attn = 2 * n * c * 3 * c + 2 * n * c * c  # qkv, proj
    cross = 2 * n * c * c + 2 * (b * text) * c * 2 * c + 2 * n * c * c  # q over video, kv over text, proj
    mlp = 2 * n * c * 4 * c * 2
    spatial = 2 * (2 * (b * t) * s * s * c)  # QK^T and AV over (B*T) sequences of S tokens, all heads
    temporal = 2 * (2 * (b * s) * t * t * c)
    cross_mm = 2 * (2 * n * text * c)
    blocks = depth * (2 * (self_attn + cross + mlp) + spatial + temporal + 2 * cross_mm)
    embed = 2 * n * 4 * patch * c + 2 * (2 * b * (freq * c + c * c)) + 2 * b * c * 6 * c \
        + 2 * b * text * (cap * c + c * c)
    final = 2 * n * c * patch * out_ch
    return blocks + embed + final


def test_stdit_flops_per_step_match_an_independent_count() -> None:
    w = open_sora_workload(256, 68)  # S=256, T=20, CFG batch 2, 300 tokens
    stage = next(s for s in w.stages if s.name == "stdit")
    assert stage.shape == {"B": 2, "L": 300, "S": 256, "T": 20, "M": 10}
    ours = sum(b.flops for b in stage.blocks)
    assert ours == pytest.approx(_stdit_step_flops(2, 256, 20, 300), rel=0.05)
    tdtm = open_sora_workload(256, 68, tdtm_steps=5)
    merged = sum(b.flops for b in next(s for s in tdtm.stages if s.name == "stdit-tdtm").blocks)
    assert 0.6 * ours < merged < 0.9 * ours  # self-attention ~4x, cross ~2x cheaper; MLP unchanged


# ------------------------------------------------------------------------------------------ small, real CPU


def test_small_working_bytes_match_the_cpu_allocator() -> None:
    """The shipped small formulas against the CPU allocator's own peak (torch.profiler) on real weights and
    data, at a shape the fit never saw: transformer pieces within 10%. VAE pieces: the formula is exactly
    the tensors' live bytes, and the allocator's peak only adds kernel scratch (oneDNN reorders)."""
    from cidl.runtime.models.stdit3 import build_stdit3, split_stdit3, stdit3_inputs
    from cidl.runtime.models.t5 import build_t5, split_t5, t5_inputs
    from cidl.runtime.models.vae import build_vae, split_vae_2d, vae_2d_inputs

    cm = load_cost_model("small")
    torch.manual_seed(0)
    cases = []
    st = build_stdit3("small")
    cases.append(("stdit", split_stdit3(st)[:4], stdit3_inputs("small", batch=2, frames_latent=5,
                                                                height_latent=20, width_latent=12),
                  stdit_shape(2, 20, 12, 5, 300), 0.10))
    t5 = build_t5("small")
    cases.append(("t5", split_t5(t5)[:3], t5_inputs(t5.config, batch=1, tokens=300), {"B": 1, "L": 300},
                  0.10))
    vae = build_vae("small")
    cases.append(("vae_2d", split_vae_2d(vae), vae_2d_inputs(frames=2, height=96, width=64),
                  {"B": 2, "H": 12, "W": 8, "P": 96}, None))
    with torch.no_grad():
        for model, pieces, carry, shape, tol in cases:
            blocks = {b.name: b for b in cm.models[model].blocks}  # type: ignore[index]
            for piece in pieces:
                tensors = measure_pieces([piece], dict(carry))[0]
                carry, peak = cpu_allocator_peak(lambda p=piece, c=carry: p(c))
                predicted = blocks[piece.name].exec["default"].working_bytes(shape)
                if tol is not None:
                    assert abs(peak - predicted) <= tol * predicted, (model, piece.name, peak, predicted)
                else:
                    assert predicted == tensors.working_bytes <= peak, (model, piece.name, peak, predicted)


def test_workload_shapes_are_in_every_domain() -> None:
    """The workload evaluates the cost model where the fits are exact (inventory.DOMAINS)."""
    knobs = ({}, {"frames": 51, "tdtm_steps": 4, "lpl_leap": 14}, {"resolution": (192, 320), "frames": 102})
    for kw in knobs:
        w = open_sora_workload(**kw)  # type: ignore[arg-type]
        for s in w.stages:
            sh = s.shape
            if s.model == "t5":
                assert sh["B"] == 1 and sh["L"] >= 2
            elif s.model == "stdit":
                assert sh["B"] >= 2 and sh["T"] >= 2 and sh["M"] >= 2 and sh["S"] >= 4
            elif s.model == "vae_temporal":
                assert sh["F"] >= 2 and sh["H"] * sh["W"] == sh["P"]
            else:
                assert sh["B"] >= 2
