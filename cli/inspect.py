"""`cidl inspect WORKLOAD`: the real models' blocks -- bytes per dtype, FLOPs, working memory, calls.

Reads the shipped cost model (``scheduler/inventories/<preset>.json``, measured from the modules on the meta
device): no torch import, no weights. ``--layers-per-block K`` other than 1 measures the models afresh on meta
(imports torch; about a minute and a half for ``full``).
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Any

import typer

from cidl.cli.errors import user_errors

_RES = re.compile(r"^\s*(\d+)\s*(?:[xX]\s*(\d+))?\s*$")


def parse_resolution(text: str) -> int | tuple[int, int]:
    """``"256"`` -> 256; ``"256x448"`` -> (256, 448) (height x width, pixels)."""
    m = _RES.match(text)
    if not m:
        raise ValueError(f"resolution={text!r}: expected N or HxW pixels, e.g. 256 or 256x448")
    h = int(m.group(1))
    return h if m.group(2) is None else (h, int(m.group(2)))


def inspect_data(
    workload: str,
    *,
    resolution: str | None = None,
    frames: int = 68,
    steps: int = 30,
    lpl_leap: int | None = None,
    tdtm_steps: int = 0,
    preset: str = "full",
    layers_per_block: int = 1,
) -> dict[str, Any]:
    """What ``cidl inspect`` shows, as JSON-ready data. Raises ValueError naming a bad value."""
    from cidl.scheduler.costmodel import load_cost_model
    from cidl.scheduler.pipeline import open_sora_workload, parse_workload_name

    res: int | tuple[int, int] = parse_workload_name(workload)
    if resolution is not None:
        res = parse_resolution(resolution)
    if layers_per_block < 1:
        raise ValueError(f"layers_per_block={layers_per_block}: expected >= 1")
    if layers_per_block == 1:
        cm = load_cost_model(preset)
    else:
        from cidl.runtime.inventory import build_cost_model  # torch: measure the re-cut models on meta

        cm = build_cost_model(preset, layers_per_block=layers_per_block)
    w = open_sora_workload(res, frames, steps, lpl_leap=lpl_leap, tdtm_steps=tdtm_steps, preset=preset,
                           cost_model=cm)
    dtypes = ("fp32", "fp16", "int8")
    models: dict[str, dict[str, Any]] = {}
    for name, mc in cm.models.items():
        stages = [s for s in w.stages if s.model == name]
        loaded = stages[0].blocks[0].dtype if stages else "fp32"
        models[name] = {
            "params": mc.params,
            "params_by_module": dict(mc.params_by_module),
            "blocks": len(mc.blocks),
            "weight_bytes": {d: sum(b.weight_bytes[d] for b in mc.blocks) for d in dtypes},
            "dtype": loaded,
            "load_bytes": sum(b.weight_bytes[loaded] for b in mc.blocks),
            "calls": sum(s.calls for s in stages),
            "flops": sum(s.calls * b.flops for s in stages for b in s.blocks),
            "max_working_bytes": max((b.working_bytes for s in stages for b in s.blocks), default=0),
        }
    blocks = [
        {"stage": s.name, "block": b.id, "model": b.model, "index": b.index,
         "weight_bytes": dict(b.weight_bytes), "dtype": b.dtype, "flops": b.flops,
         "working_bytes": b.working_bytes, "calls": s.calls, "unit": b.unit}
        for s in w.stages for b in s.blocks
    ]
    return {
        "workload": {"name": w.name, "preset": w.preset, "resolution": list(w.resolution), "frames": w.frames,
                     "steps": w.steps, "lpl_leap": w.lpl_leap, "tdtm_steps": w.tdtm_steps,
                     "layers_per_block": layers_per_block, "content_hash": w.content_hash()},
        "models": models,
        "stages": [{"name": s.name, "model": s.model, "variant": s.variant, "calls": s.calls,
                    "shape": s.shape} for s in w.stages],
        "blocks": blocks,
        "totals": {
            "params": sum(m["params"] for m in models.values()),
            "weight_bytes": {d: sum(m["weight_bytes"][d] for m in models.values()) for d in dtypes},
            "load_bytes": sum(m["load_bytes"] for m in models.values()),
            "flops": sum(m["flops"] for m in models.values()),
            "max_working_bytes": max(m["max_working_bytes"] for m in models.values()),
            "persistent_bytes": w.persistent_bytes,
        },
    }


def _flops(n: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} FLOP"


def render(data: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    from cidl.device_profiles.units import format_size

    wl = data["workload"]
    h, w = wl["resolution"]
    title = (f"{wl['name']} ({h}x{w}, {wl['frames']} frames, {wl['steps']} steps, LPL {wl['lpl_leap']}, "
             f"TDTM {wl['tdtm_steps']}; preset {wl['preset']})")
    blocks = Table(title=title, title_justify="left")
    for col in ("stage", "block", "fp32", "fp16", "int8", "loaded as", "FLOPs / call", "working", "calls"):
        blocks.add_column(col, justify="left" if col in ("stage", "block", "loaded as") else "right")
    stage = None
    for r in data["blocks"]:
        if stage is not None and r["stage"] != stage:
            blocks.add_section()
        stage = r["stage"]
        wb = r["weight_bytes"]
        blocks.add_row(r["stage"], r["block"], format_size(wb["fp32"]), format_size(wb["fp16"]),
                       format_size(wb["int8"]), r["dtype"], _flops(r["flops"]),
                       format_size(r["working_bytes"]), str(r["calls"]))
    totals = Table(title="per model (weights: every block once; FLOPs: all calls)", title_justify="left")
    cols = ("model", "params", "blocks", "fp32", "fp16", "int8", "loaded", "calls", "FLOPs", "peak working")
    for col in cols:
        totals.add_column(col, justify="left" if col == "model" else "right")

    def row(name: str, m: dict[str, Any], blocks_n: str, calls: str) -> None:
        wb = m["weight_bytes"]
        totals.add_row(name, f"{m['params']:,}", blocks_n, format_size(wb["fp32"]), format_size(wb["fp16"]),
                       format_size(wb["int8"]), format_size(m["load_bytes"]), calls, _flops(m["flops"]),
                       format_size(m["max_working_bytes"]))

    for name, m in data["models"].items():
        row(name, m, str(m["blocks"]), str(m["calls"]))
    totals.add_section()
    row("total", data["totals"], str(sum(m["blocks"] for m in data["models"].values())), "")
    # Piped output is not cut to 80 columns (rich's default off a terminal); COLUMNS still wins.
    wide = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 140
    console = Console(width=wide)
    console.print(blocks)
    console.print(totals)
    persistent = format_size(data["totals"]["persistent_bytes"])
    console.print(f"persistent tensors (text, latents, video): {persistent}")
    for name, m in data["models"].items():
        parts = ", ".join(f"{k} {v:,}" for k, v in m["params_by_module"].items())
        console.print(f"[dim]{name} parameters by module: {parts}[/dim]")


def inspect(
    workload: str = typer.Argument(..., help="open-sora-<resolution>, e.g. open-sora-256."),
    json_out: bool = typer.Option(False, "--json", help="Print machine-readable JSON instead of tables."),
    resolution: str | None = typer.Option(
        None, "--resolution", help="Override the workload's resolution: N or HxW pixels, multiples of 16."),
    frames: int = typer.Option(68, "--frames", help="Video frames (68 = 4 chunks of 17)."),
    steps: int = typer.Option(30, "--steps", help="Denoising steps."),
    lpl_leap: int | None = typer.Option(
        None, "--lpl-leap", help="LPL: leap after step K (STDiT runs K+1 times)."),
    tdtm_steps: int = typer.Option(0, "--tdtm-steps", help="TDTM: merge latent frames in the first M runs."),
    preset: str = typer.Option("full", "--preset", help="Model preset: full, small or tiny."),
    layers_per_block: int = typer.Option(
        1, "--layers-per-block", help="T5 layers / STDiT block pairs per block; != 1 re-measures (torch)."),
) -> None:
    """Block table of the real models: bytes per dtype, FLOPs per call, working memory, calls."""
    with user_errors():
        data = inspect_data(workload, resolution=resolution, frames=frames, steps=steps, lpl_leap=lpl_leap,
                            tdtm_steps=tdtm_steps, preset=preset, layers_per_block=layers_per_block)
    if json_out:
        print(json.dumps(data, indent=1))
    else:
        render(data)
