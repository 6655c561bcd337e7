"""The policy contract: state at a re-plan point in, the Schedule for the rest of the run out.

Policies are pure: no simpy, no threads, no clocks. The simulator and the runtime call the very same
objects at the same re-plan points (``cidl.scheduler.plan``). ``optimal`` compares candidate plans with an
injected :data:`Evaluator` (the simulator provides one) instead of importing the simulator.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from enum import StrEnum
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from cidl.device_profiles.profile import Unit

from ..plan import PlanState
from ..schedule import Schedule


class PolicyName(StrEnum):
    SEQUENTIAL = "sequential"
    CONCURRENT = "concurrent"
    CIDL = "cidl"
    OPTIMAL = "optimal"


class _Options(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    units: list[Unit] | None = Field(
        None, description="Compute queues the policy may use; None: every queue of the profile."
    )


class SequentialOptions(_Options):
    kind: Literal["sequential"] = "sequential"


class ConcurrentOptions(_Options):
    """On-device Sora's Concurrent Inference: one loader thread, one block ahead."""

    kind: Literal["concurrent"] = "concurrent"
    loader_threads: int = Field(1, ge=1, le=64)
    prefetch_depth: int = Field(1, ge=1, le=64)


class CidlOptions(_Options):
    """Concurrent Inference plus Dynamic Loading (keep the first N blocks that fit)."""

    kind: Literal["cidl"] = "cidl"
    loader_threads: int = Field(1, ge=1, le=64)
    prefetch_depth: int = Field(1, ge=1, le=64)


class OptimalOptions(_Options):
    """``None`` fields are searched: loader threads in {1, the profile's}, prefetch depth in 1..max."""

    kind: Literal["optimal"] = "optimal"
    loader_threads: int | None = Field(None, ge=1, le=64)
    prefetch_depth: int | None = Field(None, ge=1, le=64)
    max_prefetch_depth: int = Field(3, ge=1, le=64)
    split_calls: bool = Field(True, description="Split batch halves of a call across queues when it pays.")


PolicyOptions = Annotated[
    SequentialOptions | ConcurrentOptions | CidlOptions | OptimalOptions, Field(discriminator="kind")
]
OPTIONS_BY_NAME: dict[PolicyName, type[_Options]] = {
    PolicyName.SEQUENTIAL: SequentialOptions,
    PolicyName.CONCURRENT: ConcurrentOptions,
    PolicyName.CIDL: CidlOptions,
    PolicyName.OPTIMAL: OptimalOptions,
}


def make_options(
    policy: str,
    *,
    loader_threads: int | None = None,
    prefetch_depth: int | None = None,
    units: list[Unit] | None = None,
) -> SequentialOptions | ConcurrentOptions | CidlOptions | OptimalOptions:
    """Options from CLI-style flags; a flag left None keeps the policy's default (sequential ignores them)."""
    name = parse_policy_name(policy)
    fields: dict[str, object] = {"units": units}
    if name is not PolicyName.SEQUENTIAL:
        if loader_threads is not None:
            fields["loader_threads"] = loader_threads
        if prefetch_depth is not None:
            fields["prefetch_depth"] = prefetch_depth
    return OPTIONS_BY_NAME[name](**fields)  # type: ignore[return-value]


def parse_policy_name(policy: str) -> PolicyName:
    try:
        return PolicyName(policy)
    except ValueError:
        names = ", ".join(p.value for p in PolicyName)
        raise ValueError(f"unknown policy {policy!r} (expected one of {names})") from None


class Policy(ABC):
    """One abstract method. ``name`` is what Schedules and traces record."""

    name: ClassVar[str]

    @abstractmethod
    def plan(self, state: PlanState) -> Schedule:
        """The Schedule from ``(state.stage, state.call)`` to the end of the run.

        Raises :class:`cidl.scheduler.plan.BudgetTooSmall` when nothing fits ``state.budget_bytes``.
        """


# Predicted seconds from ``state`` to the end of the run when ``policy`` plans it (and re-plans at the
# usual points). ``optimal`` uses it to keep the best of its candidates; the simulator supplies one.
Evaluator = Callable[[PlanState, Policy], float]
