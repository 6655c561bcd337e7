"""`cidl simulate`: the main job's numbers, its outputs, and one-line errors that write nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cidl.cli.main import app
from cidl.traces import read_trace, validate_chrome

runner = CliRunner()
BUDGET = 3_300_000_000


@pytest.fixture(scope="module")
def default_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("sim")
    result = runner.invoke(app, ["simulate", "--json", "--no-plots", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), out


def test_default_run_reproduces_the_paper_on_the_iphone_15_pro(default_run: tuple[dict, Path]) -> None:
    data, _ = default_run
    p = data["policies"]
    assert list(p) == ["sequential", "concurrent", "cidl", "optimal"]
    assert p["sequential"]["model_s"]["stdit"] == pytest.approx(1000, rel=0.05)
    assert p["concurrent"]["model_s"]["stdit"] == pytest.approx(750, rel=0.05)
    assert 5 <= p["concurrent"]["model_s"]["stdit"] - p["cidl"]["model_s"]["stdit"] <= 40
    assert p["sequential"]["model_s"]["t5"] == pytest.approx(164, rel=0.05)
    assert p["concurrent"]["model_s"]["t5"] == pytest.approx(137, rel=0.05)
    for s in p.values():
        assert s["peak_bytes"] <= BUDGET
        assert s["total_s"] >= s["lower_bound_s"] > 0
        assert sum(s["stage_s"].values()) == pytest.approx(s["total_s"], rel=1e-9)
    assert p["optimal"]["total_s"] <= p["cidl"]["total_s"]


def test_default_run_writes_a_valid_trace_per_policy(default_run: tuple[dict, Path]) -> None:
    data, out = default_run
    for policy, summary in data["policies"].items():
        path = out / f"trace-{policy}.json"
        validate = validate_chrome(json.loads(path.read_text()))
        assert validate == []
        trace = read_trace(path)
        assert trace.meta.policy == policy and trace.meta.source == "simulated"
        assert trace.meta.schedule_hashes == summary["schedule_hashes"]
        assert trace.peak("total") == summary["peak_bytes"]


def test_plots_are_written_for_each_policy(tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        [
            "simulate",
            "--preset",
            "tiny",
            "--resolution",
            "64",
            "--frames",
            "17",
            "--steps",
            "3",
            "--budget",
            "2GB",
            "--policy",
            "cidl",
            "--out",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 0, result.output
    png = tmp_path / "gantt-cidl.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gantt-cidl.png", "trace-cidl.json"]


def test_lpl_and_tdtm_change_the_stdit_work(tmp_path: Path) -> None:
    def stdit(*args: str) -> float:
        r = runner.invoke(
            app, ["simulate", "--json", "--no-plots", "--policy", "sequential", "--out", str(tmp_path), *args]
        )
        assert r.exit_code == 0, r.output
        return json.loads(r.stdout)["policies"]["sequential"]["model_s"]["stdit"]

    full, leap, merged = stdit(), stdit("--lpl-leap", "14"), stdit("--tdtm-steps", "10")
    assert leap == pytest.approx(full * 15 / 30, rel=0.02)  # sequential: every step reloads and recomputes
    assert merged < full


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--profile", "no-such-phone"], "no-such-phone"),
        (["--budget", "-1GB"], "-1GB"),
        (["--budget", "lots"], "lots"),
        (["--budget", "10MB"], "bytes"),
        (["--resolution", "250"], "resolution=250"),
        (["--frames", "-3"], "frames=-3"),
        (["--policy", "greedy"], "greedy"),
        (["--budget-drop", "soon:1GB"], "soon:1GB"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path: Path, args: list[str], needle: str) -> None:
    out = tmp_path / "out"
    result = runner.invoke(app, ["simulate", "--out", str(out), *args])
    assert result.exit_code != 0
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("cidl: error:") and needle in lines[0], result.stderr
    assert not out.exists()


def test_malformed_profile_file_names_the_file_and_field(tmp_path: Path) -> None:
    from cidl.device_profiles import load_profile

    data = load_profile("iphone-15-pro").model_dump(mode="json")
    data["contention"]["load_slowdown"] = 0.5
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    result = runner.invoke(app, ["simulate", "--profile", str(bad), "--out", str(tmp_path / "out")])
    assert result.exit_code != 0
    assert "bad.json" in result.stderr and "contention.load_slowdown" in result.stderr
    assert not (tmp_path / "out").exists()
