"""Trace <-> Chrome Trace Event Format JSON (opens in ui.perfetto.dev and chrome://tracing).

The only module that knows Chrome JSON. Layout of a cidl trace:

* one process (``pid`` 1, the run), one thread per lane (``tid`` 1..n, loaders first, then gpu, ane, cpu,
  main, then any other lane), named by ``M`` ``thread_name`` events and ordered by ``thread_sort_index``;
* each TraceEvent is a complete event ``ph: "X"`` with ``ts``/``dur`` in microseconds, ``cat`` load/exec/...,
  and ``args`` block, stage, call, bytes;
* each CounterSample is a counter event ``ph: "C"`` named ``memory.<counter>`` with ``args: {"bytes": v}``
  (one track per counter: a viewer shows a C event's args as series of one track, and samples of different
  counters arrive at different instants);
* the TraceMeta sits in ``otherData.cidl``.

Exact round trip: seconds -> microseconds is not invertible in floating point (``x * 1e6 / 1e6 != x`` for
about one value in twenty), so every X and C event also carries its exact seconds, ``ts_s`` (and ``dur_s``),
as extra top-level keys, which viewers ignore. ``from_chrome`` prefers them and falls back to ``ts / 1e6``,
so a hand-written or edited trace still reads. JSON keeps every float exact (shortest repr).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .io import atomic_write_bytes
from .model import SCHEMA_VERSION, CounterSample, Trace, TraceEvent, TraceMeta

PID = 1
COUNTER_PREFIX = "memory."
_US = 1e6
_ARG_KEYS = ("block", "stage", "call", "bytes")
_META_NAMES = {
    "process_name": "name", "process_labels": "labels", "process_sort_index": "sort_index",
    "thread_name": "name", "thread_sort_index": "sort_index",
}
_THREAD_META = {"thread_name", "thread_sort_index"}
_PHASES = set("BEXIiCbneSTpFsftPOND(M") | {"R", "c", "V", "v", "G", "z", "<", ">", ")"}


class TraceFormatError(ValueError):
    """A file or dict that is not a valid cidl trace; the message is one line."""


def lane_order(lanes: set[str] | list[str]) -> list[str]:
    """Loaders by number, then gpu, ane, cpu, main, then the rest by name: the order of rows everywhere."""
    fixed = {"gpu": 0, "ane": 1, "cpu": 2, "main": 3}

    def key(lane: str) -> tuple[int, int, str]:
        m = re.fullmatch(r"loader-(\d+)", lane)
        if m:
            return (0, int(m.group(1)), lane)
        if lane in fixed:
            return (1, fixed[lane], lane)
        return (2, 0, lane)

    return sorted(set(lanes), key=key)


# --- Trace -> dict -------------------------------------------------------------------------------------


def _meta_event(name: str, tid: int, value: Any) -> dict[str, Any]:
    return {"name": name, "ph": "M", "pid": PID, "tid": tid, "ts": 0, "args": {_META_NAMES[name]: value}}


def _complete(e: TraceEvent, tid: int) -> dict[str, Any]:
    args: dict[str, Any] = {k: getattr(e, k) for k in _ARG_KEYS if getattr(e, k) is not None}
    return {"name": e.name, "cat": e.cat, "ph": "X", "pid": PID, "tid": tid,
            "ts": e.ts * _US, "dur": e.dur * _US, "ts_s": e.ts, "dur_s": e.dur, "args": args}


def _counter(c: CounterSample) -> dict[str, Any]:
    return {"name": COUNTER_PREFIX + c.name, "cat": "memory", "ph": "C", "pid": PID, "tid": 0,
            "ts": c.ts * _US, "ts_s": c.ts, "args": {"bytes": c.value}}


def to_chrome(trace: Trace) -> dict[str, Any]:
    """The Chrome Trace Event JSON object of ``trace`` (a pure function; nothing is written)."""
    lanes = lane_order({e.lane for e in trace.events})
    tids = {lane: i + 1 for i, lane in enumerate(lanes)}
    label = f"cidl {trace.meta.source} {trace.meta.policy} {trace.meta.trace_id}".replace("  ", " ")
    events: list[dict[str, Any]] = [_meta_event("process_name", 0, label)]
    for lane, tid in tids.items():
        events.append(_meta_event("thread_name", tid, lane))
        events.append(_meta_event("thread_sort_index", tid, tid))
    events.extend(_complete(e, tids[e.lane]) for e in trace.events)
    events.extend(_counter(c) for c in trace.counters)
    return {
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "otherData": {"cidl": {"schema_version": trace.schema_version,
                               "meta": trace.meta.model_dump(mode="json")}},
    }


# --- dict -> Trace -------------------------------------------------------------------------------------


def _where(i: int, ev: dict[str, Any]) -> str:
    return f"traceEvents[{i}] ({ev.get('ph', '?')} {ev.get('name', '?')!r})"


def _field_error(e: ValidationError) -> str:
    first = e.errors(include_url=False)[0]
    where = ".".join(str(p) for p in first["loc"])
    msg = str(first["msg"]).removeprefix("Value error, ")
    return f"field {where}: {msg}" if where else msg


def _seconds(ev: dict[str, Any], exact: str, us: str, where: str) -> float:
    value = ev[exact] if exact in ev else ev.get(us)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TraceFormatError(f"{where}: field {us}: expected a number, got {value!r}")
    return float(value) if exact in ev else value / _US


def from_chrome(data: Any) -> Trace:
    """The Trace in a Chrome JSON object written by :func:`to_chrome`. Raises TraceFormatError (one line)."""
    if not isinstance(data, dict):
        raise TraceFormatError(f"expected a JSON object with 'traceEvents', got {type(data).__name__}")
    events = data.get("traceEvents")
    if not isinstance(events, list):
        raise TraceFormatError("missing 'traceEvents' list: not a Chrome trace")
    cidl = (data.get("otherData") or {}).get("cidl") if isinstance(data.get("otherData"), dict) else None
    if not isinstance(cidl, dict) or "meta" not in cidl:
        raise TraceFormatError("not a cidl trace: no otherData.cidl.meta (written by another tool?)")
    if cidl.get("schema_version") != SCHEMA_VERSION:
        raise TraceFormatError(f"field otherData.cidl.schema_version: expected {SCHEMA_VERSION}, "
                               f"got {cidl.get('schema_version')!r}")
    try:
        meta = TraceMeta.model_validate(cidl["meta"])
    except ValidationError as e:
        raise TraceFormatError(f"otherData.cidl.meta: {_field_error(e)}") from None

    lanes: dict[Any, str] = {}
    for ev in events:
        if isinstance(ev, dict) and ev.get("ph") == "M" and ev.get("name") == "thread_name":
            lanes[ev.get("tid")] = str((ev.get("args") or {}).get("name"))
    out_events: list[TraceEvent] = []
    counters: list[CounterSample] = []
    for i, ev in enumerate(events):
        if not isinstance(ev, dict):
            raise TraceFormatError(f"traceEvents[{i}]: expected an object, got {type(ev).__name__}")
        ph, where = ev.get("ph"), _where(i, ev)
        try:
            if ph == "X":
                if ev.get("tid") not in lanes:
                    raise TraceFormatError(f"{where}: tid {ev.get('tid')!r} has no thread_name metadata")
                args = ev.get("args") or {}
                out_events.append(TraceEvent(
                    name=ev.get("name"), cat=ev.get("cat"), lane=lanes[ev["tid"]],  # type: ignore[arg-type]
                    ts=_seconds(ev, "ts_s", "ts", where), dur=_seconds(ev, "dur_s", "dur", where),
                    **{k: args[k] for k in _ARG_KEYS if k in args}))
            elif ph == "C":
                name = str(ev.get("name", ""))
                if not name.startswith(COUNTER_PREFIX):
                    continue  # a counter some other tool added: not ours to read back
                value = (ev.get("args") or {}).get("bytes")
                counters.append(CounterSample(name=name.removeprefix(COUNTER_PREFIX),  # type: ignore[arg-type]
                                              ts=_seconds(ev, "ts_s", "ts", where), value=value))
        except ValidationError as e:
            raise TraceFormatError(f"{where}: {_field_error(e)}") from None
    return Trace(schema_version=cidl["schema_version"], meta=meta, events=out_events, counters=counters)


# --- files ---------------------------------------------------------------------------------------------


def dumps_chrome(data: dict[str, Any]) -> str:
    """Compact JSON with one trace event per line (diffable, a fraction of the size of indented JSON)."""
    def enc(v: Any) -> str:
        return json.dumps(v, separators=(",", ":"), allow_nan=False)

    head = {k: v for k, v in data.items() if k != "traceEvents"}
    lines = ",\n".join(enc(ev) for ev in data.get("traceEvents", []))
    rest = "".join(f",\n{enc(k)}:{enc(v)}" for k, v in head.items())
    return f'{{"traceEvents":[\n{lines}\n]{rest}\n}}\n'


def write_trace(trace: Trace, path: str | os.PathLike[str]) -> Path:
    """Write ``trace`` as Chrome JSON to ``path`` atomically (temp file in the same folder + os.replace)."""
    path = Path(path)
    try:
        text = dumps_chrome(to_chrome(trace))
    except ValueError as e:  # NaN or infinity: not JSON
        raise TraceFormatError(f"{path}: trace has a non-finite number, cannot write JSON ({e})") from None
    return atomic_write_bytes(path, text.encode())


def read_trace(path: str | os.PathLike[str]) -> Trace:
    """Read a trace written by :func:`write_trace`. Errors are one line naming the file and what is wrong."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such trace file") from None
    except IsADirectoryError:
        raise TraceFormatError(f"{path}: is a directory, not a trace file") from None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise TraceFormatError(f"{path}: not JSON (line {e.lineno} column {e.colno}: {e.msg})") from None
    except UnicodeDecodeError as e:
        raise TraceFormatError(f"{path}: not JSON (not UTF-8 text: {e.reason} at byte {e.start})") from None
    try:
        return from_chrome(data)
    except TraceFormatError as e:
        raise TraceFormatError(f"{path}: {e}") from None


# --- validation against the Trace Event Format -----------------------------------------------------------


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _check_event(ev: dict[str, Any]) -> list[str]:
    errs: list[str] = []
    ph = ev.get("ph")
    if not isinstance(ev.get("name"), str):
        errs.append("'name' missing or not a string")
    if not isinstance(ph, str) or ph not in _PHASES:
        errs.append(f"'ph' {ph!r} is not a Trace Event phase")
        return errs
    if not isinstance(ev.get("pid"), int | str) or isinstance(ev.get("pid"), bool):
        errs.append("'pid' missing or not an integer/string")
    if ph != "M" and not _is_num(ev.get("ts")):
        errs.append(f"'ts' {ev.get('ts')!r} is not a finite number (microseconds)")
    if "args" in ev and not isinstance(ev["args"], dict):
        errs.append("'args' is not an object")
    if ph in ("X", "B", "E") and not isinstance(ev.get("tid"), int | str):
        errs.append(f"{ph} event needs a 'tid'")
    if ph == "X":
        dur = ev.get("dur")
        if not _is_num(dur) or dur < 0:
            errs.append(f"X event needs a non-negative 'dur', got {dur!r}")
    elif ph == "C":
        args = ev.get("args")
        if not isinstance(args, dict) or not args:
            errs.append("C event needs 'args' with at least one series")
        elif bad := [k for k, v in args.items() if not _is_num(v)]:
            errs.append(f"C event args must be numbers: {', '.join(map(repr, bad))}")
    elif ph == "M":
        name, args = ev.get("name"), ev.get("args")
        if name not in _META_NAMES:
            errs.append(f"M event name {name!r} is not one of {', '.join(sorted(_META_NAMES))}")
        elif not isinstance(args, dict) or _META_NAMES[name] not in args:
            errs.append(f"M event {name} needs args.{_META_NAMES[name]}")
        elif name.endswith("sort_index") and not isinstance(args["sort_index"], int):
            errs.append(f"M event {name}: args.sort_index must be an integer")
        elif name in _THREAD_META and not isinstance(ev.get("tid"), int | str):
            errs.append(f"M event {name} needs a 'tid'")
    if "ts_s" in ev and _is_num(ev.get("ts")) and _is_num(ev["ts_s"]):
        if not math.isclose(ev["ts_s"] * _US, ev["ts"], rel_tol=1e-9, abs_tol=1e-6):
            errs.append(f"'ts_s' {ev['ts_s']!r} s disagrees with 'ts' {ev['ts']!r} us")
    return errs


def validate_chrome(data: Any) -> list[str]:
    """Problems of ``data`` as a Trace Event Format JSON object (the rules viewers rely on); [] if none."""
    if not isinstance(data, dict):
        return [f"top level: expected an object, got {type(data).__name__}"]
    events = data.get("traceEvents")
    if not isinstance(events, list):
        return ["top level: missing 'traceEvents' list"]
    errs: list[str] = []
    if data.get("displayTimeUnit", "ms") not in ("ms", "ns"):
        errs.append(f"top level: displayTimeUnit must be 'ms' or 'ns', got {data['displayTimeUnit']!r}")
    if "otherData" in data and not isinstance(data["otherData"], dict):
        errs.append("top level: otherData must be an object")
    named: set[tuple[Any, Any]] = set()
    for i, ev in enumerate(events):
        if not isinstance(ev, dict):
            errs.append(f"traceEvents[{i}]: not an object")
            continue
        errs.extend(f"{_where(i, ev)}: {msg}" for msg in _check_event(ev))
        if ev.get("ph") == "M" and ev.get("name") == "thread_name":
            named.add((ev.get("pid"), ev.get("tid")))
    # Not a format rule, but ours: every span's thread has a name, so lanes read back.
    for i, ev in enumerate(events):
        if not isinstance(ev, dict) or ev.get("ph") != "X" or ev.get("pid") is None or ev.get("tid") is None:
            continue  # (a missing pid or tid is reported above)
        if (ev.get("pid"), ev.get("tid")) not in named:
            errs.append(f"{_where(i, ev)}: tid {ev.get('tid')!r} has no thread_name metadata")
    return errs
