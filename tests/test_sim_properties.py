"""Hypothesis: random workloads, profiles (1-4 loader threads, 1-3 queues), budgets and budget drops.

Invariants: no instant above the budget in force; every exec between its block's load and eviction; same
input -> same trace; latency >= the lower bound; optimal <= cidl (without drops).
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cidl.device_profiles.profile import DeviceProfile
from cidl.scheduler import PolicyOptions, make_options, min_feasible_budget, simulate
from cidl.scheduler.sim import SimResult
from cidl.scheduler.workload import Block, Stage, Workload

MODELS = ("t5", "stdit", "vae_temporal", "vae_2d")
UNITS = ("gpu", "ane", "cpu")


@st.composite
def workloads(draw: st.DrawFn) -> Workload:
    n_stages = draw(st.integers(1, 3))
    stages = []
    prev_model: str | None = None
    prev_blocks: list[Block] = []
    for s in range(n_stages):
        # sometimes a second stage of the same model over the same weights (like TDTM-merged STDiT steps)
        same = prev_model is not None and draw(st.integers(0, 3)) == 0
        model = prev_model if same else MODELS[s % len(MODELS)]
        blocks = []
        n_blocks = len(prev_blocks) if same else draw(st.integers(1, 4))
        for i in range(n_blocks):
            if same:
                p = prev_blocks[i]
                nbytes, dtype, resident = p.load_bytes, p.dtype, p.resident_bytes
            else:
                nbytes = draw(st.integers(1, 1000))
                dtype = draw(st.sampled_from(["fp32", "int8"]))
                # an int8 block may be resident dequantized (4x), as on a host
                resident = nbytes * draw(st.sampled_from([1, 4])) if dtype == "int8" else nbytes
            blocks.append(Block(
                id=f"{model}.b{i}", model=model, index=i, weight_bytes={dtype: nbytes}, dtype=dtype,  # type: ignore[arg-type]
                resident_bytes=resident, flops=draw(st.integers(0, 2000)),
                working_bytes=draw(st.integers(0, 600)), unit=draw(st.sampled_from(UNITS)),
            ))
        stages.append(Stage(name=f"s{s}", model=model, calls=draw(st.integers(1, 4)), shape={},  # type: ignore[arg-type]
                            batch_splittable=draw(st.integers(1, 2)), blocks=blocks))
        prev_model, prev_blocks = model, blocks
    return Workload(name="rand", preset="tiny", resolution=(64, 64), frames=1, steps=1,
                    persistent_bytes=draw(st.integers(0, 300)), stages=stages)


@st.composite
def profiles(draw: st.DrawFn) -> DeviceProfile:
    n_units = draw(st.integers(1, 3))
    units = {}
    for k, u in enumerate(UNITS[:n_units]):
        eff = {"fp32": draw(st.floats(0.2, 1.0))}
        if k == 0 or draw(st.booleans()):  # the first queue runs every dtype; others maybe not int8
            eff["int8"] = draw(st.floats(0.2, 1.0))
        units[u] = {"peak_flops": draw(st.floats(50, 500)), "efficiency": eff,
                    "dispatch_overhead_s": draw(st.floats(0, 0.5))}
    rate = draw(st.floats(50, 500))
    rates = {"fp32": rate, "int8": draw(st.floats(50, 500))}
    return DeviceProfile.model_validate({
        "name": "rand", "memory": {"total_bytes": 10**9, "app_budget_bytes": 10**9},
        "loading": {"per_load_overhead_s": draw(st.floats(0, 1)), "bytes_per_s": rates,
                    "max_total_bytes_per_s": rate * draw(st.floats(0.5, 4)),
                    "loader_threads": draw(st.integers(1, 4))},
        "units": units,
        "contention": {"load_slowdown": draw(st.floats(1, 2)), "compute_slowdown": draw(st.floats(1, 2))},
        "calibration": {"calibrated": False}})


@st.composite
def cases(draw: st.DrawFn, drops: bool) -> tuple[Workload, DeviceProfile, int, list[tuple[float, int]]]:
    wl = draw(workloads())
    prof = draw(profiles())
    lo = min_feasible_budget(wl)
    total = sum(b.resident_bytes for b in wl.distinct_blocks().values())
    budget = draw(st.integers(lo, lo + total + 600))
    changes: list[tuple[float, int]] = []
    if drops:
        for _ in range(draw(st.integers(1, 2))):
            changes.append((draw(st.floats(0, 60)), draw(st.integers(max(1, lo - 200), budget + 300))))
    return wl, prof, budget, changes


def _check_invariants(res: SimResult) -> None:
    tr = res.trace
    # the budget in force and the accounted total, as step functions: never above it at any instant
    points = sorted({c.ts for c in tr.counters})
    cur: dict[str, int] = {}
    by_ts: dict[float, list] = {}
    for c in tr.counters:
        by_ts.setdefault(c.ts, []).append(c)
    for t in points:
        for c in by_ts[t]:
            cur[c.name] = c.value
        assert cur["total"] <= cur["budget"], f"t={t}: {cur['total']} > {cur['budget']}"
        assert cur["total"] == cur["resident"] + cur["inflight"] + cur["working"] + cur["persistent"]
    assert res.peak_bytes <= max(c.value for c in tr.counters if c.name == "budget")
    # every exec after its block's load ended and before its eviction
    loads: dict[str, list[tuple[float, float]]] = {}
    evicts: dict[str, list[float]] = {}
    for e in tr.events:
        if e.cat == "load":
            loads.setdefault(e.block or "", []).append((e.ts, e.ts + e.dur))
        elif e.cat == "evict":
            evicts.setdefault(e.block or "", []).append(e.ts)
    eps = 1e-9
    for e in tr.events:
        if e.cat != "exec":
            continue
        done = [end for _, end in loads.get(e.block or "", []) if end <= e.ts + eps]
        assert done, f"exec {e.block} at {e.ts} before any load of it ended"
        loaded = max(done)
        assert not any(loaded + eps < t < e.ts + e.dur - eps for t in evicts.get(e.block or "", [])), \
            f"{e.block} evicted between its load and the end of its exec at {e.ts}"


@st.composite
def options(draw: st.DrawFn, policy: str) -> PolicyOptions | None:
    if draw(st.booleans()):
        return None
    units = draw(st.sampled_from([None, ["gpu"], ["gpu", "ane", "cpu"]]))
    if policy == "sequential":
        return make_options(policy, units=units)
    threads = draw(st.integers(1, 4))
    depth = draw(st.integers(1, 3))
    if policy == "optimal":
        return make_options(policy, units=units, loader_threads=draw(st.sampled_from([None, threads])),
                            prefetch_depth=draw(st.sampled_from([None, depth])))
    return make_options(policy, units=units, loader_threads=threads, prefetch_depth=depth)


policies_and_options = st.sampled_from(["sequential", "concurrent", "cidl", "optimal"]).flatmap(
    lambda p: st.tuples(st.just(p), options(p)))

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(cases(drops=False), policies_and_options)
def test_invariants_without_drops(case, policy_options) -> None:
    wl, prof, budget, _ = case
    policy, opts = policy_options
    res = simulate(wl, prof, policy, budget, options=opts, trace_id="p")
    assert res.ok
    _check_invariants(res)
    assert res.latency_s >= res.lower_bound_s * (1 - 1e-9)
    again = simulate(wl, prof, policy, budget, options=opts, trace_id="p")
    assert again.trace == res.trace


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases(drops=False))
def test_optimal_never_worse_than_cidl(case) -> None:
    wl, prof, budget, _ = case
    opt = simulate(wl, prof, "optimal", budget)
    cidl = simulate(wl, prof, "cidl", budget)
    assert opt.latency_s <= cidl.latency_s * (1 + 1e-9) + 1e-12


@FAST
@given(cases(drops=True), policies_and_options)
def test_invariants_with_budget_drops(case, policy_options) -> None:
    wl, prof, budget, drops = case
    policy, opts = policy_options
    res = simulate(wl, prof, policy, budget, options=opts, budget_drops=drops, trace_id="d")
    _check_invariants(res)
    if res.ok:
        assert res.latency_s >= res.lower_bound_s * (1 - 1e-9)
    else:
        assert "too small" in (res.error or "")
    again = simulate(wl, prof, policy, budget, options=opts, budget_drops=drops, trace_id="d")
    assert again.trace == res.trace
