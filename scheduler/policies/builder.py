"""Turn a policy's decisions (retention, prefetch depth, lanes, queues) into a deadlock-free Schedule.

Every policy describes its plan as a :class:`PlanSpec`; :func:`build` emits the ops in issue order.

Deadlock freedom. Ops are issued in order and only resident weights stay held without a later op (running
execs and loads finish on their own), so a Schedule cannot deadlock iff, at every load and exec op,
``persistent + resident/in-flight bytes listed so far and not yet evicted + the op's own bytes <= budget``
(the *static* bytes). :func:`build` keeps that invariant while it emits, and raises :class:`Infeasible`
when a spec cannot keep it; policies then fall back to a humbler spec (sequential always fits a budget of at
least ``min_feasible_budget``).

Emission around exec group ``g`` (one block of one call, one exec op per batch part):

1. the load of ``g``'s block if not emitted yet (a *barrier* load -- a sequential call, or a new model when
   loads may not cross model boundaries -- comes after the evictions that wait for group ``g-1``);
2. evictions of blocks whose last use before a reload was ``g-1`` or earlier (they wait for group
   ``g-1``, which exec ``g`` waits for anyway, so they cost no time);
3. the exec op(s) of ``g``;
4. prefetch loads, in need order, while fewer than ``depth`` loads are ahead of ``g`` and the static bytes
   leave room for the load plus the largest working bytes until its target runs.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from cidl.device_profiles.profile import Unit

from ..plan import PlanState
from ..schedule import CallOps, EvictOp, ExecOp, LoadOp, Op, Schedule
from ..workload import Workload

_HASHES: dict[int, tuple[Workload, str]] = {}
_OPS: dict[tuple[Any, ...], Op] = {}


def _op(cls: type[LoadOp] | type[ExecOp] | type[EvictOp], **fields: Any) -> Op:
    """Ops are frozen values: share one instance per distinct op across builds (validation is the cost)."""
    key = (cls, *fields.values())
    op = _OPS.get(key)
    if op is None:
        if len(_OPS) > 200_000:
            _OPS.clear()
        op = _OPS[key] = cls(**fields)
    return op


def workload_hash(wl: Workload) -> str:
    """``wl.content_hash()``, remembered per Workload object (it is frozen; policies plan it many times)."""
    hit = _HASHES.get(id(wl))
    if hit is None or hit[0] is not wl:
        if len(_HASHES) > 64:
            _HASHES.clear()
        hit = _HASHES[id(wl)] = (wl, wl.content_hash())
    return hit[1]


class Infeasible(Exception):
    """A PlanSpec whose ops cannot stay within the budget (internal: policies fall back)."""


@dataclass(frozen=True)
class PlanSpec:
    policy: str
    retained: tuple[str, ...] = ()  # by priority: the first ones matter most
    depth: int = 1  # loads in flight ahead of the running exec group; 0 = sequential everywhere
    lanes: int = 1
    sequential_calls: frozenset[tuple[int, int]] = frozenset()
    cross_model: bool = False  # may prefetch the next model's blocks during the current model's tail
    # stage index -> block id -> the queue of each batch part (one entry: not split)
    queues: dict[int, dict[str, tuple[Unit, ...]]] = field(default_factory=dict)
    plan_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Group:
    stage: int
    call: int
    block: str
    rb: int
    queues: tuple[Unit, ...]
    part_need: int  # working bytes of one part
    need: int  # working bytes of all parts


def _groups(state: PlanState, spec: PlanSpec) -> list[_Group]:
    wl = state.workload
    out: list[_Group] = []
    per_stage: dict[int, list[tuple[str, int, tuple[Unit, ...], int, int]]] = {}
    for s, c in state.remaining_calls():
        rows = per_stage.get(s)
        if rows is None:
            rows = []
            stage = wl.stages[s]
            for b in stage.blocks:
                qs = spec.queues.get(s, {}).get(b.id) or (b.unit,)
                if len(qs) > stage.batch_splittable:
                    raise ValueError(f"stage {stage.name}: {len(qs)} parts > batch_splittable "
                                     f"{stage.batch_splittable}")
                w = state.working(s, b)
                part = math.ceil(w / len(qs))
                rows.append((b.id, b.resident_bytes, qs, part, part * len(qs)))
            per_stage[s] = rows
        for bid, rb, qs, part, need in rows:
            out.append(_Group(s, c, bid, rb, qs, part, need))
    return out


def build(state: PlanState, spec: PlanSpec) -> Schedule:
    """Emit the Schedule for ``spec`` from ``state``; raises :class:`Infeasible` if it cannot fit."""
    wl = state.workload
    budget = state.budget_bytes
    retained = set(spec.retained)
    groups = _groups(state, spec)
    n = len(groups)
    if n == 0:
        raise ValueError("nothing left to plan")
    models = [wl.stages[g.stage].model for g in groups]
    rb_of = {g.block: g.rb for g in groups}
    for b in state.resident:
        if b not in rb_of:
            blk = wl.distinct_blocks().get(b)
            if blk is None:
                raise ValueError(f"resident block {b!r} is not in workload {wl.name}")
            rb_of[b] = blk.resident_bytes

    next_use: list[int | None] = [None] * n
    last_seen: dict[str, int] = {}
    for g in range(n - 1, -1, -1):
        next_use[g] = last_seen.get(groups[g].block)
        last_seen[groups[g].block] = g

    # Initially resident blocks kept: the retained ones, and the first `depth + 1` streamed blocks (a
    # previous plan's prefetch window). The rest are evicted in the prologue.
    window: list[str] = []
    for g in groups:
        if g.block not in retained and g.block not in window:
            window.append(g.block)
            if len(window) > spec.depth:
                break
    kept = {b for b in state.resident if b in retained or b in window}
    kept &= set(last_seen)  # never keep a block the rest of the run does not use
    prologue: list[Op] = [_op(EvictOp, block=b) for b in sorted(state.resident - kept)]

    # Which groups need a load, and after which group each block is evicted.
    loads: list[int] = []
    evict_after: dict[int, str] = {}
    res = set(kept)
    for g, grp in enumerate(groups):
        if grp.block not in res:
            loads.append(g)
            res.add(grp.block)
        nu = next_use[g]
        keep = nu is not None and (grp.block in retained or nu == g + 1)
        if not keep:
            evict_after[g] = grp.block
            res.discard(grp.block)

    barrier = [False] * n
    for g, grp in enumerate(groups):
        if (grp.stage, grp.call) in spec.sequential_calls or spec.depth == 0:
            barrier[g] = True
        elif not spec.cross_model and g > 0 and models[g] != models[g - 1]:
            barrier[g] = True

    part_need = [g.part_need for g in groups]

    calls: dict[tuple[int, int], list[Op]] = {}
    order: list[tuple[int, int]] = []
    for g in groups:
        key = (g.stage, g.call)
        if key not in calls:
            calls[key] = []
            order.append(key)

    static = wl.persistent_bytes + sum(rb_of[b] for b in kept)
    if static > budget:
        raise Infeasible(f"kept blocks need {static} > {budget}")
    held: set[str] = set(kept)
    due: deque[tuple[int, str]] = deque()
    k = 0  # next load
    lane = 0
    peak = static
    run_w = 0
    out: list[Op] = calls[order[0]]

    def emit_load(g: int) -> None:
        nonlocal static, lane, peak
        b = groups[g].block
        out.append(_op(LoadOp, block=b, lane=lane % spec.lanes))
        lane += 1
        held.add(b)
        static += rb_of[b]
        peak = max(peak, static + run_w)

    def emit_evicts(upto: int) -> None:
        nonlocal static
        while due and due[0][0] <= upto:
            _, b = due.popleft()
            out.append(_op(EvictOp, block=b))
            held.discard(b)
            static -= rb_of[b]

    for g, grp in enumerate(groups):
        out = calls[(grp.stage, grp.call)]
        # 1. the load of g itself
        while k < len(loads) and loads[k] <= g:
            h = loads[k]
            if barrier[h] or groups[h].block in held:
                emit_evicts(h - 1)
            if static + groups[h].rb + part_need[h] > budget:
                emit_evicts(h - 1)
            if groups[h].block in held:
                raise Infeasible(f"block {groups[h].block} reloaded while still resident")
            if static + groups[h].rb + part_need[h] > budget:
                raise Infeasible(f"load of {groups[h].block} does not fit")
            emit_load(h)
            k += 1
        # 2. evictions of finished blocks, 3. the exec ops
        emit_evicts(g - 1)
        if static + grp.part_need > budget:
            raise Infeasible(f"exec of {grp.block} does not fit")
        run_w = grp.need
        peak = max(peak, static + run_w)
        pc = len(grp.queues)
        stage_name = wl.stages[grp.stage].name
        for part, q in enumerate(grp.queues):
            out.append(_op(ExecOp, block=grp.block, stage=stage_name, call=grp.call, queue=q, part=part,
                           part_count=pc))
        if g in evict_after:
            due.append((g, evict_after[g]))
        # 4. prefetch
        while k < len(loads):
            h = loads[k]
            if barrier[h] or _ahead(loads, k, g) >= spec.depth:
                break
            b = groups[h].block
            if b in held:
                break
            need = max(part_need[g + 1:h + 1], default=0)
            if static + groups[h].rb + need > budget:
                break
            emit_load(h)
            k += 1
    emit_evicts(n)
    for b in sorted(held):  # nothing should remain, but never leave weights behind
        out.append(_op(EvictOp, block=b))

    sched_calls = [CallOps(stage=wl.stages[s].name, call=c, ops=calls[(s, c)]) for s, c in order]
    return Schedule(
        policy=spec.policy, workload=workload_hash(wl), budget_bytes=budget, loader_threads=spec.lanes,
        prefetch_depth=spec.depth, retained=list(spec.retained), start_stage=state.stage,
        start_call=state.call, planned_peak_bytes=min(peak, budget), prologue=prologue, calls=sched_calls,
        plan_options=dict(spec.plan_options),
    )


def _ahead(loads: list[int], k: int, g: int) -> int:
    """Loads already emitted (indices < k) whose target group is after ``g``."""
    count = 0
    i = k - 1
    while i >= 0 and loads[i] > g:
        count += 1
        i -= 1
    return count
