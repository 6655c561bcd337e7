"""Gantt chart of a Trace: one row per lane (loaders, gpu, ane, cpu), loads and execs coloured by model, and
the accounted memory below it against the budget in force.

matplotlib is imported inside :func:`plot_gantt` (importing ``cidl.traces`` stays fast), through its
object API (``Figure`` + the Agg canvas): no pyplot state, no GUI backend, safe from any thread.
"""

from __future__ import annotations

import io
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

from .chrome import lane_order
from .io import atomic_write_bytes
from .model import Trace, TraceEvent

AGGREGATE_ABOVE = 1500
"""More events than this: bars closer than a pixel (makespan / PIXELS) on one row merge into one."""
PIXELS = 2000
MODEL_COLOURS = {"t5": "#4C72B0", "stdit": "#DD8452", "vae_temporal": "#55A868", "vae_2d": "#C44E52"}
OTHER_COLOUR = "#8C8C8C"
STACK = (("persistent", "#B0B0B0"), ("resident", "#8FB3D9"), ("working", "#F2B279"), ("inflight", "#B5D99C"))


def model_of(e: TraceEvent) -> str:
    """``stdit.block03`` -> ``stdit``; without a block, the last word of the name (``load t5.block00``)."""
    ref = e.block or (e.name.split()[-1] if e.name.split() else "")
    return ref.split(".", 1)[0]


def _model_rank(model: str) -> tuple[int, str]:
    """Pipeline order (t5, stdit, vae_temporal, vae_2d), then other models by name."""
    order = list(MODEL_COLOURS)
    return (order.index(model), "") if model in order else (len(order), model)


def merge_bars(spans: list[tuple[float, float]], gap: float) -> list[tuple[float, float]]:
    """(start, width) spans, sorted and merged where the next starts within ``gap`` of the previous end."""
    out: list[tuple[float, float]] = []
    for start, width in sorted(spans):
        if out and start <= out[-1][0] + out[-1][1] + gap:
            s0, w0 = out[-1]
            out[-1] = (s0, max(w0, start + width - s0))
        else:
            out.append((start, width))
    return out


def _bars(trace: Trace, gap: float | None) -> dict[tuple[str, str, str], list[tuple[float, float]]]:
    """(lane, cat, model) -> bars over load and exec events (and waits, on their lane); merged within
    ``gap`` seconds unless ``gap`` is None."""
    spans: dict[tuple[str, str, str], list[tuple[float, float]]] = defaultdict(list)
    for e in trace.events:
        if e.cat in ("load", "exec") or (e.cat == "wait" and e.dur > 0):
            spans[(e.lane, e.cat, model_of(e) if e.cat != "wait" else "")].append((e.ts, e.dur))
    return {k: sorted(v) if gap is None else merge_bars(v, gap) for k, v in spans.items()}


def _step_series(trace: Trace) -> tuple[list[float], dict[str, list[float]]]:
    """All counters on one time grid, each held from its sample on (a step function), in bytes."""
    times = sorted({c.ts for c in trace.counters})
    index = {t: i for i, t in enumerate(times)}
    raw: dict[str, list[float | None]] = defaultdict(lambda: [None] * len(times))
    for c in trace.counters:  # the last sample at an instant wins, as in the recorders
        raw[c.name][index[c.ts]] = float(c.value)
    series: dict[str, list[float]] = {}
    for name, values in raw.items():
        held, last = [], 0.0
        for v in values:
            last = last if v is None else v
            held.append(last)
        series[name] = held
    return times, series


def _title(trace: Trace, title: str | None, aggregated: bool) -> str:
    m = trace.meta
    head = title or " ".join(x for x in (m.policy, m.source, "trace", m.trace_id) if x)
    latency = m.latency_s if m.latency_s is not None else trace.makespan
    line = f"latency {latency:.2f} s"
    if m.lower_bound_s:
        line += f" vs lower bound {m.lower_bound_s:.2f} s ({latency / m.lower_bound_s:.2f}x)"
    if m.error:
        line += f"; ended early: {m.error.splitlines()[0][:80]}"
    if aggregated:
        line += f"; {len(trace.events)} events, bars within {100 / PIXELS:.2f}% of the run merged"
    return f"{head}\n{line}"


def plot_gantt(trace: Trace, path: str | os.PathLike[str], *, title: str | None = None,
               budget_bytes: int | None = None) -> Path:
    """Draw ``trace`` to a PNG at ``path`` (written atomically); returns the path.

    ``budget_bytes`` draws a constant budget line when the trace has no ``budget`` counter (the counter, a
    step function, is the truth when present); the default is ``trace.meta.budget_bytes``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    makespan = max(trace.makespan, max((c.ts for c in trace.counters), default=0.0), 1e-9)
    aggregated = len(trace.events) > AGGREGATE_ABOVE
    bars = _bars(trace, makespan / PIXELS if aggregated else None)
    lanes = lane_order({lane for lane, _, _ in bars}) or ["(no events)"]
    row = {lane: i for i, lane in enumerate(lanes)}

    fig = Figure(figsize=(14, 2.2 + 0.42 * len(lanes) + 2.6), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax, mem = fig.subplots(2, 1, sharex=True, height_ratios=[max(1.2, 0.42 * len(lanes)), 2.6])

    models: set[str] = set()
    for (lane, cat, model), spans in sorted(bars.items()):
        y = row[lane]
        if cat == "wait":
            ax.broken_barh(spans, (y - 0.4, 0.8), facecolors="none", edgecolors="#555555", hatch="///",
                           linewidth=0.5)
            continue
        models.add(model)
        colour = MODEL_COLOURS.get(model, OTHER_COLOUR)
        # Loads lighter and thinner than execs, so a shared row still reads.
        height, alpha = (0.5, 0.55) if cat == "load" else (0.8, 1.0)
        # Unmerged bars get a hairline edge so back-to-back blocks stay apart.
        ax.broken_barh(spans, (y - height / 2, height), facecolors=colour, alpha=alpha,
                       edgecolors="white", linewidth=0 if aggregated else 0.3)
    ax.set_yticks(range(len(lanes)), lanes)
    ax.set_ylim(len(lanes) - 0.5, -0.5)
    ax.set_xlim(0, makespan * 1.01)
    ax.grid(axis="x", alpha=0.3)
    _stage_marks(ax, trace)
    handles: list[Any] = [Patch(color=MODEL_COLOURS.get(m, OTHER_COLOUR), label=m)
                          for m in sorted(models, key=_model_rank)]
    handles.append(Patch(facecolor="#999999", alpha=0.55, label="load (light, thin)"))
    if any(cat == "wait" for _, cat, _ in bars):
        handles.append(Patch(facecolor="none", edgecolor="#555555", hatch="///", label="wait"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)

    _memory_panel(mem, trace, budget_bytes if budget_bytes is not None else trace.meta.budget_bytes, makespan)
    mem.set_xlabel("time (s)")
    fig.suptitle(_title(trace, title, aggregated), fontsize=10)

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return atomic_write_bytes(path, buf.getvalue())


def _stage_marks(ax: Any, trace: Trace) -> None:
    """A faint line and the stage's name where each stage starts (its first event)."""
    starts: dict[str, float] = {}
    for e in trace.events:
        if e.stage is not None and (e.stage not in starts or e.ts < starts[e.stage]):
            starts[e.stage] = e.ts
    for i, (stage, t) in enumerate(sorted(starts.items(), key=lambda kv: kv[1])):
        ax.axvline(t, color="#444444", linewidth=0.6, linestyle=":", alpha=0.7)
        # Alternate heights: consecutive short stages would print over each other.
        ax.annotate(stage, (t, 0), xycoords=("data", "axes fraction"), xytext=(2, 2 + 9 * (i % 2)),
                    textcoords="offset points", fontsize=7, color="#444444")


def _memory_panel(mem: Any, trace: Trace, budget_bytes: int | None, makespan: float) -> None:
    times, series = _step_series(trace)
    gb = 1e9
    if times:
        t = [*times, makespan]
        base = [0.0] * len(t)
        for name, colour in STACK:
            if name not in series:
                continue
            top = [b + v / gb for b, v in zip(base, [*series[name], series[name][-1]], strict=True)]
            mem.fill_between(t, base, top, step="post", color=colour, linewidth=0, label=name)
            base = top
        for name, style in (("total", dict(color="black", linewidth=1.0)),
                            ("rss", dict(color="#7B3294", linewidth=0.8, linestyle="--")),
                            ("budget", dict(color="#D62728", linewidth=1.4))):
            if name in series:
                mem.step(t, [v / gb for v in [*series[name], series[name][-1]]], where="post",
                         label=f"{name} (accounted)" if name == "total" else name, **style)
    if "budget" not in series and budget_bytes:
        mem.axhline(budget_bytes / gb, color="#D62728", linewidth=1.4, label="budget")
    mem.set_ylabel("memory (GB)")
    mem.set_ylim(bottom=0)
    mem.grid(alpha=0.3)
    if mem.get_legend_handles_labels()[0]:
        mem.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    else:
        mem.text(0.5, 0.5, "no memory counters", transform=mem.transAxes, ha="center", color="#777777")
