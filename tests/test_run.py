"""`run_pipeline` / `cidl run` on the tiny preset's real blocks: outputs equal the unpartitioned models under
every policy and RSS stays near the budget, bad block files stop the run cleanly, budget drops, emulate and
ladder modes, the CLI."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

from cidl.device_profiles.profile import (
    Calibration,
    ComputeUnit,
    Contention,
    DeviceProfile,
    LoadingSpec,
    MemorySpec,
)
from cidl.runtime.executor import ExecutorError
from cidl.runtime.host_pipeline import GenerateSettings, reference_generate
from cidl.runtime.run import parse_budget_drop, run_pipeline
from cidl.traces.model import Trace

POLICIES = ("sequential", "concurrent", "cidl", "optimal")
SETTINGS = dict(frames=17, steps=3, tdtm_steps=1, resolution=64)


def fake_profile(name: str = "test-host", *, units: tuple[str, ...] = ("gpu", "cpu"), rate: float = 4e8,
                 flops: float = 5e10) -> DeviceProfile:
    """A fixed profile (no measuring in tests): plans are deterministic."""
    unit = ComputeUnit(peak_flops=flops, efficiency={"fp32": 0.5, "fp16": 0.5, "int8": 0.5},
                       dispatch_overhead_s=2e-5)
    return DeviceProfile(
        name=name, memory=MemorySpec(total_bytes=8 * 10**9, app_budget_bytes=4 * 10**9),
        loading=LoadingSpec(per_load_overhead_s=1e-3, bytes_per_s={"fp32": rate, "fp16": rate, "int8": rate},
                            max_total_bytes_per_s=1.5 * rate, loader_threads=2),
        units={u: unit for u in units}, contention=Contention(load_slowdown=1.1, compute_slowdown=1.05),
        calibration=Calibration(calibrated=False),
    )


@pytest.fixture(scope="session")
def tiny_store(request: pytest.FixtureRequest) -> Path:
    """The tiny preset's store, kept in pytest's cache between sessions: ``prepare_store`` is idempotent and
    re-verifies every file's sha256, rewriting any that does not match."""
    from cidl.runtime.store import prepare_store

    return prepare_store("tiny", request.config.cache.mkdir("cidl-store-tiny-fp32"))


@pytest.fixture(scope="module")
def reference(tiny_store: Path) -> torch.Tensor:
    s = GenerateSettings(preset="tiny", height=64, width=64, frames=17, steps=3, tdtm_steps=1)
    return reference_generate(tiny_store, s).latents


def _run(store: Path, out: Path, **kw: object):
    args = dict(store=store, host_profile=fake_profile(), budget="40MB", **SETTINGS)
    args.update(kw)
    return run_pipeline("tiny", out_dir=out, **args)  # type: ignore[arg-type]


def _no_cidl_threads() -> bool:
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        if not any(t.name.startswith("cidl-") for t in threading.enumerate()):
            return True
        time.sleep(0.02)
    return False


def test_every_policy_equals_the_unpartitioned_pipeline(tiny_store: Path, reference: torch.Tensor,
                                                        tmp_path: Path) -> None:
    latents = {}
    for policy in POLICIES:
        r = _run(tiny_store, tmp_path / policy, policy=policy, write_outputs=policy == "cidl")
        latents[policy] = r.latents
        torch.testing.assert_close(r.latents, reference, rtol=1e-5, atol=1e-5)
        assert r.trace.peak("total") <= 40_000_000
        # Process RSS grew (over its value just before the first load) by at most the budget + 10 % + 64 MB
        # per thread (loaders, queues, issuer).
        extra = r.trace.meta.extra
        threads = extra["loader_threads"] + 3 + 1
        assert 0 < extra["rss_peak_growth_bytes"] <= 40_000_000 * 1.1 + threads * 64 * 2**20
        assert any(c.name == "rss" for c in r.trace.counters)
    for policy in POLICIES[1:]:
        torch.testing.assert_close(latents[policy], latents["sequential"], rtol=1e-5, atol=1e-5)
    out = tmp_path / "cidl"
    assert len(list((out / "frames").glob("frame_*.png"))) == 17
    for name in ("trace.json", "gantt.png", "summary.json", "latents.safetensors"):
        assert (out / name).stat().st_size > 0, name
    from safetensors.torch import load_file

    torch.testing.assert_close(load_file(out / "latents.safetensors")["latents"], latents["cidl"])


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_bad_block_file_stops_the_run(tiny_store: Path, tmp_path: Path, damage: str) -> None:
    store = tmp_path / "store"
    shutil.copytree(tiny_store, store)
    victim = store / "stdit.block01.fp32.safetensors"
    if damage == "flip":
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0xFF
        victim.write_bytes(bytes(data))
    elif damage == "truncate":
        victim.write_bytes(victim.read_bytes()[:-100])
    else:
        victim.unlink()
    out = tmp_path / "out"
    t0 = time.monotonic()
    with pytest.raises(ExecutorError, match="stdit.block01.fp32.safetensors"):
        _run(store, out, policy="concurrent")
    assert time.monotonic() - t0 < 10
    assert _no_cidl_threads()
    trace = Trace.model_validate(_read_trace(out / "trace.json"))
    assert trace.meta.error and "stdit.block01" in trace.meta.error
    assert any(e.cat == "exec" and e.stage == "t5" for e in trace.events)  # the trace so far


def _read_trace(path: Path) -> dict:
    from cidl.traces.chrome import read_trace

    return read_trace(path).model_dump()


def test_budget_drop_absorbed_and_outputs_unchanged(tiny_store: Path, reference: torch.Tensor,
                                                    tmp_path: Path) -> None:
    drop = parse_budget_drop("stdit@1:25MB")
    r = _run(tiny_store, tmp_path, policy="cidl", budget="60MB", budget_drops=[drop], write_outputs=False)
    torch.testing.assert_close(r.latents, reference, rtol=1e-5, atol=1e-5)
    change = r.trace.meta.extra["budget_changes"][0]
    assert change["bytes"] == 25_000_000 and change["absorbed_s"] is not None
    budgets = [c for c in r.trace.counters if c.name == "budget"]
    assert [c.value for c in budgets] == [60_000_000, 25_000_000]
    assert max(c.value for c in r.trace.counters if c.name == "total" and c.ts >= budgets[1].ts) <= 25_000_000
    assert [p["reason"] for p in r.trace.meta.extra["replans"]].count("budget") == 1


def test_drop_below_feasible_ends_run_with_trace(tiny_store: Path, tmp_path: Path) -> None:
    with pytest.raises(ExecutorError, match="too small"):
        _run(tiny_store, tmp_path, policy="cidl", budget_drops=[parse_budget_drop("stdit@1:1MB")])
    trace = Trace.model_validate(_read_trace(tmp_path / "trace.json"))
    assert "too small" in (trace.meta.error or "")
    assert _no_cidl_threads()


def test_emulate_accounts_as_the_device(tiny_store: Path, reference: torch.Tensor, tmp_path: Path) -> None:
    phone = fake_profile("fake-phone", units=("gpu", "ane", "cpu"), rate=2e9, flops=2e11)
    r = _run(tiny_store, tmp_path, policy="optimal", mode="emulate", profile=phone, time_scale=3.0,
             write_outputs=False)
    torch.testing.assert_close(r.latents, reference, rtol=1e-5, atol=1e-5)
    meta = r.trace.meta
    assert meta.extra["time_scale"] == 3.0 and meta.profile and meta.profile["name"] == "fake-phone"
    assert meta.extra["mode"] == "emulate" and "padded_ops" in meta.extra["pacing"]
    # The device's formats: T5 blocks load and stay int8 (the host store is fp32).
    wl = meta.workload or {}
    t5 = next(s for s in wl["stages"] if s["name"] == "t5")["blocks"][1]
    assert t5["dtype"] == "int8" and t5["resident_bytes"] == t5["weight_bytes"]["int8"]
    loads = [e for e in r.trace.events if e.cat == "load" and e.block == t5["id"]]
    assert loads and loads[0].bytes == t5["weight_bytes"]["int8"]


def test_ladder_switches_rungs_at_call_boundaries(tiny_store: Path, reference: torch.Tensor,
                                                  tmp_path: Path) -> None:
    r = _run(tiny_store, tmp_path, policy="cidl", budget="60MB", ladder=True, ladder_rungs=4,
             budget_drops=[parse_budget_drop("stdit@1:30MB")], write_outputs=False)
    torch.testing.assert_close(r.latents, reference, rtol=1e-5, atol=1e-5)
    replans = r.trace.meta.extra["replans"]
    assert [p["reason"] for p in replans] == ["start", "budget"]  # no planner at first calls
    assert replans[0]["budget_bytes"] == 60_000_000 and replans[1]["budget_bytes"] <= 30_000_000
    assert r.trace.peak("total") <= 60_000_000


def test_cli_run(tiny_store: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cidl.cli.main import app

    prof = tmp_path / "host.json"
    prof.write_text(fake_profile().model_dump_json())
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["run", "tiny", "--store", str(tiny_store), "--policy", "optimal",
                                   "--budget", "40MB", "--host-profile", str(prof), "--steps", "2",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "total" in res.output and "peak accounted" in res.output
    assert (out / "trace.json").exists() and len(list((out / "frames").glob("*.png"))) == 17
    bad = CliRunner().invoke(app, ["run", "tiny", "--store", str(tiny_store), "--budget-drop", "soon:1GB",
                                   "--host-profile", str(prof), "--out", str(out)])
    assert bad.exit_code == 2 and "--budget-drop" in bad.output
