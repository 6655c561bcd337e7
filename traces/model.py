"""One timeline format for the simulator, the runtime and the phone.

Times are seconds from the start of the run. Lanes name where an event ran: ``loader-0``..``loader-N``,
``gpu``, ``ane``, ``cpu``, ``main``. ``traces`` imports nothing else of cidl, so the embedded workload and
profile are plain JSON values here.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1

Category = Literal["load", "exec", "evict", "wait", "plan"]
Source = Literal["simulated", "host", "device"]
CounterName = Literal["resident", "inflight", "working", "persistent", "total", "budget", "rss"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TraceEvent(_Frozen):
    """A span: a block load, an exec of one call, an eviction (dur 0 is fine), a wait, a re-plan."""

    name: str
    cat: Category
    lane: str
    ts: float = Field(ge=0)
    dur: float = Field(ge=0)
    block: str | None = None
    stage: str | None = None
    call: int | None = None
    bytes: int = 0


class CounterSample(_Frozen):
    """The value of one memory counter from ``ts`` on (a step function)."""

    name: CounterName
    ts: float = Field(ge=0)
    value: int


class TraceMeta(_Frozen):
    trace_id: str
    source: Source
    policy: str = ""
    profile: dict[str, Any] | None = Field(None, description="The DeviceProfile JSON the run used, if any.")
    workload: dict[str, Any] | None = Field(None, description="The Workload JSON, so replay needs no models.")
    budget_bytes: int | None = None
    schedule_hashes: list[str] = Field(default_factory=list, description="Every Schedule segment, in order.")
    latency_s: float | None = None
    lower_bound_s: float | None = None
    error: str | None = Field(None, description="Set when the run ended early (e.g. budget drop too deep).")
    extra: dict[str, Any] = Field(default_factory=dict)


class Trace(_Frozen):
    schema_version: Literal[1] = SCHEMA_VERSION
    meta: TraceMeta
    events: list[TraceEvent] = Field(default_factory=list)
    counters: list[CounterSample] = Field(default_factory=list)

    @property
    def makespan(self) -> float:
        return max((e.ts + e.dur for e in self.events), default=0.0)

    def peak(self, counter: CounterName = "total") -> int:
        return max((c.value for c in self.counters if c.name == counter), default=0)
