"""Benchmarks: simulating the full Open-Sora 256 pipeline per policy, and `cidl simulate` end to end.

Run: ``.venv/bin/pytest bench/bench_simulate.py --benchmark-enable -s``
Each policy's benchmark also prints events simulated per second.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from cidl.device_profiles import load_profile
from cidl.scheduler import open_sora_workload, simulate

CIDL = str(Path(sys.executable).with_name("cidl"))
BUDGET = 3_300_000_000


@pytest.mark.parametrize("policy", ["sequential", "concurrent", "cidl", "optimal"])
def test_simulate_open_sora_256(benchmark, policy: str) -> None:
    workload, profile = open_sora_workload(), load_profile("iphone-15-pro")
    result = benchmark.pedantic(simulate, args=(workload, profile, policy, BUDGET), rounds=5, iterations=1)
    events = len(result.trace.events) + len(result.trace.counters)
    mean = benchmark.stats.stats.mean if benchmark.stats else float("nan")
    print(f"\n{policy}: {result.latency_s:,.1f} simulated s, {events:,} trace records, "
          f"{mean * 1e3:.0f} ms per simulation, {events / mean:,.0f} records/s")
    assert result.peak_bytes <= BUDGET


def test_cli_simulate_end_to_end(benchmark) -> None:
    """`cidl simulate` with no options: process start, four policies, traces and Gantt PNGs written."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "COLUMNS": "150"}
        benchmark.pedantic(subprocess.run, args=([CIDL, "simulate", "--out", tmp],),
                           kwargs={"capture_output": True, "check": True, "env": env}, rounds=3, iterations=1)
        assert len(list(Path(tmp).glob("gantt-*.png"))) == 4
