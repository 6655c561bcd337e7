"""Traces: Chrome JSON round trip, the Trace Event Format validator, the golden file, Gantt plots, compare."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from cidl.traces import (
    CounterSample,
    Trace,
    TraceEvent,
    TraceFormatError,
    TraceMeta,
    compare_traces,
    from_chrome,
    lane_order,
    read_trace,
    render_comparison,
    to_chrome,
    trace_schema,
    validate_chrome,
    write_trace,
)
from cidl.traces.gantt import merge_bars, model_of, plot_gantt
from cidl.traces.io import SCHEMA_PATH

GOLDEN = Path(__file__).parent / "golden" / "chrome_tiny.json"


def _ev(name: str, cat: str, lane: str, ts: float, dur: float, block: str | None = None,
        stage: str | None = None, call: int | None = None, nbytes: int = 0) -> TraceEvent:
    return TraceEvent(name=name, cat=cat, lane=lane, ts=ts, dur=dur, block=block, stage=stage,  # type: ignore[arg-type]
                      call=call, bytes=nbytes)


def _c(name: str, ts: float, value: int) -> CounterSample:
    return CounterSample(name=name, ts=ts, value=value)  # type: ignore[arg-type]


def tiny_trace() -> Trace:
    """Two loaders, gpu, ane, main; times exact in binary so the golden file is readable."""
    meta = TraceMeta(trace_id="tiny", source="simulated", policy="cidl", budget_bytes=1000,
                     profile={"name": "p", "x": [1, 2.5]}, workload={"name": "w"},
                     schedule_hashes=["ab", "cd"],
                     latency_s=1.75, lower_bound_s=1.25, extra={"note": "hand-made"})
    events = [
        _ev("plan (start)", "plan", "main", 0.0, 0.0, stage="t5", call=0),
        _ev("load t5.block00", "load", "loader-0", 0.0, 0.5, "t5.block00", "t5", 0, 400),
        _ev("load stdit.block00", "load", "loader-1", 0.25, 0.75, "stdit.block00", "stdit", 0, 300),
        _ev("t5.block00", "exec", "gpu", 0.5, 0.25, "t5.block00", "t5", 0),
        _ev("evict t5.block00", "evict", "main", 0.75, 0.0, "t5.block00", nbytes=400),
        _ev("stdit.block00", "exec", "ane", 1.0, 0.5, "stdit.block00", "stdit", 0),
        _ev("stdit.block00", "exec", "gpu", 1.0, 0.75, "stdit.block00", "stdit", 1),
    ]
    counters = [_c("budget", 0.0, 1000), _c("inflight", 0.0, 400), _c("total", 0.0, 400),
                _c("resident", 0.5, 400), _c("total", 0.5, 700), _c("total", 1.75, 0)]
    return Trace(meta=meta, events=events, counters=counters)


def awkward_trace() -> Trace:
    """Times that do not survive seconds -> microseconds -> seconds in floating point."""
    ts = [0.1 + 0.2, 1 / 3, 1e-7, 93.8595867742349, 547.9963094662489, 229.60503127702393]
    assert sum(t * 1e6 / 1e6 != t for t in ts) == 3
    events = [_ev(f"e{i}", "exec", "cpu", t, t / 7, f"m.b{i}", "s", i) for i, t in enumerate(ts)]
    return Trace(meta=TraceMeta(trace_id="awk", source="host"), events=events,
                 counters=[_c("rss", t, -5 + i) for i, t in enumerate(ts)])


# --- Chrome JSON ----------------------------------------------------------------------------------------


def test_round_trip_exact_in_memory_and_on_disk(tmp_path: Path) -> None:
    for trace in (tiny_trace(), awkward_trace(), Trace(meta=TraceMeta(trace_id="empty", source="device"))):
        assert from_chrome(to_chrome(trace)) == trace
        path = write_trace(trace, tmp_path / f"{trace.meta.trace_id}.json")
        assert read_trace(path) == trace
        assert validate_chrome(json.loads(path.read_text())) == []
    assert sorted(f.name for f in tmp_path.iterdir()) == ["awk.json", "empty.json", "tiny.json"]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1e6), st.floats(0, 1e4), st.integers(-2**62, 2**62)), max_size=8))
def test_round_trip_exact_for_any_floats(rows: list[tuple[float, float, int]]) -> None:
    trace = Trace(meta=TraceMeta(trace_id="h", source="simulated", latency_s=rows[0][0] if rows else None),
                  events=[_ev("x", "load", "loader-3", t, d, nbytes=abs(v)) for t, d, v in rows],
                  counters=[_c("working", t, v) for t, _, v in rows])
    assert from_chrome(json.loads(json.dumps(to_chrome(trace)))) == trace


def test_to_chrome_layout() -> None:
    d = to_chrome(tiny_trace())
    assert d["displayTimeUnit"] == "ms"
    assert d["otherData"]["cidl"]["meta"]["trace_id"] == "tiny"
    evs = d["traceEvents"]
    names = {e["args"]["name"]: e["tid"] for e in evs if e["ph"] == "M" and e["name"] == "thread_name"}
    assert names == {"loader-0": 1, "loader-1": 2, "gpu": 3, "ane": 4, "main": 5}
    sort = {e["tid"]: e["args"]["sort_index"] for e in evs if e["name"] == "thread_sort_index"}
    assert sort == {1: 1, 2: 2, 3: 3, 4: 4, 5: 5}
    load = next(e for e in evs if e["name"] == "load stdit.block00")
    pinned = (load["ph"], load["cat"], load["tid"], load["ts"], load["dur"])
    assert pinned == ("X", "load", 2, 250000.0, 750000.0)
    assert load["args"] == {"block": "stdit.block00", "stage": "stdit", "call": 0, "bytes": 300}
    counters = [e for e in evs if e["ph"] == "C"]
    assert [(e["name"], e["ts"], e["args"]) for e in counters[:2]] == [
        ("memory.budget", 0.0, {"bytes": 1000}), ("memory.inflight", 0.0, {"bytes": 400})]
    assert len({e["pid"] for e in evs}) == 1


def test_to_chrome_does_not_mutate_and_is_pure() -> None:
    trace = tiny_trace()
    assert to_chrome(trace) == to_chrome(trace)
    assert trace == tiny_trace()


def test_lane_order() -> None:
    assert lane_order(["main", "cpu", "loader-10", "gpu", "zz", "loader-2", "ane", "aa"]) == [
        "loader-2", "loader-10", "gpu", "ane", "cpu", "main", "aa", "zz"]


def test_golden_file_pins_ph_ts_dur_pid_tid() -> None:
    pinned = [{k: e[k] for k in ("ph", "name", "pid", "tid", "ts", "dur") if k in e}
              for e in to_chrome(tiny_trace())["traceEvents"]]
    if os.environ.get("CIDL_UPDATE_GOLDEN"):
        GOLDEN.write_text("[\n" + ",\n".join(json.dumps(e) for e in pinned) + "\n]\n")
    assert pinned == json.loads(GOLDEN.read_text())


# --- the validator --------------------------------------------------------------------------------------


def _with(event: dict[str, Any]) -> list[str]:
    d = to_chrome(tiny_trace())
    d["traceEvents"].append(event)
    return validate_chrome(d)


X = {"name": "x", "cat": "exec", "ph": "X", "pid": 1, "tid": 3, "ts": 1.0, "dur": 2.0}


@pytest.mark.parametrize(("event", "expected"), [
    ({**X, "dur": -1.0}, "non-negative 'dur'"),
    ({k: v for k, v in X.items() if k != "dur"}, "non-negative 'dur'"),
    ({k: v for k, v in X.items() if k != "ts"}, "'ts' None is not a finite number"),
    ({**X, "ts": "1"}, "'ts' '1' is not a finite number"),
    ({k: v for k, v in X.items() if k != "tid"}, "X event needs a 'tid'"),
    ({k: v for k, v in X.items() if k != "pid"}, "'pid' missing"),
    ({k: v for k, v in X.items() if k != "name"}, "'name' missing"),
    ({**X, "ph": "Q"}, "'ph' 'Q' is not a Trace Event phase"),
    ({**X, "tid": 99}, "tid 99 has no thread_name metadata"),
    ({**X, "args": [1]}, "'args' is not an object"),
    ({**X, "ts_s": 5.0}, "disagrees with 'ts'"),
    ({"name": "memory.total", "ph": "C", "pid": 1, "ts": 0, "args": {"bytes": "7"}}, "args must be numbers"),
    ({"name": "memory.total", "ph": "C", "pid": 1, "ts": 0}, "C event needs 'args'"),
    ({"name": "thread_title", "ph": "M", "pid": 1, "tid": 1, "args": {"name": "a"}}, "is not one of"),
    ({"name": "thread_name", "ph": "M", "pid": 1, "tid": 1, "args": {}}, "needs args.name"),
    ({"name": "thread_sort_index", "ph": "M", "pid": 1, "tid": 1, "args": {"sort_index": "1"}}, "integer"),
])
def test_validator_catches_broken_events(event: dict[str, Any], expected: str) -> None:
    errs = _with(event)
    assert len(errs) == 1 and expected in errs[0], errs
    assert errs[0].startswith("traceEvents[")


def test_validator_top_level() -> None:
    assert validate_chrome([]) == ["top level: expected an object, got list"]
    assert validate_chrome({"events": []}) == ["top level: missing 'traceEvents' list"]
    errs = validate_chrome({"traceEvents": [], "displayTimeUnit": "s"})
    assert errs == ["top level: displayTimeUnit must be 'ms' or 'ns', got 's'"]
    assert validate_chrome({"traceEvents": [3]}) == ["traceEvents[0]: not an object"]


# --- reading errors: one line naming the file -----------------------------------------------------------


def _read_error(tmp_path: Path, content: str | dict[str, Any]) -> str:
    path = tmp_path / "t.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(TraceFormatError) as info:
        read_trace(path)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{path}: ")
    return msg.removeprefix(f"{path}: ")


def test_read_errors(tmp_path: Path) -> None:
    good = to_chrome(tiny_trace())
    broken = '{"traceEvents": [\n  {"ph": "X",}\n]}'
    assert _read_error(tmp_path, broken).startswith("not JSON (line 2 column 14: ")
    assert _read_error(tmp_path, {"events": []}) == "missing 'traceEvents' list: not a Chrome trace"
    assert _read_error(tmp_path, {"traceEvents": []}).startswith("not a cidl trace")
    bad_version = json.loads(json.dumps(good))
    bad_version["otherData"]["cidl"]["schema_version"] = 7
    assert "schema_version: expected 1, got 7" in _read_error(tmp_path, bad_version)
    bad_meta = json.loads(json.dumps(good))
    bad_meta["otherData"]["cidl"]["meta"]["source"] = "phone"
    assert _read_error(tmp_path, bad_meta).startswith("otherData.cidl.meta: field source: Input should be")
    bad_cat = json.loads(json.dumps(good))
    i = next(i for i, e in enumerate(bad_cat["traceEvents"]) if e["ph"] == "X")
    bad_cat["traceEvents"][i]["cat"] = "compute"
    assert _read_error(tmp_path, bad_cat) == (f"traceEvents[{i}] (X 'plan (start)'): field cat: "
                                              "Input should be 'load', 'exec', 'evict', 'wait' or 'plan'")
    bad_dur = json.loads(json.dumps(good))
    bad_dur["traceEvents"][i]["dur_s"] = -1.0
    assert "field dur: Input should be greater than or equal to 0" in _read_error(tmp_path, bad_dur)
    with pytest.raises(FileNotFoundError, match=r"nope\.json: no such trace file"):
        read_trace(tmp_path / "nope.json")


def test_reads_hand_written_trace_without_exact_seconds() -> None:
    d = to_chrome(tiny_trace())
    for e in d["traceEvents"]:
        e.pop("ts_s", None)
        e.pop("dur_s", None)
    back = from_chrome(d)
    assert [(e.ts, e.dur) for e in back.events] == [(e.ts, e.dur) for e in tiny_trace().events]


def test_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_trace(tiny_trace(), tmp_path / "sub" / "t.json")
    before = path.read_text()

    def boom(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_trace(awkward_trace(), path)
    assert path.read_text() == before
    assert [f.name for f in path.parent.iterdir()] == ["t.json"]


def test_write_refuses_non_finite(tmp_path: Path) -> None:
    trace = Trace(meta=TraceMeta(trace_id="inf", source="host"),
                  events=[_ev("x", "exec", "gpu", float("inf"), 0)])
    with pytest.raises(TraceFormatError, match="non-finite"):
        write_trace(trace, tmp_path / "t.json")
    assert not list(tmp_path.iterdir())


def test_trace_schema_file_is_up_to_date() -> None:
    # Regenerate with: python -c "from cidl.traces import write_trace_schema; write_trace_schema()"
    assert json.loads(SCHEMA_PATH.read_text()) == trace_schema()


def test_import_is_light() -> None:
    code = ("import sys, cidl.traces; "
            "print(sorted(m for m in ('matplotlib', 'rich', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --- Gantt -----------------------------------------------------------------------------------------------


def synthetic_trace(steps: int = 30) -> Trace:
    """A CI-DL-like run: T5, STDiT on two queues, the two VAE decoders; two loaders; ~4,000 events."""
    events: list[TraceEvent] = []
    counters = [_c("budget", 0.0, 3_300_000_000)]
    t = 0.0
    resident = 0
    for model, stage, n, calls, load_s, exec_s, size, queues in (
            ("t5", "t5", 24, 1, 5.7, 1.1, 193_000_000, ("gpu",)),
            ("stdit", "stdit", 28, steps, 0.3, 0.9, 170_000_000, ("gpu", "ane")),
            ("vae_temporal", "vae-temporal", 9, 4, 0.1, 0.5, 20_000_000, ("gpu",)),
            ("vae_2d", "vae-2d", 9, 17, 0.05, 0.2, 6_000_000, ("gpu",))):
        for c in range(calls):
            for i in range(n):
                b = f"{model}.block{i:02d}"
                events.append(_ev(f"load {b}", "load", f"loader-{i % 2}", t, load_s, b, stage, c, size))
                resident += size
                counters += [_c("resident", t + load_s, resident), _c("total", t + load_s, resident)]
                start = t + load_s
                events += [_ev(b, "exec", q, start, exec_s, b, stage, c) for q in queues]
                events.append(_ev(f"evict {b}", "evict", "main", start + exec_s, 0.0, b, nbytes=size))
                resident -= size
                counters += [_c("resident", start + exec_s, resident), _c("total", start + exec_s, resident)]
                t = start + exec_s - load_s * 0.8
        if model == "stdit":
            counters.append(_c("budget", t, 2_500_000_000))
            events.append(_ev("absorb budget drop", "wait", "main", t, 1.0))
    meta = TraceMeta(trace_id="synthetic", source="simulated", policy="cidl", latency_s=t,
                     lower_bound_s=t * 0.8)
    return Trace(meta=meta, events=events, counters=counters)


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_gantt_of_4000_events(tmp_path: Path) -> None:
    trace = synthetic_trace()
    assert len(trace.events) >= 4000
    path = plot_gantt(trace, tmp_path / "g.png", title="synthetic")
    width, height = _png_size(path)
    assert width == 14 * 110 and 600 < height < 1200
    assert 20_000 < path.stat().st_size < 2_000_000
    assert [f.name for f in tmp_path.iterdir()] == ["g.png"]


def test_gantt_of_empty_and_tiny_traces(tmp_path: Path) -> None:
    empty = Trace(meta=TraceMeta(trace_id="e", source="host"))
    assert _png_size(plot_gantt(empty, tmp_path / "e.png"))[0] == 1540
    assert plot_gantt(tiny_trace(), tmp_path / "t.png", budget_bytes=900).stat().st_size > 10_000


def test_merge_bars_and_model_of() -> None:
    assert merge_bars([(5.0, 1.0), (0.0, 1.0), (1.05, 1.0), (2.5, 0.1)], gap=0.1) == [
        (0.0, 2.05), (2.5, 0.1), (5.0, 1.0)]
    assert merge_bars([(0.0, 3.0), (1.0, 1.0)], gap=0.0) == [(0.0, 3.0)]
    assert model_of(_ev("x", "exec", "gpu", 0, 1, "stdit.block03")) == "stdit"
    assert model_of(_ev("load vae_2d.piece1", "load", "loader-0", 0, 1)) == "vae_2d"


# --- compare -----------------------------------------------------------------------------------------------


def pair() -> tuple[Trace, Trace]:
    a = Trace(meta=TraceMeta(trace_id="a", source="simulated", policy="cidl", latency_s=10.0), events=[
        _ev("load t5.b0", "load", "loader-0", 0, 2, "t5.b0", "t5"),
        _ev("load t5.b1", "load", "loader-0", 2, 2, "t5.b1", "t5"),
        _ev("t5.b0", "exec", "gpu", 2, 1, "t5.b0", "t5", 0),
        _ev("t5.b1", "exec", "gpu", 4, 1, "t5.b1", "t5", 0),
        _ev("load stdit.b0", "load", "loader-0", 5, 1, "stdit.b0", "stdit"),
        _ev("stdit.b0", "exec", "gpu", 6, 2, "stdit.b0", "stdit", 0),
        _ev("stdit.b0", "exec", "gpu", 8, 2, "stdit.b0", "stdit", 1),
        _ev("evict stdit.b0", "evict", "main", 10, 0, "stdit.b0"),
    ], counters=[_c("total", 0, 0), _c("total", 1, 100), _c("total", 3, 300), _c("total", 10, 50)])
    b = Trace(meta=TraceMeta(trace_id="b", source="host", policy="cidl", latency_s=7.0), events=[
        _ev("load t5.b0", "load", "loader-0", 0, 2, "t5.b0", "t5"),
        _ev("load t5.b1", "load", "loader-0", 2, 2, "t5.b1", "t5"),
        _ev("load stdit.b0", "load", "loader-1", 3, 1, "stdit.b0", "stdit"),
        _ev("t5.b0", "exec", "gpu", 2, 1, "t5.b0", "t5", 0),
        _ev("t5.b1", "exec", "gpu", 4, 1, "t5.b1", "t5", 0),
        _ev("stdit.b0", "exec", "ane", 5, 1, "stdit.b0", "stdit", 0),
        _ev("stdit.b0", "exec", "ane", 6, 1, "stdit.b0", "stdit", 1),
    ], counters=[_c("total", 0, 0), _c("total", 2, 400), _c("total", 7, 0)])
    return a, b


def test_compare_known_values() -> None:
    cmp = compare_traces(*pair())
    got = {m.name: (m.a, m.b, m.rel_error) for m in (*cmp.stages, *cmp.lanes, *cmp.overall)}
    expected = {
        "stage t5": (5.0, 5.0, 0.0),
        "stage stdit": (5.0, 4.0, -0.2),
        "busy loader-0": (5.0, 4.0, -0.2),
        "busy loader-1": (None, 1.0, None),
        "busy gpu": (6.0, 2.0, 2 / 6 - 1),
        "busy ane": (None, 2.0, None),
        "latency": (10.0, 7.0, -0.3),
        "makespan": (10.0, 7.0, -0.3),
        "overlap": (1 / 6, 1 / 4, 0.5),
        "peak accounted bytes": (300.0, 400.0, 1 / 3),
    }
    assert got.keys() == expected.keys()
    for name, (a, b, rel) in expected.items():
        assert got[name][:2] == pytest.approx((a, b)), name
        if rel is None:
            assert got[name][2] is None, name
        else:
            assert got[name][2] == pytest.approx(rel), name
    assert [m.name for m in cmp.lanes] == ["busy loader-0", "busy loader-1", "busy gpu", "busy ane"]
    assert cmp.a == "simulated cidl a" and cmp.b == "host cidl b"


def test_compare_without_execs_or_counters() -> None:
    empty = Trace(meta=TraceMeta(trace_id="e", source="host"))
    cmp = compare_traces(empty, pair()[0])
    assert cmp.metric("overlap").a is None and cmp.metric("peak accounted bytes").a is None
    assert cmp.metric("makespan").rel_error is None  # 0 -> 10: no relative error
    assert compare_traces(empty, empty).metric("makespan").rel_error == 0.0


def test_render_comparison_table() -> None:
    from rich.console import Console

    console = Console(width=120, record=True)
    console.print(render_comparison(compare_traces(*pair())))
    text = console.export_text()
    assert "stage stdit" in text and "-20.0%" in text and "+50.0%" in text and "300 B" in text


def test_cli_compare(tmp_path: Path) -> None:
    from cidl.cli.main import app

    a, b = pair()
    pa, pb = write_trace(a, tmp_path / "a.json"), write_trace(b, tmp_path / "b.json")
    runner = CliRunner()
    res = runner.invoke(app, ["compare", str(pa), str(pb), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert {m["name"]: m["b"] for m in data["overall"]}["makespan"] == 7.0
    res = runner.invoke(app, ["compare", str(pa), str(pb)])
    assert res.exit_code == 0 and "busy loader-1" in res.stdout
    res = runner.invoke(app, ["compare", str(pa), str(tmp_path / "missing.json")])
    assert res.exit_code == 2
    assert res.stderr.strip() == f"cidl: error: {tmp_path / 'missing.json'}: no such trace file"
