"""The executor's semantics on a synthetic workload with fake blocks (fast, no models), then the real
policies on the tiny preset's real blocks."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from cidl.device_profiles.profile import (
    Calibration,
    ComputeUnit,
    Contention,
    DeviceProfile,
    LoadingSpec,
    MemorySpec,
)
from cidl.runtime.executor import DeadlockError, Executor, ExecutorError, ReplanPoint
from cidl.scheduler.schedule import CallOps, EvictOp, ExecOp, LoadOp, Op, Schedule
from cidl.scheduler.workload import Block, Stage, Workload

W = 100  # weight bytes of every fake block
WORK = 10


def _blk(model: str, i: int) -> Block:
    return Block(id=f"{model}.b{i}", model=model, index=i, weight_bytes={"fp32": W}, dtype="fp32",
                 resident_bytes=W, flops=1000, working_bytes=WORK, unit="gpu")


def _workload() -> Workload:
    return Workload(name="fake", preset="tiny", resolution=(64, 64), frames=17, steps=3, persistent_bytes=5,
                    stages=[
                        Stage(name="t5", model="t5", calls=1, shape={},
                              blocks=[_blk("t5", i) for i in range(2)]),
                        Stage(name="stdit", model="stdit", calls=3, shape={}, batch_splittable=2,
                              blocks=[_blk("stdit", i) for i in range(3)]),
                    ])


def _schedule(wl: Workload, start: tuple[int, int], budget: int, *, prefetch: bool, parts: int = 1,
              policy: str = "test", resident: tuple[str, ...] = ()) -> Schedule:
    """Sequential (load, exec, evict) or prefetching (the next block's load listed before this exec)."""
    calls: list[CallOps] = []
    order = [(si, c, b) for si, st in enumerate(wl.stages) for c in range(st.calls) for b in st.blocks
             if (si, c) >= start]
    prologue: list[Op] = [EvictOp(block=b) for b in resident if not prefetch or b != order[0][2].id]
    if prefetch and order and order[0][2].id not in resident:
        prologue.append(LoadOp(block=order[0][2].id, lane=0))
    for n, (si, c, b) in enumerate(order):
        st = wl.stages[si]
        if not calls or (calls[-1].stage, calls[-1].call) != (st.name, c):
            calls.append(CallOps(stage=st.name, call=c, ops=[]))
        ops = calls[-1].ops
        k = parts if st.batch_splittable > 1 else 1
        if not prefetch:
            ops.append(LoadOp(block=b.id, lane=0))
        elif n + 1 < len(order):
            ops.append(LoadOp(block=order[n + 1][2].id, lane=(n + 1) % 2))
        ops.extend(ExecOp(block=b.id, stage=st.name, call=c, queue=("gpu", "ane")[p], part=p, part_count=k)
                   for p in range(k))
        ops.append(EvictOp(block=b.id))
    return Schedule(policy=policy, workload=wl.content_hash(), budget_bytes=budget, loader_threads=2,
                    prefetch_depth=int(prefetch), start_stage=start[0], start_call=start[1],
                    prologue=prologue, calls=calls)


class _Planner:
    def __init__(self, wl: Workload, prefetch: bool = True, parts: int = 1) -> None:
        self.wl, self.prefetch, self.parts = wl, prefetch, parts
        self.points: list[ReplanPoint] = []

    def plan(self, point: ReplanPoint) -> Schedule:
        self.points.append(point)
        return _schedule(self.wl, (point.stage, point.call), point.budget_bytes, prefetch=self.prefetch,
                         parts=self.parts, resident=point.resident)


class _Blocks:
    def __init__(self, fail_on: str | None = None, delay: float = 0.005) -> None:
        self.fail_on, self.delay = fail_on, delay
        self.log: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    def load(self, block_id: str, cold: bool) -> int:
        time.sleep(self.delay)
        if block_id == self.fail_on:
            raise OSError(f"/store/{block_id}.fp32.safetensors: sha256 mismatch")
        with self.lock:
            self.log.append(("load", block_id))
        return W

    def unload(self, block_id: str) -> None:
        with self.lock:
            self.log.append(("evict", block_id))

    def run(self, block_id: str, carry: dict, queue: str) -> dict:
        time.sleep(self.delay)
        with self.lock:
            self.log.append(("exec", block_id))
        return {**carry, "x": [*carry["x"], block_id]}


class _Split:
    def split(self, carry: dict, parts: int) -> list[dict]:
        return [dict(carry, part=p) for p in range(parts)]

    def merge(self, carries: list[dict]) -> dict:
        assert all(c["x"] == carries[0]["x"] for c in carries)
        return {k: v for k, v in carries[0].items() if k != "part"}


def _drive(ex: Executor, wl: Workload, before_call=None) -> list[list[str]]:
    outs = []
    ex.start()
    try:
        for _si, st in enumerate(wl.stages):
            for c in range(st.calls):
                if before_call:
                    before_call(ex, st.name, c)
                outs.append(ex.run_call(st.name, c, {"x": []})["x"])
        ex.finish()
    finally:
        ex.close()
    return outs


def _no_threads_left(ex: Executor) -> bool:
    return not any(t.is_alive() for t in ex.threads) and not any(
        t.name.startswith("cidl-") for t in threading.enumerate())


@pytest.mark.parametrize("prefetch,parts", [(False, 1), (True, 1), (True, 2)])
def test_follows_schedule_within_budget(prefetch: bool, parts: int) -> None:
    wl = _workload()
    budget = 5 + 2 * W + 2 * WORK  # persistent + two blocks + two working halves
    blocks = _Blocks()
    planner = _Planner(wl, prefetch, parts)
    ex = Executor(wl, blocks, planner, budget, splitters={"stdit": _Split()}, rss_interval_s=None)
    outs = _drive(ex, wl)
    tr = ex.close()
    # Every call ran its blocks in pipeline order; execs in the order the Schedule lists them.
    assert outs == [["t5.b0", "t5.b1"]] + [["stdit.b0", "stdit.b1", "stdit.b2"]] * 3
    execs = [e for e in tr.events if e.cat == "exec"]
    assert len(execs) == 2 + 3 * 3 * parts
    listed = [(op.block, op.call) for s in ex._segments for op in s.ops() if isinstance(op, ExecOp)]
    ran = [(e.block, e.call) for e in sorted(execs, key=lambda e: e.ts)]
    assert sorted(set(ran), key=ran.index) == sorted(set(listed), key=listed.index)
    assert tr.peak("total") <= budget and ex.budget.peak <= budget
    assert [p.reason for p in planner.points] == ["start", "first-call"]  # stdit has 3 calls
    assert len(tr.meta.schedule_hashes) == 2 and tr.meta.source == "host"
    assert _no_threads_left(ex)
    # A prefetching schedule keeps two blocks resident at once; a sequential one never does.
    assert max(s.value for s in tr.counters if s.name == "resident") == (2 * W if prefetch else W)


def test_deadlock_is_reported() -> None:
    wl = _workload()
    budget = 5 + W + WORK  # one block at a time ...
    planner = _Planner(wl, prefetch=True)  # ... but the plan loads the next block before evicting
    ex = Executor(wl, _Blocks(), planner, budget, rss_interval_s=None)
    t0 = time.monotonic()
    with pytest.raises(DeadlockError, match="deadlock at op .*load\\(t5.b1\\).*memory"):
        _drive(ex, wl)
    assert time.monotonic() - t0 < 5
    assert _no_threads_left(ex)


def test_thread_error_reaches_caller_and_stops_everything() -> None:
    wl = _workload()
    blocks = _Blocks(fail_on="stdit.b1")
    ex = Executor(wl, blocks, _Planner(wl), 10**6, rss_interval_s=None)
    t0 = time.monotonic()
    with pytest.raises(ExecutorError, match="stdit.b1.fp32.safetensors"):
        _drive(ex, wl)
    assert time.monotonic() - t0 < 5
    tr = ex.close()
    assert tr.meta.error and "stdit.b1" in tr.meta.error
    assert any(e.cat == "exec" for e in tr.events)  # the trace so far is kept
    assert _no_threads_left(ex)


def test_budget_drop_replans_and_is_absorbed() -> None:
    wl = _workload()
    big, small = 5 + 3 * W + 2 * WORK, 5 + 2 * W + WORK
    planner = _Planner(wl, prefetch=True)
    ex = Executor(wl, _Blocks(), planner, big, rss_interval_s=None, budget_drops=[("stdit", 2, small)])
    outs = _drive(ex, wl)
    tr = ex.close()
    assert outs[-1] == ["stdit.b0", "stdit.b1", "stdit.b2"]
    reasons = [p.reason for p in planner.points]
    assert reasons == ["start", "first-call", "budget"]
    assert planner.points[-1].budget_bytes == small
    change = tr.meta.extra["budget_changes"][0]
    assert change["drop"] and change["absorbed_s"] is not None
    assert change["absorbed_s"] >= change["requested_s"]
    budgets = [s for s in tr.counters if s.name == "budget"]
    assert [s.value for s in budgets] == [big, small]
    after = [s.value for s in tr.counters if s.name == "total" and s.ts >= budgets[-1].ts]
    assert max(after) <= small
    assert _no_threads_left(ex)


def test_plan_refused_on_drop_ends_run_with_trace() -> None:
    wl = _workload()

    class Refusing(_Planner):
        def plan(self, point: ReplanPoint) -> Schedule:
            if point.reason == "budget":
                raise ValueError(f"budget {point.budget_bytes} is 195 bytes below the smallest feasible")
            return super().plan(point)

    ex = Executor(wl, _Blocks(), Refusing(wl), 10**6, rss_interval_s=None, budget_drops=[("stdit", 1, 10)])
    with pytest.raises(ExecutorError, match="195 bytes below"):
        _drive(ex, wl)
    tr = ex.close()
    assert "195 bytes below" in (tr.meta.error or "") and tr.events
    assert _no_threads_left(ex)


# ------------------------------------------------------------------------- the real policies, real blocks


def _profile() -> DeviceProfile:
    unit = ComputeUnit(peak_flops=5e10, efficiency={"fp32": 0.5, "fp16": 0.5, "int8": 0.5},
                       dispatch_overhead_s=2e-5)
    return DeviceProfile(
        name="test-host", memory=MemorySpec(total_bytes=8 * 10**9, app_budget_bytes=4 * 10**9),
        loading=LoadingSpec(per_load_overhead_s=1e-3, bytes_per_s={"fp32": 4e8, "fp16": 4e8, "int8": 4e8},
                            max_total_bytes_per_s=6e8, loader_threads=2),
        units={"gpu": unit, "cpu": unit}, contention=Contention(load_slowdown=1.1, compute_slowdown=1.05),
        calibration=Calibration(calibrated=False),
    )


@pytest.fixture(scope="session")
def tiny_store(request: pytest.FixtureRequest) -> Path:
    """The tiny preset's store, kept in pytest's cache between sessions: ``prepare_store`` is idempotent and
    re-verifies every file's sha256, rewriting any that does not match."""
    from cidl.runtime.store import prepare_store

    return prepare_store("tiny", request.config.cache.mkdir("cidl-store-tiny-fp32"))


def _budget_at(counters: list, ts: float) -> int:
    """The budget in force at ``ts`` (the budget counter is a step function)."""
    value = None
    for c in counters:
        if c.name == "budget" and c.ts <= ts:
            value = c.value
    assert value is not None
    return value


@pytest.mark.parametrize("policy", ["sequential", "concurrent", "cidl", "optimal"])
def test_real_blocks_follow_schedule_within_budget(tiny_store, policy: str, tmp_path) -> None:
    from cidl.runtime.run import BudgetDrop, run_pipeline

    drop = BudgetDrop(24_000_000, stage="stdit", call=1)
    for budget, drops in ((22_000_000, []), (60_000_000, [drop])):
        r = run_pipeline("tiny", out_dir=tmp_path, store=tiny_store, policy=policy, budget=budget,
                         host_profile=_profile(), frames=17, steps=3, tdtm_steps=1, budget_drops=drops,
                         write_outputs=False)
        tr = r.trace
        # Execs started in the order the Schedule segments list them, which is the pipeline's order.
        names = [st.name for st in r.workload.stages]
        listed: list[tuple[str, str, int]] = []
        for i, seg in enumerate(r.schedules):
            nxt = None if i + 1 == len(r.schedules) else (r.schedules[i + 1].start_stage,
                                                          r.schedules[i + 1].start_call)
            for co in seg.calls:
                if nxt is not None and (names.index(co.stage), co.call) >= nxt:
                    break
                listed += [(op.stage, op.block, op.call) for op in co.ops if isinstance(op, ExecOp)]
        execs = sorted((e for e in tr.events if e.cat == "exec"), key=lambda e: e.ts)
        ran = [(e.stage, e.block, e.call) for e in execs]
        assert list(dict.fromkeys(ran)) == list(dict.fromkeys(listed)), policy
        assert len(ran) == len(listed)
        expected = [(st.name, b.id, c) for st in r.workload.stages for c in range(st.calls)
                    for b in st.blocks]
        assert list(dict.fromkeys(ran)) == expected
        # Accounted bytes never exceed the budget in force.
        for c in tr.counters:
            if c.name == "total":
                assert c.value <= _budget_at(tr.counters, c.ts), (policy, budget, c)
        assert tr.peak("total") <= budget
        if drops:
            assert [c.value for c in tr.counters if c.name == "budget"] == [budget, 24_000_000]
