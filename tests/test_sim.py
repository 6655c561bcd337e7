"""The simpy simulator: exact times on tiny hand-made workloads, contention, sharing, re-plans, drops."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cidl.device_profiles.profile import DeviceProfile
from cidl.scheduler import BudgetTooSmall, PlanState, Schedule, simulate
from cidl.scheduler.policies import Policy
from cidl.scheduler.schedule import CallOps, EvictOp, ExecOp, LoadOp
from cidl.scheduler.sim import DeadlockError, SimulationError
from cidl.scheduler.workload import Block, Stage, Workload


def _profile(rate: float = 100.0, total: float | None = None, overhead: float = 0.0, threads: int = 1,
             ls: float = 1.0, cs: float = 1.0, units: dict | None = None) -> DeviceProfile:
    units = units or {"gpu": {"peak_flops": 1.0, "efficiency": {"fp32": 1.0}, "dispatch_overhead_s": 0.0}}
    return DeviceProfile.model_validate({
        "name": "toy", "memory": {"total_bytes": 10**12, "app_budget_bytes": 10**12},
        "loading": {"per_load_overhead_s": overhead, "bytes_per_s": {"fp32": rate},
                    "max_total_bytes_per_s": total or rate * 8, "loader_threads": threads},
        "units": units, "contention": {"load_slowdown": ls, "compute_slowdown": cs},
        "calibration": {"calibrated": False}})


def _block(model: str, i: int, nbytes: int, flops: int, working: int = 0, name: str | None = None) -> Block:
    return Block(id=f"{model}.{name or f'b{i}'}", model=model, index=i, weight_bytes={"fp32": nbytes},
                 dtype="fp32", resident_bytes=nbytes, flops=flops, working_bytes=working, unit="gpu")


def _workload(stages: list[tuple[str, str, int, list[Block]]], persistent: int = 0,
              split: int = 1) -> Workload:
    return Workload(name="toy", preset="tiny", resolution=(64, 64), frames=1, steps=1,
                    persistent_bytes=persistent,
                    stages=[Stage(name=n, model=m, calls=c, shape={}, blocks=b,  # type: ignore[arg-type]
                                  batch_splittable=split) for n, m, c, b in stages])


TWO = _workload([("t5", "t5", 1, [_block("t5", 0, 100, 2), _block("t5", 1, 200, 3)])])
BIG = 10**6


class Fixed(Policy):
    """Follows one hand-written Schedule (sliced at re-plan points)."""

    name = "fixed"

    def __init__(self, sched: Schedule) -> None:
        self.sched = sched

    def plan(self, state: PlanState) -> Schedule:
        idx = {s.name: i for i, s in enumerate(state.workload.stages)}
        calls = [c for c in self.sched.calls if (idx[c.stage], c.call) >= (state.stage, state.call)]
        prologue = self.sched.prologue if state.reason == "start" else []
        return self.sched.model_copy(update={"start_stage": state.stage, "start_call": state.call,
                                             "calls": calls, "prologue": prologue})


def _fixed(wl: Workload, ops: list, lanes: int = 1) -> Fixed:
    return Fixed(Schedule(policy="fixed", workload=wl.content_hash(), budget_bytes=BIG, loader_threads=lanes,
                          prefetch_depth=1, calls=[CallOps(stage=wl.stages[0].name, call=0, ops=ops)]))


def _spans(res, cat: str) -> list[tuple[str, float, float]]:
    return [(e.name, round(e.ts, 9), round(e.ts + e.dur, 9)) for e in res.trace.events if e.cat == cat]


def test_sequential_is_sum_of_loads_and_execs() -> None:
    res = simulate(TWO, _profile(), "sequential", BIG)
    assert res.latency_s == pytest.approx(1 + 2 + 2 + 3)
    assert _spans(res, "load") == [("load t5.b0", 0, 1), ("load t5.b1", 3, 5)]
    assert res.peak_bytes == 200


def test_concurrent_overlaps_the_next_load() -> None:
    # l0 + max(e0, l1) + e1
    res = simulate(TWO, _profile(), "concurrent", BIG)
    assert res.latency_s == pytest.approx(1 + max(2, 2) + 3)
    slow = _workload([("t5", "t5", 1, [_block("t5", 0, 100, 2), _block("t5", 1, 500, 3)])])
    assert simulate(slow, _profile(), "concurrent", BIG).latency_s == pytest.approx(1 + 5 + 3)
    assert res.peak_bytes == 300


def test_contention_slows_overlapped_load_and_exec() -> None:
    # t=1: exec b0 (2 s of work) at 1/1.5 and load b1 (2 s) at 1/2 -> exec ends at 4; the load has 0.5 s left
    # at full speed -> 4.5; exec b1 runs alone 4.5..7.5.
    res = simulate(TWO, _profile(ls=2.0, cs=1.5), "concurrent", BIG)
    assert _spans(res, "exec") == [("t5.b0", 1, 4), ("t5.b1", 4.5, 7.5)]
    assert _spans(res, "load")[1] == ("load t5.b1", 1, 4.5)


def test_per_load_overhead_and_dispatch() -> None:
    units = {"gpu": {"peak_flops": 2.0, "efficiency": {"fp32": 0.5}, "dispatch_overhead_s": 0.25}}
    res = simulate(TWO, _profile(overhead=0.5, units=units), "sequential", BIG)
    assert res.latency_s == pytest.approx((0.5 + 1) + (0.25 + 2) + (0.5 + 2) + (0.25 + 3))


def test_loader_threads_share_total_bandwidth() -> None:
    # Two lanes, 100 B/s each but 100 B/s in total: two 100-byte loads at once take 2 s each.
    wl = _workload([("t5", "t5", 1, [_block("t5", 0, 100, 1), _block("t5", 1, 100, 1)])])
    ops = [LoadOp(block="t5.b0", lane=0), LoadOp(block="t5.b1", lane=1),
           ExecOp(block="t5.b0", stage="t5", call=0, queue="gpu"),
           ExecOp(block="t5.b1", stage="t5", call=0, queue="gpu")]
    res = simulate(wl, _profile(total=100.0, threads=2), _fixed(wl, ops, lanes=2), BIG)
    assert _spans(res, "load") == [("load t5.b0", 0, 2), ("load t5.b1", 0, 2)]
    assert [e.lane for e in res.trace.events if e.cat == "load"] == ["loader-0", "loader-1"]
    assert res.latency_s == pytest.approx(4)
    # With a higher total rate each thread runs at its own rate.
    res = simulate(wl, _profile(total=1000.0, threads=2), _fixed(wl, ops, lanes=2), BIG)
    assert res.latency_s == pytest.approx(3)


def test_split_call_runs_parts_on_two_queues_and_holds_half_the_working_bytes() -> None:
    units = {"gpu": {"peak_flops": 1.0, "efficiency": {"fp32": 1.0}, "dispatch_overhead_s": 0.0},
             "ane": {"peak_flops": 1.0, "efficiency": {"fp32": 1.0}, "dispatch_overhead_s": 0.0}}
    wl = _workload([("stdit", "stdit", 1, [_block("stdit", 0, 100, 4, working=50)])], split=2)
    ops = [LoadOp(block="stdit.b0", lane=0),
           ExecOp(block="stdit.b0", stage="stdit", call=0, queue="gpu", part=0, part_count=2),
           ExecOp(block="stdit.b0", stage="stdit", call=0, queue="ane", part=1, part_count=2)]
    res = simulate(wl, _profile(units=units), _fixed(wl, ops), BIG)
    assert [(e.lane, e.ts, e.dur, e.bytes) for e in res.trace.events if e.cat == "exec"] == \
        [("ane", 1.0, 2.0, 25), ("gpu", 1.0, 2.0, 25)]
    assert res.latency_s == pytest.approx(3)


def test_memory_waits_serialise_what_does_not_fit() -> None:
    # Budget 300: b1 (200) cannot load while b0 (100) runs with 50 working bytes -> waits for the eviction.
    wl = _workload([("t5", "t5", 1, [_block("t5", 0, 100, 2, working=50), _block("t5", 1, 200, 3)])])
    ops = [LoadOp(block="t5.b0", lane=0), ExecOp(block="t5.b0", stage="t5", call=0, queue="gpu"),
           EvictOp(block="t5.b0"), LoadOp(block="t5.b1", lane=0),
           ExecOp(block="t5.b1", stage="t5", call=0, queue="gpu")]
    res = simulate(wl, _profile(), _fixed(wl, ops), 300)
    assert _spans(res, "load")[1] == ("load t5.b1", 3, 5)
    assert res.peak_bytes <= 300


def test_deadlock_is_reported() -> None:
    wl = _workload([("t5", "t5", 1, [_block("t5", 0, 200, 1), _block("t5", 1, 200, 1)])])
    ops = [LoadOp(block="t5.b0", lane=0), LoadOp(block="t5.b1", lane=0),
           ExecOp(block="t5.b0", stage="t5", call=0, queue="gpu"), EvictOp(block="t5.b0"),
           ExecOp(block="t5.b1", stage="t5", call=0, queue="gpu")]
    with pytest.raises(DeadlockError, match="200 bytes of memory for t5.b1"):
        simulate(wl, _profile(), _fixed(wl, ops), 300)


def test_exec_of_a_block_never_loaded_is_an_error() -> None:
    ops = [ExecOp(block="t5.b0", stage="t5", call=0, queue="gpu")]
    with pytest.raises(SimulationError, match="neither resident nor being loaded"):
        simulate(TWO, _profile(), _fixed(TWO, ops), BIG)


def test_events_at_the_same_instant_have_a_fixed_order() -> None:
    res = simulate(TWO, _profile(), "concurrent", BIG, trace_id="x")
    assert [(e.cat, e.name, e.ts) for e in res.trace.events] == [
        ("plan", "plan (start)", 0.0), ("load", "load t5.b0", 0.0),
        ("load", "load t5.b1", 1.0), ("exec", "t5.b0", 1.0),
        ("evict", "evict t5.b0", 3.0), ("exec", "t5.b1", 3.0),
        ("evict", "evict t5.b1", 6.0),
    ]
    again = simulate(TWO, _profile(), "concurrent", BIG, trace_id="x")
    assert again.trace == res.trace


def _stdit(calls: int = 3) -> Workload:
    blocks = [_block("stdit", 0, 10, 1, 5, name="part1")]
    blocks += [_block("stdit", i, 100, 4, 40, name=f"block{i - 1:02d}") for i in range(1, 4)]
    blocks += [_block("stdit", 4, 10, 1, 5, name="part2")]
    return _workload([("t5", "t5", 1, [_block("t5", 0, 100, 2, 10)]), ("stdit", "stdit", calls, blocks),
                      ("vae", "vae_2d", 2, [_block("vae_2d", 0, 50, 1, 20)])], persistent=7)


def test_replan_points_and_trace_meta() -> None:
    wl = _stdit()
    res = simulate(wl, _profile(), "cidl", 400, trace_id="t1")
    meta = res.trace.meta
    replans = meta.extra["replans"]
    assert [(r["reason"], r["stage"], r["call"]) for r in replans] == [
        ("start", "t5", 0), ("first-call", "stdit", 1), ("first-call", "vae", 1)]
    assert meta.schedule_hashes == res.schedule_hashes == [s.content_hash() for s in res.schedules]
    assert (meta.source, meta.policy, meta.budget_bytes, meta.trace_id) == ("simulated", "cidl", 400, "t1")
    assert meta.workload == wl.model_dump(mode="json") and meta.profile is not None
    assert meta.latency_s == res.latency_s and meta.lower_bound_s == res.lower_bound_s <= res.latency_s
    assert {c.name for c in res.trace.counters} == {"resident", "inflight", "working", "persistent", "total",
                                                     "budget"}
    assert res.trace.peak("total") == res.peak_bytes <= 400
    # cidl's first STDiT step runs without overlap: no load during its execs (but the last, during which the
    # next step's first block is prefetched)
    execs = [e for e in res.trace.events if e.cat == "exec" and e.stage == "stdit" and e.call == 0][:-1]
    assert len(execs) == 4
    loads = [e for e in res.trace.events if e.cat == "load"]
    for x in execs:
        assert not any(ld.ts < x.ts + x.dur and x.ts < ld.ts + ld.dur for ld in loads)
    # after the measurement, cidl keeps blocks: fewer loads in later steps than blocks
    later = [e for e in loads if e.ts >= replans[1]["time_s"] and e.block and e.block.startswith("stdit")]
    assert len(later) < 2 * 5


def test_stage_latencies_add_up() -> None:
    res = simulate(_stdit(), _profile(), "optimal", 400)
    assert list(res.stage_latency_s) == ["t5", "stdit", "vae"]
    assert sum(res.stage_latency_s.values()) == pytest.approx(res.latency_s)


def test_budget_drop_is_absorbed_and_shown() -> None:
    wl = _stdit(calls=4)
    full = simulate(wl, _profile(), "cidl", 500)
    res = simulate(wl, _profile(), "cidl", 500, budget_drops=[(full.latency_s / 2, 250)])
    assert res.ok
    waits = [e for e in res.trace.events if e.cat == "wait"]
    assert len(waits) == 1 and waits[0].bytes == 250 and waits[0].ts == pytest.approx(full.latency_s / 2)
    absorbed = waits[0].ts + waits[0].dur
    budget = [(c.ts, c.value) for c in res.trace.counters if c.name == "budget"]
    assert budget == [(0.0, 500), (absorbed, 250)]
    totals = [(c.ts, c.value) for c in res.trace.counters if c.name == "total"]
    assert all(v <= 250 for t, v in totals if t >= absorbed)
    assert "budget" in [r["reason"] for r in res.trace.meta.extra["replans"]]
    assert res.trace.meta.extra["budget_changes"][0]["absorbed_s"] == pytest.approx(absorbed)


def test_budget_drop_below_feasible_ends_the_run_and_keeps_the_trace() -> None:
    wl = _stdit(calls=4)
    res = simulate(wl, _profile(), "concurrent", 500, budget_drops=[(5.0, 60)])
    assert not res.ok and "too small" in (res.error or "") and "by " in (res.error or "")
    assert res.trace.meta.error == res.error
    # it ends when the drop arrives (nothing could ever absorb it), keeping what happened before
    assert res.latency_s == pytest.approx(5.0) and res.trace.events[-1].name == "budget too small"
    assert any(e.cat == "exec" for e in res.trace.events)


def test_budget_too_small_at_start_says_by_how_much() -> None:
    wl = _stdit()
    with pytest.raises(BudgetTooSmall, match=r"too small for toy by 1 bytes"):
        simulate(wl, _profile(), "sequential", 7 + 100 + 40 - 1)
    assert simulate(wl, _profile(), "sequential", 7 + 100 + 40).ok


def test_sim_never_imports_torch() -> None:
    code = ("import sys; import cidl.scheduler.sim, cidl.scheduler; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_full_pipeline_every_policy() -> None:
    from cidl.scheduler.costmodel import inventory_path
    from cidl.scheduler.pipeline import open_sora_workload

    if not inventory_path("full").exists():
        pytest.skip("full cost model not generated yet")
    wl = open_sora_workload()
    prof = DeviceProfile.model_validate({
        "name": "phone-like", "memory": {"total_bytes": 8 * 10**9, "app_budget_bytes": 33 * 10**8},
        "loading": {"per_load_overhead_s": 0.05, "bytes_per_s": {"fp32": 6e8, "int8": 6e8},
                    "max_total_bytes_per_s": 1e9, "loader_threads": 2},
        "units": {"gpu": {"peak_flops": 2.15e12, "efficiency": {"fp32": 0.5, "int8": 0.4},
                          "dispatch_overhead_s": 0.002}},
        "contention": {"load_slowdown": 1.1, "compute_slowdown": 1.05}, "calibration": {"calibrated": False}})
    got = {p: simulate(wl, prof, p, 33 * 10**8) for p in ("sequential", "concurrent", "cidl", "optimal")}
    for r in got.values():
        assert r.ok and r.lower_bound_s <= r.latency_s and r.peak_bytes <= 33 * 10**8
    assert got["optimal"].latency_s <= got["cidl"].latency_s <= got["concurrent"].latency_s
    assert got["concurrent"].latency_s < got["sequential"].latency_s
