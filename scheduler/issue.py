"""A Schedule in issue order: the one reading of a Schedule that every executor shares.

The simulator, the runtime executor (and the phone agent) all walk a Schedule the same way: its prologue,
then each call's ops, the calls consecutive from the Schedule's start to the end of the run. This module
checks that and returns the ops tagged with their (stage index, call), a ``None`` marking each call boundary
after the first — the points where an executor may re-plan or switch to another Schedule.
"""

from __future__ import annotations

from .schedule import LoadOp, Op, Schedule
from .workload import Workload

IssueItem = tuple[Op | None, int, int]


class ScheduleError(ValueError):
    """A Schedule that does not fit the run it is given to (wrong start, gaps, early end, bad lane)."""


def call_name(workload: Workload, stage: int, call: int) -> str:
    name = workload.stages[stage].name if stage < len(workload.stages) else "end"
    return f"{name} call {call}"


def next_call(workload: Workload, stage: int, call: int) -> tuple[int, int]:
    """The call after (stage, call) in run order; (len(stages), 0) past the end."""
    return (stage, call + 1) if call + 1 < workload.stages[stage].calls else (stage + 1, 0)


def issue_order(schedule: Schedule, workload: Workload, stage: int, call: int) -> list[IssueItem]:
    """``schedule``'s ops in issue order, for a run positioned at (``stage``, ``call``). Raises ScheduleError."""
    h = schedule.content_hash()
    if (schedule.start_stage, schedule.start_call) != (stage, call):
        raise ScheduleError(f"Schedule {h} starts at stage {schedule.start_stage} call {schedule.start_call}, "
                            f"expected stage {stage} call {call}")
    index = {st.name: i for i, st in enumerate(workload.stages)}
    items: list[IssueItem] = [(op, stage, call) for op in schedule.prologue]
    expect = (stage, call)
    for i, co in enumerate(schedule.calls):
        si = index.get(co.stage)
        if si is None or (si, co.call) != expect:
            raise ScheduleError(f"Schedule {h}: calls[{i}] is {co.stage} call {co.call}, "
                                f"expected {call_name(workload, *expect)}")
        if i:
            items.append((None, si, co.call))
        items.extend((op, si, co.call) for op in co.ops)
        expect = next_call(workload, si, co.call)
    if expect[0] != len(workload.stages):
        raise ScheduleError(f"Schedule {h} ends before the run does (next would be "
                            f"{call_name(workload, *expect)})")
    for op, _, _ in items:
        if isinstance(op, LoadOp) and op.lane >= schedule.loader_threads:
            raise ScheduleError(f"Schedule {h}: load({op.block}) on lane {op.lane} but loader_threads is "
                                f"{schedule.loader_threads}")
    return items
