"""The simulated executor: simpy processes for the op issuer, each loader lane, each compute queue and the
budget changes, following the Schedule semantics of ``cidl.scheduler.schedule`` exactly as the runtime
executor does (``cidl.runtime.executor``):

* the issuer starts ops in list order; a load waits for its lane, then for its bytes; an exec for its
  block's load, the previous exec group, its queue, then its working bytes; an evict for the block's
  load and every exec of the block issued before it, then frees the bytes at once;
* at each call boundary the issuer may re-plan: after the first call of a stage with more calls (it first
  waits for that call to finish -- its working memory is then measured) and after a budget change; the
  new Schedule replaces the rest of the op list;
* a budget drop is armed at the re-plan after it arrives (or at the end of the op list) and is in force
  once the new Schedule's evictions have freed enough (see :mod:`.memory`); a drop below the smallest
  feasible budget of the stages left ends the run at once (as iOS ends the app), keeping the trace so far;
  a rise applies at once (after any drop still being absorbed).
"""

from __future__ import annotations

import math
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

import simpy

from cidl.device_profiles.profile import DeviceProfile

from ..issue import ScheduleError, call_name, issue_order
from ..plan import BudgetTooSmall, PlanState, Reason, min_feasible_budget
from ..policies.base import Policy
from ..schedule import EvictOp, ExecOp, LoadOp, Op, Schedule
from ..workload import Block, Workload
from .fluid import Fluid, Job
from .memory import Memory

Gen = Generator[simpy.Event, Any, Any]
GroupKey = tuple[int, int, int]  # (stage, call, block index)


class SimulationError(RuntimeError):
    """A Schedule the simulator cannot follow (an op out of order, a deadlock): a policy bug."""


class DeadlockError(SimulationError):
    pass


@dataclass
class _Group:
    total: int = 0
    done: int = 0
    event: simpy.Event | None = None


@dataclass
class _Worker:
    """A loader lane or a compute queue: one op at a time, handed over by the issuer through ``wake``."""

    name: str
    wake: simpy.Event
    busy: bool = False
    free: simpy.Event | None = None


@dataclass
class Recorded:
    events: list[tuple[str, str, str, float, float, str | None, str | None, int | None, int]] = field(
        default_factory=list)  # name, cat, lane, ts, dur, block, stage, call, bytes
    replans: list[dict[str, Any]] = field(default_factory=list)
    budget_changes: list[dict[str, Any]] = field(default_factory=list)


class SimRun:
    """One simulated run; :meth:`run` returns when the last op finished or the run ended early."""

    def __init__(self, workload: Workload, profile: DeviceProfile, policy: Policy, budget_bytes: int, *,
                 budget_drops: Sequence[tuple[float, int]] = (), record: bool = True,
                 start: PlanState | None = None) -> None:
        self.wl, self.profile, self.policy = workload, profile, policy
        self.env = env = simpy.Environment()
        self.record = record
        self.fluid = Fluid(env, profile)
        if workload.persistent_bytes > budget_bytes:
            raise BudgetTooSmall(workload.name, budget_bytes, workload.persistent_bytes,
                                 "the persistent tensors alone do not fit")
        self.mem = Memory(env, budget_bytes, workload.persistent_bytes, record)
        self.blocks = workload.distinct_blocks()
        self.stage_index = {s.name: i for i, s in enumerate(workload.stages)}
        self.stage_blocks = [{b.id: (i, b) for i, b in enumerate(s.blocks)} for s in workload.stages]
        self.state: dict[str, str] = {}  # block -> "loading" | "resident"
        self.loaded: dict[str, simpy.Event] = {}
        self.open_execs: dict[str, list[simpy.Event]] = {}
        self.groups: dict[GroupKey, _Group] = {}
        self.lanes: list[_Worker] = []
        self.queues: dict[str, _Worker] = {}
        self._costs: dict[tuple[str, str, str, int], tuple[int, int, Block, float, int]] = {}
        self.segments: list[Schedule] = []
        self.hashes: list[str] = []
        self.measured: dict[str, dict[str, int]] = {}
        self.rec = Recorded()
        self.error: str | None = None
        self.end_s = 0.0
        self.waiting_for = ""
        self.target = self.plan_budget = self.eventual = budget_bytes
        self.pending_drops: list[simpy.Event] = []
        self.unabsorbed: list[tuple[float, int]] = []
        self.start_key: GroupKey = (0, 0, 0)
        self.start_state = start
        if start is not None:  # an evaluation from the middle of a run: its resident blocks are loaded
            self.start_key = (start.stage, start.call, 0)
            self.measured = {k: dict(v) for k, v in start.measured_working.items()}
            for b in sorted(start.resident):
                rb = self.blocks[b].resident_bytes
                if self.mem.get(rb) is not None:
                    raise BudgetTooSmall(workload.name, budget_bytes, self.mem.total + rb, "resident blocks")
                self.mem.took("resident", rb)
                self.state[b] = "resident"
        for t, nbytes in budget_drops:
            if not (t >= 0 and nbytes > 0):
                raise ValueError(f"budget_drops: ({t}, {nbytes}): expected (seconds >= 0, bytes > 0)")
        self.drops = sorted(budget_drops, key=lambda d: d[0])
        self.position = (start.stage, start.call) if start is not None else (0, 0)
        self.abort = env.event()  # a budget drop no plan can meet ends the run at once
        self.issuer = env.process(self._issuer())
        if self.drops:
            env.process(self._budget_changes())

    # ------------------------------------------------------------------------------------------ driver

    def run(self) -> None:
        try:
            self.env.run(until=self.env.any_of([self.issuer, self.abort]))
        except SimulationError:
            raise
        except RuntimeError as e:
            if "No scheduled events left" in str(e) and self.issuer.is_alive:
                raise DeadlockError(f"deadlock at t={self.env.now:.6g} s: the next op waits for "
                                    f"{self.waiting_for} and nothing is running (accounted "
                                    f"{self.mem.total} of {self.mem.budget} bytes)") from e
            raise

    # ------------------------------------------------------------------------------------------ issuer

    def _issuer(self) -> Gen:
        if self.start_state is not None:
            first = self.start_state
        else:
            first = PlanState(self.wl, self.profile, self.plan_budget, reason="start")
        items = self._install(self.policy.plan(first), first.stage, first.call, first.reason)
        pos = 0
        while pos < len(items):
            op, s, c = items[pos]
            if op is None:
                new = yield from self._boundary(s, c)
                if self.error is not None:
                    return
                if new is not None:
                    items = items[:pos + 1] + new
            elif isinstance(op, LoadOp):
                yield from self._load(op)
            elif isinstance(op, ExecOp):
                yield from self._exec(op)
            else:
                yield from self._evict(op)
            pos += 1
        self._arm_drop()  # no boundary left: the trailing evictions absorb a pending drop
        waits = [e for evs in self.open_execs.values() for e in evs if not e.triggered]
        waits += [self.loaded[b] for b, st in self.state.items() if st == "loading"]
        if waits:
            self.waiting_for = "the last ops to finish"
            yield self.env.all_of(waits)

    def _install(self, sched: Schedule, s: int, c: int, reason: Reason) -> list[tuple[Op | None, int, int]]:
        try:
            items = issue_order(sched, self.wl, s, c)
        except ScheduleError as e:
            raise SimulationError(str(e)) from None
        self.segments.append(sched)
        if self.record:
            self.hashes.append(sched.content_hash())
            self.rec.replans.append({"reason": reason, "stage": self.wl.stages[s].name, "call": c,
                                     "time_s": self.env.now, "budget_bytes": sched.budget_bytes,
                                     "schedule": self.hashes[-1], "policy": sched.policy,
                                     "plan_options": sched.plan_options})
            self._event(f"plan ({reason})", "plan", "main", self.env.now, 0.0, None, self.wl.stages[s].name,
                        c, sched.budget_bytes)
        while len(self.lanes) < sched.loader_threads:
            self._spawn_lane()
        return items

    def _boundary(self, s: int, c: int) -> Gen:
        stage = self.wl.stages[s]
        self.position = (s, c)
        first_call = c == 1 and stage.calls > 1
        if first_call:  # the measured call must finish before the re-plan
            g = self._group((s, 0, len(stage.blocks) - 1))
            if g.total == 0 or g.done < g.total:
                self.waiting_for = f"call 0 of {stage.name} to finish"
                yield self._group_event(g)
            self.measured.setdefault(stage.name, {b.id: b.working_bytes for b in stage.blocks})
        changed = self.target != self.plan_budget
        if not (first_call or changed):
            return None
        reason: Reason = "budget" if changed else "first-call"
        self.plan_budget = self.target
        measured = {k: dict(v) for k, v in self.measured.items()}
        state = PlanState(self.wl, self.profile, self.target, s, c, frozenset(self.state), measured, reason,
                          self.segments[-1], self.env.now)
        try:
            sched = self.policy.plan(state)
        except BudgetTooSmall as e:
            self.error = f"budget drop at t={self.env.now:.6g} s ended the run: {e}"
            if self.record:
                self._event("budget too small", "plan", "main", self.env.now, 0.0, None, stage.name, c,
                            self.target)
            return None
        items = self._install(sched, s, c, reason)
        self._arm_drop()
        return items

    # ------------------------------------------------------------------------------------- op issuing

    def _load(self, op: LoadOp) -> Gen:
        b = op.block
        if b in self.state:
            raise SimulationError(f"load({b}): block is already {self.state[b]}")
        block = self.blocks.get(b)
        if block is None:
            raise SimulationError(f"load({b}): no such block in workload {self.wl.name}")
        lane = self.lanes[op.lane]
        if lane.busy:
            self.waiting_for = f"lane {lane.name}"
            yield self._free_event(lane)
        ev = self.mem.get(block.resident_bytes)
        if ev is not None:
            self.waiting_for = f"{block.resident_bytes} bytes of memory for {b}"
            yield ev
        self.mem.took("inflight", block.resident_bytes)
        self.state[b] = "loading"
        self.loaded[b] = self.env.event()
        lane.busy = True
        lane.wake.succeed(block)

    def _exec_cost(self, op: ExecOp) -> tuple[int, int, Block, float, int]:
        """(stage, block index, block, work seconds, working bytes of the part), validated once per kind."""
        key = (op.stage, op.block, op.queue, op.part_count)
        hit = self._costs.get(key)
        if hit is not None:
            return hit
        s = self.stage_index.get(op.stage)
        if s is None or op.block not in self.stage_blocks[s]:
            raise SimulationError(f"exec({op.block}, {op.stage}): the block is not in that stage")
        i, block = self.stage_blocks[s][op.block]
        stage = self.wl.stages[s]
        if not op.part_count <= stage.batch_splittable:
            raise SimulationError(f"exec({op.block}, {op.stage} call {op.call}): {op.part_count} parts but "
                                  f"the stage allows {stage.batch_splittable}")
        unit = self.profile.units.get(op.queue)
        if unit is None or block.kernel_dtype not in unit.efficiency:
            raise SimulationError(f"exec({op.block}): profile {self.profile.name} has no queue {op.queue} "
                                  f"that runs weight dtype {block.kernel_dtype}")
        work = unit.exec_seconds(block.flops / op.part_count, block.kernel_dtype)
        hit = self._costs[key] = (s, i, block, work, math.ceil(block.working_bytes / op.part_count))
        return hit

    def _exec(self, op: ExecOp) -> Gen:
        s, i, block, work, need = self._exec_cost(op)
        if op.part >= op.part_count:
            raise SimulationError(f"exec({op.block}, {op.stage} call {op.call}): part {op.part} of "
                                  f"{op.part_count}")
        st = self.state.get(op.block)
        if st is None:
            raise SimulationError(f"exec({op.block}, {op.stage} call {op.call}): block is neither resident "
                                  f"nor being loaded")
        if st == "loading":
            self.waiting_for = f"the load of {op.block}"
            yield self.loaded[op.block]
        prev = self._prev_group(s, op.call, i)
        if prev is not None:
            g = self._group(prev)
            if g.total == 0 or g.done < g.total:
                self.waiting_for = f"the previous exec group {prev}"
                yield self._group_event(g)
        q = self.queues.get(op.queue) or self._spawn_queue(op.queue)
        if q.busy:
            self.waiting_for = f"queue {op.queue}"
            yield self._free_event(q)
        ev = self.mem.get(need)
        if ev is not None:
            self.waiting_for = f"{need} working bytes for {op.block}"
            yield ev
        self.mem.took("working", need)
        grp = self._group((s, op.call, i))
        grp.total = op.part_count
        done = self.env.event()
        self.open_execs.setdefault(op.block, []).append(done)
        q.busy = True
        q.wake.succeed((op, s, i, block, need, work, done))

    def _evict(self, op: EvictOp) -> Gen:
        b = op.block
        st = self.state.get(b)
        if st is None:
            raise SimulationError(f"evict({b}): block is not resident")
        if st == "loading":
            self.waiting_for = f"the load of {b}"
            yield self.loaded[b]
        pending = [e for e in self.open_execs.pop(b, []) if not e.triggered]
        if pending:
            self.waiting_for = f"{len(pending)} exec(s) of {b} listed before its eviction"
            yield self.env.all_of(pending) if len(pending) > 1 else pending[0]
        rb = self.blocks[b].resident_bytes
        del self.state[b]
        self.mem.release("resident", rb)
        if self.record:
            self._event(f"evict {b}", "evict", "main", self.env.now, 0.0, b, None, None, rb)

    # ------------------------------------------------------------------------------------ workers

    def _spawn_lane(self) -> None:
        w = _Worker(f"loader-{len(self.lanes)}", self.env.event())
        self.lanes.append(w)
        self.env.process(self._lane(w))

    def _spawn_queue(self, name: str) -> _Worker:
        if name not in self.profile.units:
            raise SimulationError(f"exec on queue {name!r}: profile {self.profile.name} has no such unit "
                                  f"(it has {', '.join(self.profile.units)})")
        w = _Worker(name, self.env.event())
        self.queues[name] = w
        self.env.process(self._queue(w))
        return w

    def _lane(self, w: _Worker) -> Gen:
        loading = self.profile.loading
        while True:
            block: Block = yield w.wake
            w.wake = self.env.event()
            rate = loading.bytes_per_s.get(block.dtype)
            if rate is None:
                raise SimulationError(f"load({block.id}): profile {self.profile.name} has no load rate for "
                                      f"weight format {block.dtype}")
            t0 = self.env.now
            work = loading.per_load_overhead_s + block.load_bytes / rate
            yield self.fluid.start(Job(True, work, self.env.event(), rate))
            self.mem.move("inflight", "resident", block.resident_bytes)
            self.state[block.id] = "resident"
            self.loaded[block.id].succeed()
            self._finish(w, t0, f"load {block.id}", "load", block.id, None, None, block.load_bytes)

    def _queue(self, w: _Worker) -> Gen:
        while True:
            op, s, i, block, need, work, done = yield w.wake
            w.wake = self.env.event()
            t0 = self.env.now
            yield self.fluid.start(Job(False, work, self.env.event()))
            self.mem.release("working", need)
            grp = self._group((s, op.call, i))
            grp.done += 1
            if grp.done >= grp.total and grp.event is not None and not grp.event.triggered:
                grp.event.succeed()
            done.succeed()
            self._finish(w, t0, op.block, "exec", op.block, op.stage, op.call, need)

    def _finish(self, w: _Worker, t0: float, name: str, cat: str, block: str, stage: str | None,
                call: int | None, nbytes: int) -> None:
        w.busy = False
        if w.free is not None:
            w.free.succeed()
            w.free = None
        self.end_s = max(self.end_s, self.env.now)
        if self.record:
            self._event(name, cat, w.name, t0, self.env.now - t0, block, stage, call, nbytes)

    # ---------------------------------------------------------------------------------- budget changes

    def _budget_changes(self) -> Gen:
        for t, nbytes in self.drops:
            if t > self.env.now:
                yield self.env.timeout(t - self.env.now)
            self.target = nbytes
            if self.record:
                self.rec.budget_changes.append({"requested_s": self.env.now, "bytes": nbytes,
                                                "drop": nbytes < self.eventual, "absorbed_s": None})
            if nbytes < self.eventual:
                self.unabsorbed.append((self.env.now, nbytes))
                need = min_feasible_budget(self.wl, self.measured, from_stage=self.position[0])
                if nbytes < need:  # nothing can ever absorb it: the OS ends the app
                    detail = BudgetTooSmall(self.wl.name, nbytes, need, "for the stages left to run")
                    self.error = f"budget drop at t={self.env.now:.6g} s ended the run: {detail}"
                    if self.record:
                        self._event("budget too small", "plan", "main", self.env.now, 0.0, None,
                                    self.wl.stages[self.position[0]].name, self.position[1], nbytes)
                    self.abort.succeed()
                    return
                continue
            pending = [e for e in self.pending_drops if not e.triggered]
            if pending:  # a rise waits until the drops before it are absorbed
                yield self.env.all_of(pending)
            if self.target > self.eventual:
                self.mem.rise(self.target - self.eventual)
                self.eventual = self.target
            self._mark_absorbed()

    def _arm_drop(self) -> None:
        if self.target >= self.eventual:
            return
        delta = self.eventual - self.target
        self.eventual = self.target
        self.pending_drops.append(self.mem.arm_drop(delta, self._drop_committed))

    def _drop_committed(self) -> None:
        self._mark_absorbed()

    def _mark_absorbed(self) -> None:
        now = self.env.now
        still = []
        for t, nbytes in self.unabsorbed:
            if self.mem.budget <= nbytes:
                if self.record:
                    self._event(f"absorb budget drop to {nbytes} bytes", "wait", "main", t, now - t, None,
                                None, None, nbytes)
            else:
                still.append((t, nbytes))
        self.unabsorbed = still
        if self.record:
            for ch in self.rec.budget_changes:
                if ch["absorbed_s"] is None and self.mem.budget <= ch["bytes"] and ch["drop"]:
                    ch["absorbed_s"] = now
                elif ch["absorbed_s"] is None and not ch["drop"] and self.mem.budget >= ch["bytes"]:
                    ch["absorbed_s"] = now

    # ---------------------------------------------------------------------------------------- helpers

    def _group(self, key: GroupKey) -> _Group:
        g = self.groups.get(key)
        if g is None:
            g = self.groups[key] = _Group()
        return g

    def _group_event(self, g: _Group) -> simpy.Event:
        if g.event is None:
            g.event = self.env.event()
        return g.event

    def _free_event(self, w: _Worker) -> simpy.Event:
        if w.free is None:
            w.free = self.env.event()
        return w.free

    def _prev_group(self, s: int, c: int, i: int) -> GroupKey | None:
        if i > 0:
            key = (s, c, i - 1)
        elif c > 0:
            key = (s, c - 1, len(self.wl.stages[s].blocks) - 1)
        elif s > 0:
            key = (s - 1, self.wl.stages[s - 1].calls - 1, len(self.wl.stages[s - 1].blocks) - 1)
        else:
            return None
        return None if key < self.start_key else key

    def _call_name(self, s: int, c: int) -> str:
        return call_name(self.wl, s, c)

    def _event(self, name: str, cat: str, lane: str, ts: float, dur: float, block: str | None,
               stage: str | None, call: int | None, nbytes: int) -> None:
        self.rec.events.append((name, cat, lane, ts, dur, block, stage, call, nbytes))
