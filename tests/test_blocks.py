"""Managed blocks: load/unload from a store; partitioned runs equal the whole model; memory is freed."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

from cidl.runtime.blocks import BlockNotLoadedError, StoreBlocks, load_reference_models
from cidl.runtime.models.stdit3 import stdit3_inputs
from cidl.runtime.models.t5 import t5_config, t5_inputs
from cidl.runtime.models.vae import vae_2d_inputs, vae_temporal_inputs
from cidl.runtime.quant import dequantize_int8, quantize_int8
from cidl.runtime.store import BlockFileError, prepare_store


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stores")
    return {dt: prepare_store("tiny", root / dt, dtype=dt) for dt in ("fp32", "int8")}


def _inputs() -> dict[str, dict]:
    return {
        "t5": t5_inputs(t5_config("tiny"), batch=2, tokens=32, seed=1),
        "stdit": stdit3_inputs("tiny", batch=2, frames_latent=5, height_latent=8, width_latent=8, seed=1),
        "vae_temporal": vae_temporal_inputs(height=32, width=32, num_frames=17, seed=1),
        "vae_2d": vae_2d_inputs(frames=2, height=32, width=32, seed=1),
    }


def _reference(models: dict[str, nn.Module], inputs: dict[str, dict]) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        t5 = inputs["t5"]
        return {
            "t5": models["t5"](**t5).last_hidden_state,
            "stdit": models["stdit"](**inputs["stdit"]),
            "vae_temporal": models["vae"].temporal_call(inputs["vae_temporal"])["frames"],
            "vae_2d": models["vae"].spatial_call(inputs["vae_2d"])["rgb"],
        }


_OUT = {"t5": "text", "stdit": "out", "vae_temporal": "frames", "vae_2d": "rgb"}


def _run(blocks: StoreBlocks, inputs: dict[str, dict], one_at_a_time: bool) -> dict[str, torch.Tensor]:
    out = {}
    for model, carry in inputs.items():
        carry = dict(carry)
        for bid in [b for b in blocks.blocks if b.startswith(model + ".")]:
            if one_at_a_time:
                blocks.load(bid)
            carry = blocks.run(bid, carry)
            if one_at_a_time:
                blocks.unload(bid)
        out[model] = carry[_OUT[model]]
    return out


def test_pieces_from_the_store_equal_the_unpartitioned_model(stores: dict[str, Path]) -> None:
    inputs = _inputs()
    blocks = StoreBlocks.open(str(stores["fp32"]), preset="tiny")
    ref = _reference(load_reference_models(blocks.store), inputs)
    for name, value in ref.items():
        assert torch.isfinite(value).all() and value.abs().mean() > 1e-3, name
    total = 0
    for block in blocks.blocks.values():
        n = block.load()
        assert n == block.planned_resident_bytes == block.resident_bytes == block.entry.tensor_bytes
        total += n
    got = _run(blocks, inputs, one_at_a_time=False)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=0, atol=1e-5, msg=name)
    blocks.unload_all()
    assert all(not b.is_loaded and b.resident_bytes == 0 for b in blocks.blocks.values())
    # Each piece needs only its own block: load, run, unload, one block resident at a time.
    got = _run(blocks, inputs, one_at_a_time=True)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=0, atol=1e-5, msg=name)


def test_unloaded_block_is_on_meta_and_refuses_use(stores: dict[str, Path]) -> None:
    blocks = StoreBlocks.open(str(stores["fp32"]))
    embed = blocks["t5.embed"]
    t5 = embed.model
    assert embed.load() > 0
    assert t5.shared.weight is t5.encoder.embed_tokens.weight and not t5.shared.weight.is_meta
    assert embed.load() == embed.resident_bytes  # idempotent
    assert embed.unload() == embed.planned_resident_bytes
    assert t5.shared.weight.is_meta and t5.encoder.embed_tokens.weight is t5.shared.weight
    assert embed.unload() == 0
    with pytest.raises(BlockNotLoadedError, match="t5.embed is not loaded"):
        with embed.use():
            pass
    embed.prewarm()
    assert not embed.is_loaded


def test_forwards_share_a_block_and_unload_waits_for_them(stores: dict[str, Path]) -> None:
    block = StoreBlocks.open(str(stores["fp32"]))["stdit.part2"]
    block.load()
    inside = threading.Barrier(3)
    release = threading.Event()
    events: list[str] = []

    def forward() -> None:
        with block.use():
            inside.wait(timeout=10)  # both forwards are inside use() at once
            release.wait(timeout=10)
            events.append("forward done")

    def unload() -> None:
        block.unload()
        events.append("unloaded")

    users = [threading.Thread(target=forward) for _ in range(2)]
    for t in users:
        t.start()
    inside.wait(timeout=10)
    unloader = threading.Thread(target=unload)
    unloader.start()
    unloader.join(timeout=0.2)
    assert unloader.is_alive() and block.is_loaded  # waits for the running forwards
    release.set()
    for t in [*users, unloader]:
        t.join(timeout=10)
    assert events == ["forward done", "forward done", "unloaded"] and not block.is_loaded


def test_int8_blocks_run_dequantized_and_count_fp32_bytes(stores: dict[str, Path]) -> None:
    q8 = StoreBlocks.open(str(stores["int8"]))
    f32 = StoreBlocks.open(str(stores["fp32"]))
    for bid, block in q8.blocks.items():
        fp32 = f32[bid]
        assert block.planned_resident_bytes == fp32.planned_resident_bytes == fp32.entry.tensor_bytes
        assert block.entry.tensor_bytes < fp32.entry.tensor_bytes or not block.entry.quantized
        extra = block.planned_resident_bytes if block.entry.quantized else 0  # else fp32 views of the file
        assert block.peak_load_bytes == block.entry.bytes + extra
        assert block.load() == fp32.entry.tensor_bytes
    key = "spatial_blocks.0.mlp.fc1.weight"
    w = q8["stdit.block00"].model.get_parameter(key)
    assert w.dtype == torch.float32
    ref = f32.store.read_block("stdit.block00")[key]
    assert torch.equal(w, dequantize_int8(*quantize_int8(ref)))
    inputs = _inputs()
    got = _run(q8, inputs, one_at_a_time=False)
    want = _reference(load_reference_models(f32.store), inputs)
    for name in want:  # quantisation error, not garbage
        rel = (got[name] - want[name]).norm() / want[name].norm()
        assert torch.isfinite(got[name]).all() and 0 < rel < 0.1, (name, rel)


def test_corrupt_file_leaves_block_unloaded(stores: dict[str, Path], tmp_path: Path) -> None:
    d = tmp_path / "copy"
    d.mkdir()
    for p in stores["fp32"].glob("*"):
        (d / p.name).write_bytes(p.read_bytes())
    blocks = StoreBlocks.open(str(d))
    path = blocks.store.path("stdit.part2")
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BlockFileError, match="sha256"):
        blocks.load("stdit.part2", cold=True)
    assert not blocks["stdit.part2"].is_loaded
    assert blocks["stdit.part2"].model.final_layer.linear.weight.is_meta


_RSS_CHILD = textwrap.dedent("""
    import gc, json, sys
    import psutil, torch
    from torch import nn
    from cidl.runtime.blocks import ManagedBlock
    from cidl.runtime.models.piece import Piece
    from cidl.runtime.store import BlockSource, BlockStore, prepare_blocks

    with torch.device("meta"):
        model = nn.Module()
        model.proj = nn.Linear(4096, 3072)  # 48 MiB of fp32 weights
    piece = Piece("all", ("proj",), lambda c: {"y": model.proj(c["x"])})
    src = BlockSource("big.all", "big", model, piece)
    prepare_blocks([src], sys.argv[1], preset="test", dtype=sys.argv[2])
    block = ManagedBlock("big.all", model, piece, BlockStore.open(sys.argv[1]))
    proc = psutil.Process()
    gc.collect()
    rss0 = proc.memory_info().rss
    size = block.load(cold=True)
    with block.use() as p:
        y = p({"x": torch.ones(1, 4096)})["y"]
    rss1 = proc.memory_info().rss
    block.unload()
    gc.collect()
    rss2 = proc.memory_info().rss
    print(json.dumps({"size": size, "up": rss1 - rss0, "down": rss1 - rss2,
                      "finite": bool(y.isfinite().all()), "meta": model.proj.weight.is_meta}))
""")


@pytest.mark.parametrize("dtype", ["fp32", "int8"])
def test_unload_returns_the_memory(tmp_path: Path, dtype: str) -> None:
    """In a fresh process (a clean heap): loading raises RSS by the block's bytes, unloading returns them."""
    child = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(tmp_path), dtype], capture_output=True,
                           text=True, timeout=120)
    assert child.returncode == 0, child.stderr
    got = json.loads(child.stdout.strip().splitlines()[-1])
    assert got["size"] == (4096 * 3072 + 3072) * 4  # int8 too: resident as fp32
    assert got["finite"] and got["meta"]
    assert got["up"] > 0.9 * got["size"] and got["down"] > 0.9 * got["size"], got


def test_evicted_blocks_give_memory_back_to_the_os(tmp_path) -> None:
    """Many medium tensors loaded by worker threads and evicted: RSS returns to where it was (allocator.py)."""
    import subprocess
    import sys
    import textwrap

    # A fresh process: the allocator setting and RSS are process-wide.
    code = textwrap.dedent("""
        import threading, psutil, torch
        from cidl.runtime.allocator import configure_allocator
        assert configure_allocator()
        p = psutil.Process()
        held = []
        def load():  # 40 tensors of 6 MB from another thread, as a loader thread does
            held.extend(torch.ones(1_500_000) for _ in range(40))
        torch.ones(8_000_000).sum()  # a first large free raises glibc's dynamic threshold when not fixed
        base = p.memory_info().rss
        for _ in range(3):
            t = threading.Thread(target=load); t.start(); t.join()
            held.clear()
        print((p.memory_info().rss - base) / 1e6)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert float(out.stdout.strip()) < 32, out.stdout
