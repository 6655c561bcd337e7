"""`cidl inspect`: the block table from the shipped cost model (no torch, no weights) and its bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from cidl.cli.main import app
from cidl.scheduler.costmodel import load_cost_model
from cidl.scheduler.pipeline import open_sora_workload

runner = CliRunner()


def _json(*args: str) -> dict:
    result = runner.invoke(app, ["inspect", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_json_has_per_model_params_and_per_block_rows() -> None:
    data = _json("open-sora-256")
    assert {m: d["params"] for m, d in data["models"].items()} == {
        "t5": 4_762_310_656, "stdit": 1_207_643_972, "vae_temporal": 165_265_944, "vae_2d": 49_490_199}
    # The facts file's VAE figures are the decoders alone (each decode also runs a 20-parameter post_quant_conv).
    assert data["models"]["vae_2d"]["params_by_module"]["decoder"] == 49_490_179
    assert data["models"]["vae_temporal"]["params_by_module"]["decoder"] == 165_265_944 - 20
    w = open_sora_workload(256, 68)
    assert data["workload"]["content_hash"] == w.content_hash()
    rows = [(r["stage"], r["block"], r["flops"], r["working_bytes"], r["calls"]) for r in data["blocks"]]
    assert rows == [(s.name, b.id, b.flops, b.working_bytes, s.calls) for s in w.stages for b in s.blocks]
    assert len(rows) == 26 + 30 + 9 + 9
    assert data["models"]["stdit"]["calls"] == 30 and data["models"]["vae_2d"]["calls"] == 17
    assert data["models"]["stdit"]["flops"] == 30 * sum(b.flops for b in w.stages[1].blocks)
    assert data["totals"]["flops"] == sum(s.calls * b.flops for s in w.stages for b in s.blocks)
    assert data["models"]["t5"]["dtype"] == "int8" and data["models"]["stdit"]["dtype"] == "fp32"
    cm = load_cost_model("full")
    assert data["totals"]["weight_bytes"]["fp32"] == sum(
        b.weight_bytes["fp32"] for m in cm.models.values() for b in m.blocks)


def test_knobs_change_the_stages() -> None:
    data = _json("open-sora-192", "--frames", "51", "--lpl-leap", "15", "--tdtm-steps", "4",
                 "--preset", "small")
    stages = {s["name"]: s for s in data["stages"]}
    assert stages["stdit-tdtm"]["calls"] == 4 and stages["stdit"]["calls"] == 12
    assert stages["stdit"]["shape"] == {"B": 2, "L": 300, "S": 144, "T": 15, "M": 8}
    assert data["workload"]["preset"] == "small" and data["models"]["stdit"]["blocks"] == 10
    wide = _json("open-sora-256", "--resolution", "256x448")
    assert wide["workload"]["name"] == "open-sora-256x448"
    assert wide["stages"][1]["shape"]["S"] == 16 * 28


def test_table_lists_blocks_and_totals() -> None:
    result = runner.invoke(app, ["inspect", "open-sora-256"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    out = result.stdout
    for text in ("stdit.block27", "t5.block23", "vae_2d.sdec8", "1,207,643,972", "4,762,310,656", "total",
                 "170.05 MB", "193.14 MB"):
        assert text in out, text


@pytest.mark.parametrize("args, names", [
    (["open-sora-abc"], "open-sora-abc"),
    (["open-sora-250"], "resolution=250"),
    (["open-sora-256", "--resolution", "250x256"], "resolution=250"),
    (["open-sora-256", "--resolution", "big"], "resolution='big'"),
    (["open-sora-256", "--frames", "-3"], "frames=-3"),
    (["open-sora-256", "--lpl-leap", "40"], "lpl_leap=40"),
    (["open-sora-256", "--tdtm-steps", "31"], "tdtm_steps=31"),
    (["open-sora-256", "--preset", "huge"], "'huge'"),
    (["open-sora-256", "--layers-per-block", "0"], "layers_per_block=0"),
])
def test_bad_input_is_one_line_naming_the_value(args: list[str], names: str) -> None:
    result = runner.invoke(app, ["inspect", *args])
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and names in lines[0], result.stderr
    assert result.stdout == ""


def test_inspect_imports_no_torch() -> None:
    code = ("import sys; from typer.testing import CliRunner; from cidl.cli.main import app; "
            "r = CliRunner().invoke(app, ['inspect', 'open-sora-192', '--json']); "
            "assert r.exit_code == 0, r.output; "
            "print(sorted(m for m in ('torch', 'transformers', 'diffusers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
