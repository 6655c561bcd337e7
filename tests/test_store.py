"""The block store: layout, idempotence, resumption after SIGKILL, verification of bad files, int8 format."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cidl.runtime.blockfile import BlockFileError, TensorSpec, parse_safetensors, write_safetensors
from cidl.runtime.pipeline_models import MODELS, block_entries, model_of, pipeline_blocks, seeded_tensor
from cidl.runtime.quant import SCALE_SUFFIX, dequantize_int8, is_quantized, quantize_int8
from cidl.runtime.store import (
    MANIFEST,
    PARTIAL_MANIFEST,
    BlockStore,
    PrepareProgress,
    prepare_store,
    read_manifest,
)


@pytest.fixture(scope="module")
def blocks():
    return pipeline_blocks("tiny", device="meta")


@pytest.fixture(scope="module")
def fp32_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_store("tiny", tmp_path_factory.mktemp("store") / "tiny-fp32", dtype="fp32")


@pytest.fixture(scope="module")
def int8_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_store("tiny", tmp_path_factory.mktemp("store") / "tiny-int8", dtype="int8")


def test_layout_matches_the_pipeline(fp32_dir: Path, blocks) -> None:
    store = BlockStore.open(fp32_dir)
    assert store.block_ids == list(blocks)
    assert [model_of(b) for b in store.block_ids][0] == "t5"
    assert {model_of(b) for b in store.block_ids} == set(MODELS)
    assert not (fp32_dir / PARTIAL_MANIFEST).exists()
    for entry in store.manifest.blocks:
        model, piece = blocks[entry.id]
        path = fp32_dir / entry.file
        data = path.read_bytes()
        assert entry.file == f"{entry.id}.fp32.safetensors"
        assert len(data) == entry.bytes and hashlib.sha256(data).hexdigest() == entry.sha256
        # Upstream key names, a slice of the parent's state dict; tied keys stored once.
        stored, aliases = block_entries(model, piece)
        assert entry.keys == list(stored) and entry.aliases == aliases
        assert set(entry.keys) | set(aliases) == set(piece.param_names(model))
        # The official reader agrees with ours, and the bytes are what the shapes say.
        official = load_file(str(path))
        ours = store.read_block(entry.id)
        assert set(official) == set(ours) == set(entry.keys)
        assert all(torch.equal(official[k], ours[k]) for k in official)
        assert entry.tensor_bytes == sum(t.numel() * 4 for t in official.values())
    t5 = read_manifest(fp32_dir / MANIFEST).blocks[0]
    assert t5.id == "t5.embed" and t5.aliases == {"encoder.embed_tokens.weight": "shared.weight"}


def test_values_are_seeded_per_key(fp32_dir: Path, blocks) -> None:
    store = BlockStore.open(fp32_dir)
    model, _ = blocks["stdit.block01"]
    got = store.read_block("stdit.block01")
    key = "spatial_blocks.1.attn.qkv.weight"
    assert torch.equal(got[key], seeded_tensor("stdit", model, key, tuple(got[key].shape), seed=0))
    assert not torch.equal(got[key], seeded_tensor("stdit", model, key, tuple(got[key].shape), seed=1))
    # Constants the architecture fixes are exact, not random.
    from cidl.runtime.models.stdit3 import rope_frequencies
    from cidl.runtime.models.vae import SCALE, SHIFT

    part1 = store.read_block("stdit.part1")
    assert torch.equal(part1["rope.freqs"], rope_frequencies(model.config.head_dim))
    tdec0 = store.read_block("vae_temporal.tdec0")
    assert tdec0["scale"].flatten().tolist() == pytest.approx(SCALE)
    assert tdec0["shift"].flatten().tolist() == pytest.approx(SHIFT)


def test_every_architecture_constant_is_known() -> None:
    """An entry ``build_*`` gives the same non-trivial value for two seeds is a constant of the architecture:
    the store must write it exactly (``pipeline_models._fixed_values``)."""
    a = pipeline_blocks("tiny", device="cpu", seed=0)
    b = pipeline_blocks("tiny", device="cpu", seed=1)
    for bid, (model, piece) in a.items():
        other = dict(b[bid][0].state_dict())
        for key, value in model.state_dict().items():
            if key not in piece.param_names(model):
                continue
            trivial = bool((value == 0).all() or (value == 1).all())
            if torch.equal(value, other[key]) and not trivial:
                expected = seeded_tensor(model_of(bid), model, key, tuple(value.shape), seed=7)
                torch.testing.assert_close(expected, value.float(), rtol=0, atol=0, msg=f"{bid}: {key}")


def test_complete_store_is_verified_not_rewritten(fp32_dir: Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in fp32_dir.iterdir()}
    events: list[PrepareProgress] = []
    prepare_store("tiny", fp32_dir, dtype="fp32", progress=events.append)
    assert {p.name: p.stat().st_mtime_ns for p in fp32_dir.iterdir()} == before
    assert events and all(e.reused for e in events) and events[-1].done == events[-1].total


def test_other_parameters_are_refused(fp32_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"manifest\.json: holds a store of preset=tiny dtype=fp32 seed=0"):
        prepare_store("tiny", fp32_dir, dtype="fp32", seed=3)


@pytest.fixture()
def copy_of(fp32_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    out.mkdir()
    for p in fp32_dir.glob("*"):
        (out / p.name).write_bytes(p.read_bytes())
    return out


def test_bad_files_fail_the_named_check(copy_of: Path) -> None:
    store = BlockStore.open(copy_of)
    path = store.path("stdit.block00")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(BlockFileError, match=r"stdit\.block00\.fp32\.safetensors: sha256 check failed") as e:
        store.read_block("stdit.block00")
    assert e.value.check == "sha256"
    path.write_bytes(bytes(data[:-100]))
    with pytest.raises(BlockFileError, match=r"size check failed: \d+ bytes, the manifest says \d+"):
        store.read_block("stdit.block00", cold=True)
    path.unlink()
    with pytest.raises(BlockFileError, match="missing check failed"):
        store.read_block("stdit.block00")
    with pytest.raises(BlockFileError, match="missing"):
        store.verify()
    # prepare repairs exactly the bad block.
    others = {p.name: p.stat().st_mtime_ns for p in copy_of.glob("*.safetensors")}
    events: list[PrepareProgress] = []
    prepare_store("tiny", copy_of, dtype="fp32", progress=events.append)
    BlockStore.open(copy_of).verify()
    assert {e.block_id for e in events if not e.reused} == {"stdit.block00"}
    assert {p.name: p.stat().st_mtime_ns for p in copy_of.glob("*.safetensors") if p.name in others} == others


def test_bad_header_is_named(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    specs = [TensorSpec("a", torch.float32, (4, 4), lambda: torch.ones(4, 4)),
             TensorSpec("b", torch.int8, (3,), lambda: torch.ones(3, dtype=torch.int8))]
    size, digest, tensor_bytes = write_safetensors(path, specs, {"k": "v"})
    assert (size, tensor_bytes) == (path.stat().st_size, 67)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    good = bytearray(path.read_bytes())
    assert parse_safetensors(good, path)["a"].sum().item() == 16
    n = int.from_bytes(good[:8], "little")
    header = json.loads(good[8 : 8 + n])

    def with_header(h: dict) -> bytearray:
        text = json.dumps(h).encode()
        return bytearray(len(text).to_bytes(8, "little") + text + good[8 + n :])

    cases = {
        "exceeds the file": bytearray((10**9).to_bytes(8, "little")) + good[8:],
        "not JSON": bytearray(good[:8] + b"{" * n + good[8 + n :]),
        "do not fit shape": with_header({**header, "a": {**header["a"], "shape": [4, 5]}}),
        "holes or overlaps": with_header({**header, "b": {**header["b"], "data_offsets": [60, 63]}}),
        "expected dtype": with_header({**header, "a": {**header["a"], "dtype": "Q9"}}),
    }
    for what, data in cases.items():
        with pytest.raises(BlockFileError, match=f"header check failed: .*{what}"):
            parse_safetensors(data, path)


def test_bad_manifest_names_file_and_field(copy_of: Path) -> None:
    path = copy_of / MANIFEST
    doc = json.loads(path.read_text())
    doc["blocks"][2]["sha256"] = "xyz"
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"manifest\.json: field blocks\.2\.sha256: String should match"):
        BlockStore.open(copy_of)
    path.unlink()
    with pytest.raises(FileNotFoundError, match=r"manifest\.json: no manifest"):
        BlockStore.open(copy_of)


def test_int8_format(int8_dir: Path, fp32_dir: Path, blocks) -> None:
    q8, f32 = BlockStore.open(int8_dir), BlockStore.open(fp32_dir)
    n_quantized = 0
    for entry in q8.manifest.blocks:
        model, _ = blocks[entry.id]
        tensors = q8.read_block(entry.id)
        ref = f32.read_block(entry.id)
        assert entry.tensor_bytes == sum(t.numel() * t.element_size() for t in tensors.values())
        for key in entry.keys:
            if key in entry.quantized:
                n_quantized += 1
                w, s = tensors[key], tensors[key + SCALE_SUFFIX]
                assert is_quantized(model, key, tuple(w.shape)) and w.numel() >= 2048
                assert w.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (w.shape[0],)
                q, scale = quantize_int8(ref[key])
                assert torch.equal(w, q) and torch.equal(s, scale)
                err = (dequantize_int8(w, s) - ref[key]).abs().flatten(1).amax(1)
                assert (err <= s * 0.5 + 1e-7).all()  # at most half a quantisation step per channel
            else:
                assert not is_quantized(model, key, tuple(tensors[key].shape))
                assert tensors[key].dtype == torch.float32 and torch.equal(tensors[key], ref[key])
    assert n_quantized > 20
    # T5 XXL's linear weights (>= 2048 elements) are all quantised; the embedding is not a Linear.
    t5 = q8.entry("t5.block00")
    assert {k for k in t5.keys if k.endswith(("q.weight", "wo.weight"))} <= set(t5.quantized)
    assert "shared.weight" not in q8.entry("t5.embed").quantized


_CHILD = textwrap.dedent("""
    import sys
    from cidl.runtime.store import prepare_store

    def progress(e):
        print(e.block_id, e.done, flush=True)

    prepare_store("tiny", sys.argv[1], dtype="fp16", progress=progress)
""")


def test_sigkill_midway_then_rerun_completes(tmp_path: Path, blocks) -> None:
    out = tmp_path / "killed"
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(out)], stdout=subprocess.PIPE, text=True)
    seen: set[str] = set()
    assert child.stdout is not None
    for line in child.stdout:
        seen.add(line.split()[0])
        if len(seen) >= 6:
            os.kill(child.pid, signal.SIGKILL)
            break
    child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    assert not (out / MANIFEST).exists() and (out / PARTIAL_MANIFEST).exists()
    written = {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")}
    partial = read_manifest(out / PARTIAL_MANIFEST)
    assert 4 <= len(partial.blocks) < 22
    events: list[PrepareProgress] = []
    prepare_store("tiny", out, dtype="fp16", progress=events.append)
    store = BlockStore.open(out)
    store.verify()
    assert len(store.block_ids) == 22 and not (out / PARTIAL_MANIFEST).exists()
    assert not list(out.glob("*.tmp-*"))
    reused = {e.block_id for e in events if e.reused}
    assert reused == {b.id for b in partial.blocks}
    for b in partial.blocks:  # finished files were kept, not rewritten
        assert (out / b.file).stat().st_mtime_ns == written[b.file]
    # fp16 holds every tensor as fp16; its bytes are the cost model's too.
    assert all(t.dtype == torch.float16 for t in store.read_block("t5.block01").values())
    from cidl.runtime.measure import piece_weight_bytes

    for entry in store.manifest.blocks:
        assert entry.tensor_bytes == piece_weight_bytes(*blocks[entry.id])["fp16"], entry.id


def test_tensor_bytes_equal_the_cost_model(fp32_dir: Path, int8_dir: Path, blocks) -> None:
    """A block file's tensor bytes are the cost model's ``weight_bytes[dtype]``, byte for byte."""
    from cidl.runtime.measure import piece_weight_bytes

    for dtype, d in (("fp32", fp32_dir), ("int8", int8_dir)):
        store = BlockStore.open(d)
        for entry in store.manifest.blocks:
            model, piece = blocks[entry.id]
            assert entry.tensor_bytes == piece_weight_bytes(model, piece)[dtype], (dtype, entry.id)
    from cidl.scheduler.costmodel import inventory_path, load_cost_model

    if not inventory_path("tiny").exists():
        pytest.skip("the shipped tiny inventory is not generated yet")
    cost = load_cost_model("tiny")
    shipped = {f"{m}.{b.name}": b.weight_bytes for m, mc in cost.models.items() for b in mc.blocks}
    assert list(shipped) == store.block_ids
    for dtype, d in (("fp32", fp32_dir), ("int8", int8_dir)):
        for entry in BlockStore.open(d).manifest.blocks:
            assert entry.tensor_bytes == shipped[entry.id][dtype], (dtype, entry.id)


def test_cli_prepare_then_complete(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cidl.cli.main import app

    out = tmp_path / "s"
    first = CliRunner().invoke(app, ["prepare", "tiny", "--dtype", "int8", "--out", str(out)])
    assert first.exit_code == 0, first.output
    assert f"{out}: wrote 22 blocks" in first.output and "int8 weights" in first.output
    again = CliRunner().invoke(app, ["prepare", "tiny", "--dtype", "int8", "--out", str(out)])
    assert again.exit_code == 0 and "store is complete and verified (22 blocks" in again.output
    other = CliRunner().invoke(app, ["prepare", "tiny", "--dtype", "int8", "--out", str(out), "--seed", "1"])
    assert other.exit_code == 2 and "holds a store of preset=tiny dtype=int8 seed=0" in other.output


@pytest.mark.parametrize("preset", ["small", "full"])
def test_planned_bytes_equal_the_shipped_cost_model(preset: str) -> None:
    """Without writing: what ``prepare_store`` would write for the larger presets (meta models)."""
    from cidl.runtime.store import BlockSource, expected_tensor_bytes
    from cidl.scheduler.costmodel import inventory_path, load_cost_model

    if not inventory_path(preset).exists():
        pytest.skip(f"the shipped {preset} inventory is not generated yet")
    cost = load_cost_model(preset)
    shipped = {f"{m}.{b.name}": b.weight_bytes for m, mc in cost.models.items() for b in mc.blocks}
    planned = pipeline_blocks(preset, device="meta")
    assert list(planned) == list(shipped)
    for bid, (model, piece) in planned.items():
        for dtype in ("fp32", "fp16", "int8"):
            src = BlockSource(bid, model_of(bid), model, piece)
            assert expected_tensor_bytes(src, dtype) == shipped[bid][dtype], (bid, dtype)
