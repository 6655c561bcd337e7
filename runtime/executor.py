"""The runtime executor: a Schedule's ops on real threads under a hard byte budget.

Threads: an *issuer* walks the ops in list order and starts each one once it can (the Schedule
semantics in ``cidl.scheduler.schedule``); one thread per loader lane (``loader-<i>``) runs loads; one
thread per execution queue (``gpu``, ``ane``, ``cpu``) runs execs; the caller's thread (the pipeline glue)
hands each stage call its input and takes its output with :meth:`Executor.run_call`.

* ``load``: waits for its lane and for the block's resident bytes to fit (reserved as ``inflight``, then
  re-labelled ``resident`` when the load completes).
* ``exec``: waits for its block's load, every exec of the previous exec group (the block before it in the
  pipeline, across call and stage boundaries), its queue, its working bytes, and the call's input.
* ``evict``: waits for every earlier-listed exec of its block, then unloads it and frees its bytes.

Re-plan points (DESIGN.md), all at call boundaries: the start (the measured budget), after the first call of
a stage with more calls (its working memory measured on real tensors, :mod:`cidl.runtime.memtrack`), and a
budget change (``set_budget``; a drop is absorbed by the new Schedule's evictions). The issuer pauses at the
boundary, asks the planner, evicts what the new Schedule does not keep, and follows it from that call on.

Deadlock (the next op cannot start and nothing is running) and any error in any thread stop every thread
within seconds; the error is raised in the caller's thread and the trace so far is kept.
"""

from __future__ import annotations

import math
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cidl.runtime.budget import BudgetAborted, MemoryBudget
from cidl.runtime.callbook import CallBook
from cidl.runtime.executor_api import (
    BlockProvider,
    Carry,
    DeadlockError,
    ExecutorError,
    Pacer,
    Planner,
    ReplanPoint,
    Splitter,
)
from cidl.runtime.memtrack import LiveBytes
from cidl.runtime.opstate import OpState
from cidl.scheduler.issue import ScheduleError, call_name, issue_order
from cidl.scheduler.schedule import EvictOp, ExecOp, LoadOp, Op, Schedule
from cidl.scheduler.workload import Workload
from cidl.traces.model import Trace, TraceEvent, TraceMeta

__all__ = ["BlockProvider", "Carry", "DeadlockError", "Executor", "ExecutorError", "Pacer", "Planner",
           "ReplanPoint", "Splitter"]
STOP_TIMEOUT_S = 30.0


@dataclass
class _Rec:
    """One op in issue order (or a call boundary marker when ``op`` is None)."""

    op: Op | None
    stage: int
    call: int
    seg: int
    limit: int  # the budget the op's Schedule was planned for


class Executor:
    """Runs Schedules from ``planner`` over ``workload``'s blocks; see the module docstring."""

    def __init__(
        self,
        workload: Workload,
        provider: BlockProvider,
        planner: Planner,
        budget_bytes: int,
        *,
        policy: str = "",
        cold: bool = False,
        splitters: dict[str, Splitter] | None = None,
        pacer: Pacer | None = None,
        measure_first_calls: bool = True,
        queue_labels: dict[str, str] | None = None,
        meta_extra: dict[str, Any] | None = None,
        rss_interval_s: float | None = 0.01,
        budget_drops: list[tuple[str, int, int]] | None = None,
    ) -> None:
        self.workload = workload
        self.provider = provider
        self.planner = planner
        self.policy = policy
        self.cold = cold
        self.splitters = splitters or {}
        self.pacer = pacer
        self.measure_first_calls = measure_first_calls
        self.queue_labels = queue_labels or {}
        self.meta_extra = dict(meta_extra or {})
        self._scale = pacer.time_scale if pacer is not None else 1.0
        self._t0 = time.perf_counter()
        self.cv = threading.Condition(threading.RLock())
        self.budget = MemoryBudget(budget_bytes, cond=self.cv, clock=self.now, rss_interval_s=rss_interval_s)
        self._stage_index = {s.name: i for i, s in enumerate(workload.stages)}
        self._blocks = workload.distinct_blocks()
        self._stage_blocks = [{b.id: b for b in s.blocks} for s in workload.stages]
        self._working = {(s.name, b.id): b.working_bytes for s in workload.stages for b in s.blocks}
        self._measured: dict[str, dict[str, int]] = {}

        self._items: list[_Rec] = []
        self._pos = 0
        self._segments: list[Schedule] = []
        self._replans: list[dict[str, Any]] = []
        self._budget_seen = budget_bytes
        self._budget_changes: list[dict[str, Any]] = []
        # (stage, call, bytes): a budget change that arrives exactly at that call boundary (deterministic).
        self._call_drops: dict[tuple[str, int], list[int]] = {}
        for stage_name, call, nbytes in budget_drops or []:
            self._call_drops.setdefault((stage_name, call), []).append(nbytes)

        self._ops = OpState(workload)
        self._book = CallBook(self.splitters, {st.name: st.model for st in workload.stages})
        self._main = "glue"  # the caller's thread: "glue" (preparing a call), "waiting" (in run_call), "done"
        self._drop_armed = False
        self._issuer_done = False
        self._error: BaseException | None = None
        self._abort = threading.Event()
        self._events: list[TraceEvent] = []
        self._threads: list[threading.Thread] = []
        self._workers: dict[str, queue.SimpleQueue] = {}
        self._started = False
        self._closed = False
        self._trace: Trace | None = None

    # ---------------------------------------------------------------------------------------- clock

    def now(self) -> float:
        """Seconds since the start of the run (device seconds in ``emulate``: wall time / time scale)."""
        return (time.perf_counter() - self._t0) / self._scale

    @property
    def time_scale(self) -> float:
        """Wall seconds per trace second (1 unless ``emulate`` stretches predicted durations)."""
        return self._scale

    # ----------------------------------------------------------------------------------- public API

    def start(self) -> None:
        """Plan at the start (the budget), reserve the persistent tensors, and start every thread.

        The start plan is made before the run's clock starts (the phone's ladder is precomputed, and the
        simulator plans at t=0 too); its duration is kept in the trace meta as ``start_plan_s``.
        """
        if self._started:
            raise RuntimeError("executor already started")
        self._started = True
        try:
            t_plan = time.perf_counter()
            first = self._ask(ReplanPoint("start", 0, 0, self.budget.budget, (), {}, 0.0))
            self.meta_extra["start_plan_s"] = time.perf_counter() - t_plan
            if first is None:
                raise ExecutorError("planner returned no Schedule at the start of the run")
            self._t0 = time.perf_counter()
            self.budget.restart_samples()
            self.budget.mark_rss_baseline()
            self.budget.start_rss_sampler()
            self.budget.reserve("persistent", self.workload.persistent_bytes, None, wait=False)
            self._install(first, 0, 0)
            self._events.append(TraceEvent(name="plan (start)", cat="plan", lane="main", ts=0.0, dur=0.0,
                                           stage=self.workload.stages[0].name, call=0,
                                           bytes=first.budget_bytes))
        except BaseException as e:
            self._fail(e)
            raise self._wrap(e) from e
        lanes = max(s.loader_threads for s in self._segments)
        self._ensure_lanes(lanes)
        for q in ("gpu", "ane", "cpu"):
            self._spawn(q, self._worker_loop, q)
        self._spawn("issuer", self._issuer_loop, None)

    def run_call(self, stage: int | str, call: int, carry: Carry) -> Carry:
        """Hand call ``call`` of ``stage`` its input carry; block until its last exec finished."""
        s = self._stage_index[stage] if isinstance(stage, str) else stage
        key = (s, call)
        with self.cv:
            self._raise_if_failed()
            self._book.give(key, carry, self._call_name(s, call))
            self._main = "waiting"
            self.cv.notify_all()
            try:
                while (result := self._book.take(key)) is None:
                    self._raise_if_failed()
                    if self._issuer_done and not self._anything_running():
                        raise ExecutorError(
                            f"the Schedule ran out of ops before call {call} of stage "
                            f"{self.workload.stages[s].name} finished"
                        )
                    self.cv.wait(0.25)
            finally:
                self._main = "glue"
            return result

    def set_budget(self, new_bytes: int) -> None:
        """A budget change from outside (memory pressure). Applied at the next call boundary."""
        with self.cv:
            pending = self.budget.set_budget(new_bytes)
            self._budget_changes.append({"requested_s": self.now(), "bytes": int(new_bytes), "drop": pending,
                                         "absorbed_s": None if pending else self.now()})

    def finish(self) -> Trace:
        """Wait for every op (trailing evictions included), stop all threads, return the trace."""
        with self.cv:
            self._main = "done"
            while not (self._issuer_done and not self._anything_running()):
                self._raise_if_failed()
                self.cv.wait(0.25)
            self._raise_if_failed()
        return self.close()

    def close(self, error: BaseException | None = None) -> Trace:
        """Stop every thread (aborting a run still in progress) and return the trace so far."""
        if self._trace is not None:
            return self._trace
        if error is not None:
            self._fail(error)
        with self.cv:
            unfinished = not self._issuer_done
        if unfinished and self._error is None:
            self._fail(ExecutorError("run closed before it finished"))
        self._abort.set()
        for w in self._workers.values():
            w.put(None)
        with self.cv:
            self.cv.notify_all()
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self.budget.stop()
        self._cleanup_resident()
        self._trace = self._build_trace()
        self._closed = True
        return self._trace

    @property
    def error(self) -> BaseException | None:
        return self._error

    @property
    def segments(self) -> list[Schedule]:
        """Every Schedule put in force, in order (the trace meta records their hashes)."""
        return list(self._segments)

    @property
    def threads(self) -> list[threading.Thread]:
        return list(self._threads)

    # --------------------------------------------------------------------------------------- issuer

    def _issuer_loop(self, _: None) -> None:
        while True:
            with self.cv:
                if self._pos >= len(self._items):
                    break
                rec = self._items[self._pos]
            if rec.op is None:
                self._boundary(rec)
                self._pos += 1
                continue
            self._issue(rec)
            self._pos += 1
        with self.cv:
            # No boundary is left to re-plan at: only evictions remain, which absorb a pending drop.
            self._drop_armed = True
            self._try_commit()
            while self._anything_running(include_main=False):
                self._check_abort()
                self.cv.wait(0.25)
            self._issuer_done = True
            self.cv.notify_all()

    def _boundary(self, rec: _Rec) -> None:
        """A call boundary: the only place Schedules change."""
        s, c = rec.stage, rec.call
        stage = self.workload.stages[s]
        with self.cv:
            for nbytes in self._call_drops.pop((stage.name, c), []):
                self.set_budget(nbytes)
            first_call = c == 1 and self.measure_first_calls and stage.calls > 1
            if first_call:
                while not self._book.done((s, 0)):  # the measured call must finish before the re-plan
                    self._check_abort()
                    if not self._anything_running():
                        raise DeadlockError(f"call 0 of stage {stage.name} cannot finish")
                    self.cv.wait(0.25)
            target = self.budget.pending if self.budget.pending is not None else self.budget.budget
            changed = target != self._budget_seen
            if not (first_call or changed):
                return
            reason = "budget" if changed else "first-call"
            measured = {k: dict(v) for k, v in self._measured.items()}
            point = ReplanPoint(reason, s, c, target, tuple(sorted(self._ops.blocks)), measured,
                                self.now(), self._segments[-1])
            self._budget_seen = target
        t0 = self.now()
        new = self._ask(point)
        with self.cv:
            if new is not None:
                if first_call:  # from now on execs hold the working bytes the new plan was made with
                    for (stage_name, block), nbytes in self._measured_pairs(s):
                        self._working[(stage_name, block)] = nbytes
                self._install(new, s, c, replace_from=self._pos + 1)
            if changed and self.budget.pending is not None:
                self._drop_armed = True  # the new Schedule's evictions absorb the drop
                self._try_commit()
            self._events.append(TraceEvent(name=f"plan ({reason})", cat="plan", lane="main", ts=t0,
                                           dur=max(0.0, self.now() - t0), stage=stage.name, call=c,
                                           bytes=new.budget_bytes if new is not None else target))

    def _issue(self, rec: _Rec) -> None:
        op = rec.op
        assert op is not None
        with self.cv:
            while True:
                self._check_abort()
                why = self._blocker(rec)
                if why is None:
                    break
                if not self._anything_running():
                    raise DeadlockError(
                        f"deadlock at {self._describe(rec)}: it waits for {why} and nothing is running "
                        f"(accounted {self.budget.total} of {self.budget.budget} bytes)")
                self.cv.wait(0.25)
            if isinstance(op, LoadOp):
                self._start_load(op, rec)
                return
            if isinstance(op, ExecOp):
                self._start_exec(op, rec)
                return
            self._ops.start_evict()
        self._evict(op)

    def _blocker(self, rec: _Rec) -> str | None:
        """What ``rec`` still waits for, or None when it can start now (called under the lock)."""
        op = rec.op
        assert op is not None
        try:
            return self._ops.blocker(
                op, fits=lambda n: self._fits(n, rec),
                load_bytes=self._blocks[op.block].resident_bytes if isinstance(op, LoadOp) else 0,
                exec_bytes=self._exec_working(op) if isinstance(op, ExecOp) else 0,
                has_input=lambda s, c: self._book.has_input((s, c)))
        except ExecutorError as e:
            raise ExecutorError(f"{self._describe(rec)}: {e}") from None

    def _fits(self, nbytes: int, rec: _Rec) -> bool:
        # An op reserves under the budget in force and the one its Schedule was planned for: after a drop,
        # the old Schedule's ops still use the old budget until the boundary, the new one's the new budget.
        limit = min(self.budget.budget, rec.limit)
        return self.budget.total + nbytes <= limit

    # ---------------------------------------------------------------------------------- op starting

    def _start_load(self, op: LoadOp, rec: _Rec) -> None:
        block = self._blocks[op.block]
        self.budget.reserve("inflight", block.resident_bytes, op.block, wait=False)
        self._ops.start_load(op)
        lane = f"loader-{op.lane}"
        self._ensure_lanes(op.lane + 1)
        self._workers[lane].put(("load", op, rec, block.resident_bytes))

    def _start_exec(self, op: ExecOp, rec: _Rec) -> None:
        need = self._exec_working(op)
        self.budget.reserve("working", need, op.block, wait=False)
        self._ops.start_exec(op)
        self._workers[op.queue].put(("exec", op, rec, need))

    def _evict(self, op: EvictOp) -> None:
        t0 = self.now()
        try:
            self.provider.unload(op.block)
        finally:
            with self.cv:
                freed = self.budget.release_all(op.block)
                self._ops.end_evict(op.block)
                self._events.append(TraceEvent(name=f"evict {op.block}", cat="evict", lane="main", ts=t0,
                                               dur=max(0.0, self.now() - t0), block=op.block, bytes=freed))
                self._try_commit()
                self.cv.notify_all()

    # -------------------------------------------------------------------------------------- workers

    def _worker_loop(self, name: str) -> None:
        inbox = self._workers[name]
        while not self._abort.is_set():
            job = inbox.get()
            if job is None or self._abort.is_set():
                return
            kind, op, rec, nbytes = job
            if kind == "load":
                self._run_load(name, op, rec)
            else:
                self._run_exec(name, op, rec, nbytes)

    def _run_load(self, lane: str, op: LoadOp, rec: _Rec) -> None:
        block = self._blocks[op.block]
        t0 = self.now()
        if self.pacer is not None:
            self.pacer.begin(("load", op.block, rec.seg), op, block)
        actual = self.provider.load(op.block, self.cold)
        if self.pacer is not None:
            self.pacer.wait(("load", op.block, rec.seg), self._abort)
        with self.cv:
            self.budget.move("inflight", "resident", block.resident_bytes, op.block)
            if self.pacer is None and actual > block.resident_bytes:  # honest accounting of a larger form
                self.budget.reserve("resident", actual - block.resident_bytes, op.block, wait=False)
            self._ops.end_load(op)
            self._events.append(TraceEvent(name=f"load {op.block}", cat="load", lane=lane, ts=t0,
                                           dur=max(0.0, self.now() - t0), block=op.block,
                                           bytes=block.load_bytes))
            self.cv.notify_all()

    def _run_exec(self, q: str, op: ExecOp, rec: _Rec, working: int) -> None:
        s = self._stage_index[op.stage]
        stage = self.workload.stages[s]
        block = self._stage_blocks[s][op.block]
        with self.cv:
            carry = self._book.part((s, op.call), stage.name, op.part, op.part_count)
            measure = self.measure_first_calls and op.call == 0 and stage.calls > 1
        t0 = self.now()
        if self.pacer is not None:
            self.pacer.begin(("exec", op.block, s, op.call, op.part), op, block)
        peak = 0
        if measure:
            with LiveBytes() as tracker:
                out = self.provider.run(op.block, carry, q)
            peak = tracker.peak
        else:
            out = self.provider.run(op.block, carry, q)
        del carry
        if self.pacer is not None:
            self.pacer.wait(("exec", op.block, s, op.call, op.part), self._abort)
        with self.cv:
            self._book.put((s, op.call), op.part, out)
            if measure:
                m = self._measured.setdefault(stage.name, {})
                m[op.block] = m.get(op.block, 0) + peak  # parts of one call add up
            self.budget.release("working", working, op.block)
            self._try_commit()
            last = self._ops.end_exec(op)
            self._events.append(TraceEvent(name=op.block, cat="exec", lane=q, ts=t0,
                                           dur=max(0.0, self.now() - t0), block=op.block, stage=stage.name,
                                           call=op.call, bytes=working))
            if last:
                self._book.finish((s, op.call), stage.name)
                if self._main == "waiting":
                    self._main = "glue"  # the caller owns the output now: its next call is on its way
            self.cv.notify_all()

    # -------------------------------------------------------------------------------------- helpers

    def _ask(self, point: ReplanPoint) -> Schedule | None:
        sched = self.planner.plan(point)
        if sched is not None:
            self._replans.append({
                "reason": point.reason, "stage": self.workload.stages[point.stage].name, "call": point.call,
                "time_s": point.time_s, "budget_bytes": point.budget_bytes, "schedule": sched.content_hash(),
                "policy": sched.policy, "plan_options": sched.plan_options})
        return sched

    def _install(self, sched: Schedule, s: int, c: int, replace_from: int | None = None) -> None:
        try:
            flat = issue_order(sched, self.workload, s, c)
        except ScheduleError as e:
            raise ExecutorError(str(e)) from None
        seg = len(self._segments)
        self._segments.append(sched)
        limit = sched.budget_bytes
        items = [_Rec(op, si, call, seg, limit) for op, si, call in flat]
        if replace_from is None:
            self._items = items
            self._pos = 0
        else:
            self._items = self._items[:replace_from] + items
            self._pos = replace_from - 1  # the issuer increments past the boundary marker
        self._ensure_lanes(sched.loader_threads)

    def _exec_working(self, op: ExecOp) -> int:
        return math.ceil(self._working[(op.stage, op.block)] / op.part_count)

    def _measured_pairs(self, s: int) -> list[tuple[tuple[str, str], int]]:
        name = self.workload.stages[s].name
        return [((name, b), n) for b, n in self._measured.get(name, {}).items()]

    def _anything_running(self, include_main: bool = True) -> bool:
        main_busy = include_main and self._started and self._main == "glue" and not self._issuer_done
        return self._ops.busy() or main_busy

    def _ensure_lanes(self, n: int) -> None:
        if not self._started:
            return
        for i in range(n):
            name = f"loader-{i}"
            if name not in self._workers:
                self._spawn(name, self._worker_loop, name)

    def _spawn(self, name: str, target: Callable[[Any], None], arg: Any) -> None:
        if name != "issuer":
            self._workers[name] = queue.SimpleQueue()

        def body() -> None:
            try:
                target(arg if arg is not None else None)
            except BudgetAborted:
                pass
            except BaseException as e:  # every thread's error reaches the caller
                self._fail(e, where=name)

        t = threading.Thread(target=body, name=f"cidl-{name}", daemon=True)
        self._threads.append(t)
        t.start()

    def _fail(self, exc: BaseException, where: str = "") -> None:
        with self.cv:
            if self._error is None and not isinstance(exc, _Aborted):
                if where and not isinstance(exc, ExecutorError):
                    exc.add_note(f"in thread {where}")
                self._error = exc
            self._abort.set()
            self.cv.notify_all()
        for w in list(self._workers.values()):
            w.put(None)

    def _check_abort(self) -> None:
        if self._abort.is_set():
            raise _Aborted()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._wrap(self._error) from self._error
        if self._abort.is_set():
            raise ExecutorError("run aborted")

    @staticmethod
    def _wrap(e: BaseException) -> ExecutorError:
        if isinstance(e, ExecutorError):
            return type(e)(str(e))
        return ExecutorError(f"{type(e).__name__}: {e}")

    def _try_commit(self) -> None:
        """Put an armed budget drop in force once the accounted bytes fit under it."""
        pending = self.budget.pending
        if not self._drop_armed or pending is None or self.budget.total > pending:
            return
        self.budget.commit_pending()
        self._drop_armed = False
        now = self.now()
        for ch in self._budget_changes:
            if ch["absorbed_s"] is None and self.budget.budget <= ch["bytes"]:
                ch["absorbed_s"] = now
                self._events.append(TraceEvent(name=f"absorb budget drop to {ch['bytes']} bytes", cat="wait",
                                               lane="main", ts=ch["requested_s"], dur=now - ch["requested_s"],
                                               bytes=ch["bytes"]))

    def _cleanup_resident(self) -> None:
        for b in list(self._ops.blocks):
            try:
                self.provider.unload(b)
            except Exception:  # noqa: BLE001 - best effort on shutdown; the first error is already kept
                pass
            with self.cv:
                self.budget.release_all(b)
                self._ops.blocks.pop(b, None)

    def _describe(self, rec: _Rec) -> str:
        op = rec.op
        where = self._call_name(rec.stage, rec.call)
        if op is None:
            return where
        sched = self._segments[rec.seg].content_hash()
        return f"op #{self._pos} {op.kind}({op.block}) of Schedule {sched} at {where}"

    def _call_name(self, s: int, c: int) -> str:
        return call_name(self.workload, s, c)

    def _build_trace(self) -> Trace:
        order = {"plan": 0, "wait": 1, "evict": 2, "load": 3, "exec": 4}  # ties as the simulator orders them
        events = [e for _, e in sorted(enumerate(self._events),
                                       key=lambda r: (r[1].ts, order[r[1].cat], r[1].lane, r[1].name, r[0]))]
        latency = max((e.ts + e.dur for e in events), default=0.0)
        extra = {
            **self.meta_extra,
            "queues": self.queue_labels,
            "time_scale": self._scale,
            "cold": self.cold,
            "replans": self._replans,
            "budget_changes": self._budget_changes,
            "measured_working_bytes": self._measured,
            "loader_threads": max((s.loader_threads for s in self._segments), default=0),
            "peak_accounted_bytes": self.budget.peak,
            "rss_baseline_bytes": self.budget.rss_baseline,
            "rss_peak_growth_bytes": self.budget.rss_peak_growth,
            "rss_counter": "process RSS minus rss_baseline_bytes (taken just before the first load)",
        }
        err = None if self._error is None else f"{type(self._error).__name__}: {self._error}"
        meta = TraceMeta(
            trace_id=uuid.uuid4().hex[:12], source="host", policy=self.policy,
            workload=self.workload.model_dump(mode="json"), budget_bytes=self._segments[0].budget_bytes
            if self._segments else self.budget.budget,
            schedule_hashes=[s.content_hash() for s in self._segments], latency_s=latency, error=err,
            extra=extra,
        )
        return Trace(meta=meta, events=events, counters=self.budget.samples())


class _Aborted(Exception):
    """Internal: a thread noticed the run is stopping."""
