"""Benchmarks: `cidl inspect` end to end, and building the cost model and the workload.

Run: ``.venv/bin/pytest bench/bench_inspect.py --benchmark-enable``
(``build_cost_model("full")`` is left out: it is what ``python -m cidl.runtime.inventory`` times, ~1.5 min.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from cidl.scheduler.costmodel import load_cost_model
from cidl.scheduler.pipeline import open_sora_workload

CIDL = str(Path(sys.executable).with_name("cidl"))
ENV = {**os.environ, "COLUMNS": "200"}  # a table row per block, not wrapped


def test_cli_inspect_open_sora_256(benchmark) -> None:
    """The whole command, process start included: the shipped cost model, no torch."""
    out = benchmark.pedantic(subprocess.run, args=([CIDL, "inspect", "open-sora-256"],),
                             kwargs={"capture_output": True, "check": True, "env": ENV},
                             rounds=5, iterations=1)
    assert b"stdit.block27" in out.stdout


def test_cli_inspect_json(benchmark) -> None:
    out = benchmark.pedantic(subprocess.run, args=([CIDL, "inspect", "open-sora-256", "--json"],),
                             kwargs={"capture_output": True, "check": True, "env": ENV},
                             rounds=5, iterations=1)
    assert out.stdout.startswith(b"{")


def test_load_shipped_cost_model_full(benchmark) -> None:
    def load() -> object:
        load_cost_model.cache_clear()
        return load_cost_model("full")

    assert benchmark(load).preset == "full"


def test_open_sora_workload(benchmark) -> None:
    """Workload from the (cached) shipped cost model: evaluating every block's polynomials."""
    w = benchmark(open_sora_workload, 256, 68, lpl_leap=15, tdtm_steps=5)
    assert w.total_calls() == 1 + 16 + 4 + 17


def test_build_cost_model_tiny(benchmark) -> None:
    """Measuring every tiny block on meta at ~70 shapes and fitting them exactly."""
    from cidl.runtime.inventory import build_cost_model

    cm = benchmark.pedantic(build_cost_model, args=("tiny",), rounds=1, iterations=1)
    assert cm.verified_shapes > 0
