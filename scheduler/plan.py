"""Re-plan state and feasibility: what a policy knows at a re-plan point, and the smallest budget that runs.

Re-plan points (DESIGN.md): the start of the run (the measured available memory), after the first call of
a stage with more than one call (its working memory measured), and a budget change. At each one the
executor (simulator or runtime) hands the policy a :class:`PlanState` and installs the Schedule it returns
from the state's position (a call boundary) on.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal

from cidl.device_profiles.profile import DeviceProfile
from cidl.device_profiles.units import format_size

from .schedule import Schedule
from .workload import Block, Workload

Reason = Literal["start", "first-call", "budget"]


class BudgetTooSmall(ValueError):
    """A workload that cannot run under a budget; the message says by how many bytes."""

    def __init__(self, workload: str, budget_bytes: int, needed_bytes: int, detail: str = "") -> None:
        self.workload = workload
        self.budget_bytes = budget_bytes
        self.needed_bytes = needed_bytes
        self.shortfall_bytes = needed_bytes - budget_bytes
        msg = (f"budget {budget_bytes} bytes ({format_size(budget_bytes)}) is too small for {workload} by "
               f"{self.shortfall_bytes} bytes ({format_size(self.shortfall_bytes)}): it needs at least "
               f"{needed_bytes} bytes ({format_size(needed_bytes)})")
        super().__init__(msg + (f"; {detail}" if detail else ""))


@dataclass(frozen=True)
class PlanState:
    """Everything a policy may use at a re-plan point. Plain data: the runtime builds it from its own state.

    ``resident``: blocks resident *or being loaded* (an in-flight load already holds its bytes).
    ``measured_working``: stage name -> block id -> working bytes of one whole call, measured during the
    stage's first call; stages absent here use the cost model's ``Block.working_bytes``.
    ``current``: the Schedule in force (None at the start), so a policy can continue its own plan.
    """

    workload: Workload
    profile: DeviceProfile
    budget_bytes: int
    stage: int = 0
    call: int = 0
    resident: frozenset[str] = frozenset()
    measured_working: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    reason: Reason = "start"
    current: Schedule | None = None
    time_s: float = 0.0

    def __post_init__(self) -> None:
        n = len(self.workload.stages)
        if not 0 <= self.stage < n:
            raise ValueError(f"PlanState.stage: expected 0..{n - 1}, got {self.stage}")
        calls = self.workload.stages[self.stage].calls
        if not 0 <= self.call < calls:
            raise ValueError(f"PlanState.call: expected 0..{calls - 1} for stage "
                             f"{self.workload.stages[self.stage].name}, got {self.call}")
        if self.budget_bytes <= 0:
            raise ValueError(f"PlanState.budget_bytes: expected > 0, got {self.budget_bytes}")

    def working(self, stage: int, block: Block) -> int:
        """Working bytes of one call of ``block`` in ``stage``: measured if known, else the cost model's."""
        measured = self.measured_working.get(self.workload.stages[stage].name)
        if measured is not None and block.id in measured:
            return int(measured[block.id])
        return block.working_bytes

    def measured(self, stage: int) -> bool:
        return self.workload.stages[stage].name in self.measured_working

    def remaining_calls(self) -> Iterator[tuple[int, int]]:
        """(stage, call) pairs from this position to the end of the run."""
        for s in range(self.stage, len(self.workload.stages)):
            first = self.call if s == self.stage else 0
            for c in range(first, self.workload.stages[s].calls):
                yield s, c


def _tightest(workload: Workload, measured: Mapping[str, Mapping[str, int]] | None,
              from_stage: int = 0) -> tuple[int, str]:
    best, what = 0, ""
    for stage in workload.stages[from_stage:]:
        m = (measured or {}).get(stage.name, {})
        for b in stage.blocks:
            w = int(m.get(b.id, b.working_bytes))
            if b.resident_bytes + w > best:
                best = b.resident_bytes + w
                what = f"block {b.id} in stage {stage.name}: {b.resident_bytes} resident + {w} working"
    return best, what


def min_feasible_budget(workload: Workload, measured: Mapping[str, Mapping[str, int]] | None = None,
                        *, from_stage: int = 0) -> int:
    """The smallest budget any schedule runs under: one block resident + its working bytes + persistent,
    for the tightest block of the stages from ``from_stage`` on.

    ``sequential`` (load, run, evict) needs exactly this; every policy degrades to it where memory is tight.
    """
    return _tightest(workload, measured, from_stage)[0] + workload.persistent_bytes


def check_feasible(workload: Workload, budget_bytes: int,
                   measured: Mapping[str, Mapping[str, int]] | None = None, *, from_stage: int = 0) -> None:
    """Raise :class:`BudgetTooSmall` when ``budget_bytes`` is below :func:`min_feasible_budget`."""
    block, what = _tightest(workload, measured, from_stage)
    need = block + workload.persistent_bytes
    if budget_bytes < need:
        raise BudgetTooSmall(workload.name, budget_bytes, need,
                             f"{what} + {workload.persistent_bytes} persistent")


def resident_before(schedule: Schedule, workload: Workload, stage: int, call: int,
                    initial: frozenset[str] = frozenset()) -> frozenset[str]:
    """Blocks resident (or loading) at the boundary before call ``call`` of stage ``stage`` when ``schedule``
    is followed from its start with ``initial`` resident.

    A Schedule's later calls rely on blocks its earlier calls prefetched, so switching to it mid-run (a
    budget ladder) must first load what this returns and evict the rest -- or ask the policy for a fresh
    plan from the actual resident set.
    """
    held = set(initial)
    names = {s.name: i for i, s in enumerate(workload.stages)}
    ops = list(schedule.prologue)
    for co in schedule.calls:
        if (names[co.stage], co.call) >= (stage, call):
            break
        ops.extend(co.ops)
    for op in ops:
        if op.kind == "load":
            held.add(op.block)
        elif op.kind == "evict":
            held.discard(op.block)
    return frozenset(held)
