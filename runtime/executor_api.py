"""The executor's contracts: its errors, what it needs from blocks, planners and pacers, and what it tells
a planner at a re-plan point. Split from :mod:`cidl.runtime.executor` (which re-exports every name)."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Protocol

from cidl.scheduler.schedule import ExecOp, LoadOp, Schedule
from cidl.scheduler.workload import Block

Carry = dict[str, Any]


class ExecutorError(RuntimeError):
    """The run stopped: an error in a thread, a deadlock, or a plan that cannot fit."""


class DeadlockError(ExecutorError):
    """The next op can never start: it waits for something only a later op would provide."""


class BlockProvider(Protocol):
    """What the executor needs from the blocks: load/unload and one forward."""

    def load(self, block_id: str, cold: bool) -> int:
        """Read and materialise a block; returns the resident bytes it really takes."""
        ...

    def unload(self, block_id: str) -> None: ...

    def run(self, block_id: str, carry: Carry, queue: str) -> Carry: ...


class Splitter(Protocol):
    """Splits a call's carry into independent batch parts and joins them back (STDiT's CFG halves)."""

    def split(self, carry: Carry, parts: int) -> list[Carry]: ...

    def merge(self, carries: list[Carry]) -> Carry: ...


class Pacer(Protocol):
    """``emulate`` mode: pads each op to a device profile's duration (``cidl.runtime.pacing``)."""

    time_scale: float

    def begin(self, key: object, op: LoadOp | ExecOp, block: Block) -> None: ...

    def wait(self, key: object, abort: threading.Event) -> None: ...


@dataclass(frozen=True)
class ReplanPoint:
    """Where and why the executor asks for a Schedule; the measured facts of the run so far."""

    reason: str  # "start" | "first-call" | "budget"
    stage: int
    call: int
    budget_bytes: int
    resident: tuple[str, ...]
    measured_working: dict[str, dict[str, int]]  # stage name -> block id -> bytes of one call
    time_s: float
    current: Schedule | None = None  # the Schedule in force (None at the start)


class Planner(Protocol):
    def plan(self, point: ReplanPoint) -> Schedule | None:
        """A Schedule starting at (``point.stage``, ``point.call``), or None to keep the current one."""
        ...
