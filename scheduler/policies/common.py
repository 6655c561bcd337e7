"""Helpers the policies share: queue choice, retention (first N / knapsack), and falling back to what fits."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace

import numpy as np

from cidl.device_profiles.profile import DeviceProfile, Unit

from ..plan import PlanState, check_feasible
from ..schedule import Schedule
from ..workload import Block
from .builder import Infeasible, PlanSpec, build


def usable_units(profile: DeviceProfile, allowed: Sequence[Unit] | None) -> list[Unit]:
    """Queues of the profile the options allow, in the fixed order gpu, ane, cpu."""
    units = [u for u in ("gpu", "ane", "cpu") if u in profile.units]
    if allowed is not None:
        units = [u for u in units if u in allowed]
    if not units:
        raise ValueError(f"options.units {list(allowed or [])}: none of them is in profile {profile.name} "
                         f"(it has {', '.join(profile.units)})")
    return units


def _runnable(profile: DeviceProfile, units: list[Unit], block: Block) -> list[Unit]:
    ok = [u for u in units if block.kernel_dtype in profile.units[u].efficiency]
    if not ok:
        raise ValueError(f"block {block.id} ({block.kernel_dtype}) cannot run on any of {units} in profile "
                         f"{profile.name}")
    return ok


Queues = dict[int, dict[str, tuple[Unit, ...]]]  # stage index -> block id -> the queue of each batch part


def preferred_queues(state: PlanState, allowed: Sequence[Unit] | None) -> Queues:
    """The app's choice: each block on its preferred unit when allowed, else the first unit that runs it."""
    units = usable_units(state.profile, allowed)
    out: dict[int, dict[str, tuple[Unit, ...]]] = {}
    for s in range(state.stage, len(state.workload.stages)):
        row: dict[str, tuple[Unit, ...]] = {}
        for b in state.workload.stages[s].blocks:
            ok = _runnable(state.profile, units, b)
            row[b.id] = (b.unit if b.unit in ok else ok[0],)
        out[s] = row
    return out


def fastest_queues(state: PlanState, allowed: Sequence[Unit] | None, split: bool) -> Queues:
    """Each block on its fastest queue; with ``split``, a splittable call's batch parts on the fastest
    queues when that finishes sooner than the whole call on one."""
    prof = state.profile
    units = usable_units(prof, allowed)
    out: dict[int, dict[str, tuple[Unit, ...]]] = {}
    for s in range(state.stage, len(state.workload.stages)):
        stage = state.workload.stages[s]
        row: dict[str, tuple[Unit, ...]] = {}
        for b in stage.blocks:
            ok = _runnable(prof, units, b)
            ranked = sorted(ok, key=lambda u: (prof.units[u].exec_seconds(b.flops, b.kernel_dtype), ok.index(u)))
            choice: tuple[Unit, ...] = (ranked[0],)
            parts = min(stage.batch_splittable, len(ranked))
            if split and parts > 1:
                qs = tuple(ranked[:parts])
                t_split = max(prof.units[u].exec_seconds(b.flops / parts, b.kernel_dtype) for u in qs)
                if t_split < prof.units[ranked[0]].exec_seconds(b.flops, b.kernel_dtype):
                    choice = qs
            row[b.id] = choice
        out[s] = row
    return out


def splittable(state: PlanState, allowed: Sequence[Unit] | None) -> bool:
    """Whether splitting changes anything: some call would run its parts on more than one queue."""
    plain = fastest_queues(state, allowed, split=False)
    return plain != fastest_queues(state, allowed, split=True)


def load_seconds(profile: DeviceProfile, block: Block) -> float:
    """One load of ``block`` alone on an idle device."""
    ld = profile.loading
    rate = min(ld.bytes_per_s[block.dtype], ld.max_total_bytes_per_s)
    return ld.per_load_overhead_s + block.load_bytes / rate


def is_stdit_part(block: Block) -> bool:
    """STDiT's part1 (embedders) and part2 (final layer), which the app reloads every step."""
    return block.model == "stdit" and block.id.rsplit(".", 1)[-1] in ("part1", "part2")


def repeated_models(state: PlanState) -> dict[str, list[int]]:
    """Model -> its remaining stage indices, for models whose blocks run more than once from here on."""
    uses: dict[str, int] = {}
    stages: dict[str, list[int]] = {}
    for s, _c in state.remaining_calls():
        m = state.workload.stages[s].model
        uses[m] = uses.get(m, 0) + 1
        if s not in stages.setdefault(m, []):
            stages[m].append(s)
    return {m: st for m, st in stages.items() if uses[m] > 1}


def stream_reserve(state: PlanState, stages: Iterable[int], depth: int) -> int:
    """Bytes the streamed (not retained) blocks of ``stages`` need at their peak: the running block, its
    working bytes and ``depth`` prefetch buffers, each block counted at the largest size."""
    w = rb = 0
    for s in stages:
        for b in state.workload.stages[s].blocks:
            w = max(w, state.working(s, b))
            rb = max(rb, b.resident_bytes)
    return w + (1 + depth) * rb


def first_n(state: PlanState, stages: list[int], candidates: list[Block], depth: int) -> list[str]:
    """Dynamic Loading as the app does it: the longest prefix of ``candidates`` fitting beside the stream."""
    cap = state.budget_bytes - state.workload.persistent_bytes - stream_reserve(state, stages, depth)
    out: list[str] = []
    total = 0
    for b in candidates:
        if total + b.resident_bytes > cap:
            break
        total += b.resident_bytes
        out.append(b.id)
    return out


def knapsack(values: list[float], weights: list[int], capacity: int, resolution: int = 2000) -> list[int]:
    """0/1 knapsack on weights rounded *up* to ``capacity / resolution`` (so the pick always fits)."""
    if capacity <= 0 or not values:
        return []
    unit = max(1, -(-capacity // resolution))
    cap = capacity // unit
    ws = [-(-w // unit) for w in weights]
    best = np.zeros(cap + 1)
    keep = np.zeros((len(values), cap + 1), dtype=bool)
    for i, (v, w) in enumerate(zip(values, ws, strict=True)):
        if v <= 0 or w > cap:
            continue
        cand = np.full(cap + 1, -np.inf)
        cand[w:] = best[: cap + 1 - w] + v
        better = cand > best
        keep[i] = better
        best = np.where(better, cand, best)
    picked: list[int] = []
    c = cap
    for i in range(len(values) - 1, -1, -1):
        if keep[i, c]:
            picked.append(i)
            c -= ws[i]
    return sorted(picked)


def continuation(sched: Schedule, state: PlanState) -> Schedule:
    """The rest of ``sched`` from ``state``'s call on: what following it without a re-plan would do."""
    idx = {s.name: i for i, s in enumerate(state.workload.stages)}
    pos = (state.stage, state.call)
    calls = [c for c in sched.calls if (idx[c.stage], c.call) >= pos]
    return sched.model_copy(update={"start_stage": state.stage, "start_call": state.call, "prologue": [],
                                    "calls": calls})


def measured_as_planned(state: PlanState) -> bool:
    """Whether every measured working size equals the cost model's (the simulator's case): a plan made with
    the cost model then stays exactly right."""
    for s, stage in enumerate(state.workload.stages):
        for b in stage.blocks:
            if state.working(s, b) != b.working_bytes:
                return False
    return True


def build_first_fit(state: PlanState, specs: list[PlanSpec]) -> Schedule:
    """The first spec that fits; the last resort is load-run-evict with nothing kept, which fits any budget
    of at least ``min_feasible_budget`` (checked first, raising BudgetTooSmall)."""
    check_feasible(state.workload, state.budget_bytes, state.measured_working, from_stage=state.stage)
    tried: list[PlanSpec] = []
    for spec in specs:
        for cand in _shrinking(spec):
            if cand in tried:
                continue
            tried.append(cand)
            try:
                return build(state, cand)
            except Infeasible:
                continue
    last = replace(specs[-1], retained=(), depth=0)
    return build(state, last)


def _shrinking(spec: PlanSpec) -> list[PlanSpec]:
    """The spec, then with the first half of its retained blocks (by priority), ..., then none."""
    out = [spec]
    kept = list(spec.retained)
    while kept:
        kept = kept[: len(kept) // 2]
        out.append(replace(spec, retained=tuple(kept)))
    return out
