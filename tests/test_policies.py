"""Policies: the registry, the shape of each policy's Schedule, retention, re-plans, refusals."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest

from cidl.device_profiles.profile import DeviceProfile
from cidl.scheduler import (
    BudgetTooSmall,
    CidlOptions,
    OptimalOptions,
    PlanState,
    PolicyName,
    Schedule,
    make_options,
    make_policy,
    min_feasible_budget,
    resident_before,
)
from cidl.scheduler.policies import REGISTRY, OptimalVariant, create_policy
from cidl.scheduler.policies.common import knapsack
from cidl.scheduler.schedule import EvictOp, ExecOp, LoadOp
from cidl.scheduler.workload import Block, Stage, Workload

POLICY_DIR = Path(__file__).resolve().parents[1] / "scheduler" / "policies"


def _profile(units: tuple[str, ...] = ("gpu",), threads: int = 2) -> DeviceProfile:
    return DeviceProfile.model_validate({
        "name": "toy", "memory": {"total_bytes": 10**12, "app_budget_bytes": 10**12},
        "loading": {"per_load_overhead_s": 0.0, "bytes_per_s": {"fp32": 100.0},
                    "max_total_bytes_per_s": 200.0, "loader_threads": threads},
        "units": {u: {"peak_flops": 1.0, "efficiency": {"fp32": 1.0}, "dispatch_overhead_s": 0.0}
                  for u in units},
        "contention": {"load_slowdown": 1.0, "compute_slowdown": 1.0}, "calibration": {"calibrated": False}})


def _block(model: str, name: str, i: int, nbytes: int, flops: int = 4, working: int = 40) -> Block:
    return Block(id=f"{model}.{name}", model=model, index=i, weight_bytes={"fp32": nbytes}, dtype="fp32",
                 resident_bytes=nbytes, flops=flops, working_bytes=working, unit="gpu")


def _workload(steps: int = 3) -> Workload:
    stdit = [_block("stdit", "part1", 0, 10, 1, 5)]
    stdit += [_block("stdit", f"block{i:02d}", i + 1, 100) for i in range(4)]
    stdit += [_block("stdit", "part2", 5, 10, 1, 5)]
    return Workload(name="toy", preset="tiny", resolution=(64, 64), frames=1, steps=steps, persistent_bytes=7,
                    stages=[
                        Stage(name="t5", model="t5", calls=1, shape={},
                              blocks=[_block("t5", "b0", 0, 100), _block("t5", "b1", 1, 100)]),
                        Stage(name="stdit", model="stdit", calls=steps, shape={}, batch_splittable=2,
                              blocks=stdit),
                        Stage(name="vae", model="vae_2d", calls=2, shape={},
                              blocks=[_block("vae_2d", "d0", 0, 50)]),
                    ])


WL = _workload()


def _state(budget: int, **kw) -> PlanState:
    return PlanState(WL, kw.pop("profile", _profile()), budget, **kw)


def _check_static(sched: Schedule, state: PlanState) -> None:
    """The deadlock-freedom invariant: at every load and exec, listed-but-not-evicted weights plus the op's
    own bytes fit the budget; ops reference blocks in a valid state."""
    blocks = state.workload.distinct_blocks()
    held = set(state.resident)
    static = state.workload.persistent_bytes + sum(blocks[b].resident_bytes for b in held)
    for op in sched.ops():
        if isinstance(op, LoadOp):
            assert op.block not in held, f"load of resident {op.block}"
            assert op.lane < sched.loader_threads
            held.add(op.block)
            static += blocks[op.block].resident_bytes
            assert static <= sched.budget_bytes
        elif isinstance(op, ExecOp):
            assert op.block in held, f"exec of {op.block} not loaded"
            stage = next(s for s in state.workload.stages if s.name == op.stage)
            w = state.working(state.workload.stages.index(stage), blocks[op.block])
            assert static + math.ceil(w / op.part_count) <= sched.budget_bytes
        else:
            assert op.block in held, f"evict of {op.block} not resident"
            held.discard(op.block)
            static -= blocks[op.block].resident_bytes
    assert not held, f"left resident: {held}"


def _execs(sched: Schedule) -> list[ExecOp]:
    return [op for op in sched.ops() if isinstance(op, ExecOp)]


def test_registry_keys_are_exactly_the_four_names() -> None:
    assert [p.value for p in PolicyName] == ["sequential", "concurrent", "cidl", "optimal"]
    assert set(REGISTRY) == set(PolicyName)
    for p in PolicyName:
        assert create_policy(p).name == p.value
    with pytest.raises(ValueError, match="unknown policy 'fast'"):
        create_policy("fast")
    with pytest.raises(ValueError, match="options.kind is 'cidl'"):
        create_policy("optimal", CidlOptions())
    opts = make_options("optimal", loader_threads=3, units=["gpu"])
    assert isinstance(opts, OptimalOptions) and opts.loader_threads == 3 and opts.prefetch_depth is None
    assert make_options("sequential", loader_threads=4).kind == "sequential"


def test_policies_import_neither_simpy_nor_threading() -> None:
    for path in POLICY_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for n in names:
                assert n.split(".")[0] not in ("simpy", "threading", "torch"), f"{path.name} imports {n}"
                assert ".sim" not in n and n != "sim", f"{path.name} imports the simulator"


def test_sequential_is_load_exec_evict() -> None:
    sched = make_policy("sequential").plan(_state(10**6))
    kinds = [(op.kind, op.block) for op in sched.ops()][:6]
    assert kinds == [("load", "t5.b0"), ("exec", "t5.b0"), ("evict", "t5.b0"),
                     ("load", "t5.b1"), ("exec", "t5.b1"), ("evict", "t5.b1")]
    assert sched.loader_threads == 1 and sched.prefetch_depth == 0 and sched.retained == []
    _check_static(sched, _state(10**6))


def test_concurrent_prefetches_one_block_and_runs_the_first_stdit_step_sequentially() -> None:
    state = _state(10**6)
    sched = make_policy("concurrent").plan(state)
    _check_static(sched, state)
    ops = [(op.kind, op.block) for op in sched.ops()]
    # T5: the next block loads right after the current one starts
    assert ops[:3] == [("load", "t5.b0"), ("exec", "t5.b0"), ("load", "t5.b1")]
    # STDiT step 0: every load after the previous block's eviction (no overlap), part1 after T5 finished
    step0 = sched.calls[1].ops
    for i, op in enumerate(step0):
        if isinstance(op, LoadOp) and op.block.startswith("stdit") and i > 0:
            assert isinstance(step0[i - 1], EvictOp) or isinstance(step0[i - 1], ExecOp) and \
                step0[i - 1].block == "stdit.part2"
    # nothing retained; part1/part2 reload every step
    assert sched.retained == []
    loads = [op.block for op in sched.ops() if isinstance(op, LoadOp)]
    assert loads.count("stdit.part1") == 3 and loads.count("stdit.block00") == 3


def test_cidl_keeps_the_first_n_blocks_that_fit_after_measuring() -> None:
    start = make_policy("cidl").plan(_state(700))
    assert not any(b.startswith("stdit") for b in start.retained)  # not measured yet
    measured = {"stdit": {b.id: b.working_bytes for b in WL.stages[1].blocks}}
    state = _state(700, stage=1, call=1, measured_working=measured, reason="first-call",
                   resident=frozenset({"stdit.part1"}))
    sched = make_policy("cidl").plan(state)
    _check_static(sched, state)
    stdit_kept = [b for b in sched.retained if b.startswith("stdit")]
    # 700 - 7 persistent - (40 working + 2 x 100 stream) = 453 -> 4 blocks of 100 fit
    assert stdit_kept == ["stdit.block00", "stdit.block01", "stdit.block02", "stdit.block03"]
    loads = [op.block for op in sched.ops() if isinstance(op, LoadOp)]
    assert loads.count("stdit.block00") == 1 and loads.count("stdit.part1") == 1  # part1 resident for call 1
    assert loads.count("stdit.part2") == 2
    smaller = make_policy("cidl").plan(_state(450, stage=1, call=1, measured_working=measured))
    assert [b for b in smaller.retained if b.startswith("stdit")] == ["stdit.block00", "stdit.block01"]


def test_budget_drop_replan_evicts_blocks_no_longer_kept() -> None:
    measured = {"stdit": {b.id: b.working_bytes for b in WL.stages[1].blocks}}
    resident = frozenset({"stdit.block00", "stdit.block01", "stdit.block02", "stdit.block03"})
    state = _state(350, stage=1, call=1, measured_working=measured, reason="budget", resident=resident)
    sched = make_policy("cidl").plan(state)
    _check_static(sched, state)
    # 350 - 7 - (40 + 2 x 100) = 103: one block stays; block01, the next streamed one, is kept (the window)
    assert [b for b in sched.retained if b.startswith("stdit")] == ["stdit.block00"]
    assert [op.block for op in sched.prologue] == ["stdit.block02", "stdit.block03"]


def test_optimal_overlaps_from_the_first_block_and_crosses_models() -> None:
    state = _state(10**6)
    sched = OptimalVariant(depth=2, lanes=2, split=False).plan(state)
    _check_static(sched, state)
    ops = sched.ops()
    # loads of the first STDiT blocks are listed before T5's last exec (prefetch across the model boundary)
    last_t5 = max(i for i, op in enumerate(ops) if isinstance(op, ExecOp) and op.block == "t5.b1")
    first_stdit = min(i for i, op in enumerate(ops)
                      if isinstance(op, LoadOp) and op.block.startswith("stdit"))
    assert first_stdit < last_t5
    assert {op.lane for op in ops if isinstance(op, LoadOp)} == {0, 1}
    # everything fits: every STDiT block is kept and loaded once
    loads = [op.block for op in ops if isinstance(op, LoadOp)]
    assert all(loads.count(b.id) == 1 for b in WL.stages[1].blocks)


def test_optimal_splits_batch_halves_across_two_queues() -> None:
    state = _state(10**6, profile=_profile(("gpu", "ane")))
    sched = OptimalVariant(depth=1, lanes=1, split=True).plan(state)
    _check_static(sched, state)
    stdit = [op for op in _execs(sched) if op.stage == "stdit" and op.block == "stdit.block00"]
    assert [(op.queue, op.part, op.part_count) for op in stdit[:2]] == [("gpu", 0, 2), ("ane", 1, 2)]
    t5 = [op for op in _execs(sched) if op.stage == "t5"]
    assert all(op.part_count == 1 for op in t5)  # T5 is not splittable


def test_optimal_keeps_what_saves_most_per_byte() -> None:
    assert knapsack([10.0, 6.0, 6.0], [100, 50, 50], 100) == [1, 2]
    assert knapsack([10.0, 1.0], [100, 50], 120) == [0]
    assert knapsack([5.0], [10], 0) == []


@pytest.mark.parametrize("policy", [p.value for p in PolicyName])
@pytest.mark.parametrize("budget_extra", [0, 60, 150, 400, 10**6])
def test_every_policy_fits_every_feasible_budget(policy: str, budget_extra: int) -> None:
    budget = min_feasible_budget(WL) + budget_extra
    for state in (_state(budget), _state(budget, stage=1, call=1, resident=frozenset({"stdit.part1"}),
                                         reason="first-call")):
        sched = make_policy(policy).plan(state)
        assert (sched.start_stage, sched.start_call) == (state.stage, state.call)
        assert sched.budget_bytes == budget and sched.policy == policy
        _check_static(sched, state)


def test_budget_too_small_says_by_how_many_bytes() -> None:
    need = min_feasible_budget(WL)
    assert need == 7 + 100 + 40
    for p in PolicyName:
        with pytest.raises(BudgetTooSmall, match=r"by 5 bytes"):
            make_policy(p.value).plan(_state(need - 5))
    try:
        make_policy("cidl").plan(_state(need - 5))
    except BudgetTooSmall as e:
        assert (e.shortfall_bytes, e.needed_bytes, e.budget_bytes) == (5, need, need - 5)
        assert "t5.b0" in str(e)


def test_optimal_resumes_its_choice_at_first_call_replans() -> None:
    pol = make_policy("optimal")
    first = pol.plan(_state(600))
    assert first.policy == "optimal" and first.plan_options["variant"] in ("optimal", "cidl")
    state = _state(600, stage=1, call=1, reason="first-call", current=first,
                   measured_working={"stdit": {b.id: b.working_bytes for b in WL.stages[1].blocks}})
    again = pol.plan(state)
    assert again.plan_options == first.plan_options


def test_resident_before_a_call_is_what_earlier_calls_prefetched() -> None:
    sched = make_policy("concurrent").plan(_state(10**6))
    # part1 prefetched for step 1; part2's eviction is listed in step 1 (before its first exec)
    assert resident_before(sched, WL, 1, 1) == {"stdit.part1", "stdit.part2"}
    assert resident_before(sched, WL, 0, 0) == frozenset()
    # a fresh plan from that resident set is consistent with it
    state = _state(10**6, stage=1, call=1, resident=resident_before(sched, WL, 1, 1), reason="first-call")
    _check_static(make_policy("concurrent").plan(state), state)


def test_host_kernels_price_int8_blocks_at_their_fp32_kernels() -> None:
    """A host dequantizes int8 at load: the block loads as int8 but is resident and computed as fp32."""
    from cidl.scheduler.pipeline import open_sora_workload

    phone = open_sora_workload(64, 17, 2, preset="tiny")
    host = open_sora_workload(64, 17, 2, preset="tiny", dtypes={"stdit": "int8"}, kernel_dtype="fp32")
    b_phone = next(b for b in phone.stages[0].blocks if b.id == "t5.block00")
    b_host = next(b for b in host.stages[0].blocks if b.id == "t5.block00")
    assert (b_phone.dtype, b_phone.kernel_dtype) == ("int8", "int8")
    assert (b_host.dtype, b_host.kernel_dtype, b_host.load_bytes) == ("int8", "fp32", b_phone.load_bytes)
    assert b_host.resident_bytes == b_host.weight_bytes["fp32"] > b_phone.resident_bytes
    st = next(b for b in host.stages[1].blocks if b.id == "stdit.block00")
    assert (st.dtype, st.kernel_dtype, st.resident_bytes) == ("int8", "fp32", st.weight_bytes["fp32"])
