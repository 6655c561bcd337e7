"""Two traces side by side (``cidl compare A B``): per stage, per lane, overlap, peak memory, makespan.

Definitions (each metric has A's value, B's, and B's relative error against A, ``b / a - 1``):

* stage latency: from the first event of the stage (any category) to the end of its last exec;
* lane busy time: the length of the union of the lane's load and exec spans;
* overlap: the fraction of exec time (the union of all exec spans, on any queue) during which at least one
  load is in progress;
* peak accounted bytes: the largest ``total`` counter sample;
* makespan: the end of the last event; latency: ``meta.latency_s`` where the trace has it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from .chrome import lane_order
from .model import Trace, TraceEvent

MetricUnit = Literal["s", "bytes", "fraction"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Metric(_Frozen):
    name: str
    unit: MetricUnit
    a: float | None
    b: float | None
    rel_error: float | None = None  # b / a - 1; None when either is missing or a is 0 (b not 0)


class Comparison(_Frozen):
    a: str  # "<source> <policy> <trace id>"
    b: str
    stages: list[Metric]
    lanes: list[Metric]
    overall: list[Metric]

    def metric(self, name: str) -> Metric:
        for m in (*self.stages, *self.lanes, *self.overall):
            if m.name == name:
                return m
        raise KeyError(f"no metric {name!r} in this comparison")


def _metric(name: str, unit: MetricUnit, a: float | None, b: float | None) -> Metric:
    if a is None or b is None:
        rel = None
    elif a == 0:
        rel = 0.0 if b == 0 else None
    else:
        rel = b / a - 1
    return Metric(name=name, unit=unit, a=a, b=b, rel_error=rel)


def union(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Disjoint, sorted (start, end) intervals covering ``spans`` (start, end)."""
    out: list[tuple[float, float]] = []
    for s, e in sorted(spans):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def length(intervals: list[tuple[float, float]]) -> float:
    return sum(e - s for s, e in intervals)


def intersection_length(xs: list[tuple[float, float]], ys: list[tuple[float, float]]) -> float:
    """Length of the intersection of two disjoint sorted interval lists (a two-pointer sweep)."""
    i = j = 0
    total = 0.0
    while i < len(xs) and j < len(ys):
        lo, hi = max(xs[i][0], ys[j][0]), min(xs[i][1], ys[j][1])
        total += max(0.0, hi - lo)
        if xs[i][1] < ys[j][1]:
            i += 1
        else:
            j += 1
    return total


def _spans(events: list[TraceEvent]) -> list[tuple[float, float]]:
    return [(e.ts, e.ts + e.dur) for e in events]


def stage_latencies(trace: Trace) -> dict[str, float]:
    """Stage -> seconds from its first event to the end of its last exec, in order of first event."""
    first: dict[str, float] = {}
    last_exec: dict[str, float] = {}
    for e in trace.events:
        if e.stage is None:
            continue
        first[e.stage] = min(first.get(e.stage, e.ts), e.ts)
        if e.cat == "exec":
            last_exec[e.stage] = max(last_exec.get(e.stage, 0.0), e.ts + e.dur)
    order = sorted(first, key=lambda s: first[s])
    return {s: max(0.0, last_exec[s] - first[s]) for s in order if s in last_exec}


def lane_busy(trace: Trace) -> dict[str, float]:
    """Lane -> length of the union of its load and exec spans."""
    by_lane: dict[str, list[TraceEvent]] = {}
    for e in trace.events:
        if e.cat in ("load", "exec"):
            by_lane.setdefault(e.lane, []).append(e)
    return {lane: length(union(_spans(evs))) for lane, evs in by_lane.items()}


def overlap_fraction(trace: Trace) -> float | None:
    """Fraction of exec time (union over queues) with at least one load in progress; None without execs."""
    execs = union(_spans([e for e in trace.events if e.cat == "exec"]))
    busy = length(execs)
    if busy <= 0:
        return None
    loads = union(_spans([e for e in trace.events if e.cat == "load"]))
    return intersection_length(execs, loads) / busy


def _label(t: Trace) -> str:
    return " ".join(x for x in (t.meta.source, t.meta.policy, t.meta.trace_id) if x)


def compare_traces(a: Trace, b: Trace) -> Comparison:
    """Metrics of ``a`` and ``b`` side by side, with B's relative error against A."""
    sa, sb = stage_latencies(a), stage_latencies(b)
    names = [*sa, *(s for s in sb if s not in sa)]
    stages = [_metric(f"stage {s}", "s", sa.get(s), sb.get(s)) for s in names]
    la, lb = lane_busy(a), lane_busy(b)
    lanes = [_metric(f"busy {lane}", "s", la.get(lane), lb.get(lane)) for lane in lane_order({*la, *lb})]
    has_total = [any(c.name == "total" for c in t.counters) for t in (a, b)]
    overall = [
        _metric("makespan", "s", a.makespan, b.makespan),
        _metric("overlap", "fraction", overlap_fraction(a), overlap_fraction(b)),
        _metric("peak accounted bytes", "bytes", float(a.peak("total")) if has_total[0] else None,
                float(b.peak("total")) if has_total[1] else None),
    ]
    if a.meta.latency_s is not None or b.meta.latency_s is not None:
        overall.insert(0, _metric("latency", "s", a.meta.latency_s, b.meta.latency_s))
    return Comparison(a=_label(a), b=_label(b), stages=stages, lanes=lanes, overall=overall)


def _fmt(value: float | None, unit: MetricUnit) -> str:
    if value is None:
        return "-"
    if unit == "s":
        return f"{value:.3f} s"
    if unit == "fraction":
        return f"{100 * value:.1f}%"
    for suffix, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {suffix}"
    return f"{int(value)} B"


def render_comparison(cmp: Comparison) -> Any:
    """A ``rich.table.Table`` of the comparison (rich is imported here, not at module import)."""
    from rich.table import Table

    table = Table(title=f"A: {cmp.a}\nB: {cmp.b}", title_justify="left")
    table.add_column("metric")
    table.add_column("A", justify="right")
    table.add_column("B", justify="right")
    table.add_column("B vs A", justify="right")
    for section in (s for s in (cmp.overall, cmp.stages, cmp.lanes) if s):
        for i, m in enumerate(section):
            rel = "-" if m.rel_error is None else f"{100 * m.rel_error:+.1f}%"
            table.add_row(m.name, _fmt(m.a, m.unit), _fmt(m.b, m.unit), rel,
                          end_section=i == len(section) - 1)
    return table
