"""`cidl simulate`, the main job: every policy on a device profile under a budget; table, traces, Gantt."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import typer

from cidl.cli.errors import CliError, user_errors

ALL_POLICIES = ("sequential", "concurrent", "cidl", "optimal")


def parse_budget_drop(text: str) -> tuple[float, int]:
    """``AT:SIZE`` -> (seconds, bytes), e.g. ``300:2GB``."""
    from cidl.device_profiles import parse_size

    at, sep, size = text.partition(":")
    try:
        seconds = float(at.rstrip("s"))
    except ValueError:
        seconds = -1.0
    if not sep or seconds < 0:
        raise CliError(f"--budget-drop {text!r}: expected AT:SIZE with AT seconds >= 0, e.g. 300:2GB")
    return seconds, parse_size(size)


def simulate(
    profile: str = typer.Option("iphone-15-pro", "--profile", help="A shipped profile name or a JSON file."),
    workload: str = typer.Option("open-sora-256", "--workload", help="open-sora-<resolution>."),
    resolution: int | None = typer.Option(None, "--resolution", help="Square resolution (a multiple of 16)."),
    frames: int = typer.Option(68, "--frames", help="Video frames."),
    steps: int = typer.Option(30, "--steps", help="Denoising steps."),
    lpl_leap: int | None = typer.Option(None, "--lpl-leap", help="LPL: leap after step K (K+1 STDiT runs)."),
    tdtm_steps: int = typer.Option(0, "--tdtm-steps", help="TDTM: merge latent frames in the first M calls."),
    preset: str = typer.Option("full", "--preset", help="Model preset of the cost model: full, small, tiny."),
    policy: list[str] = typer.Option(list(ALL_POLICIES), "--policy", help="Policy (repeatable); all."),
    units: str | None = typer.Option(None, "--units", help="Compute queues to use, e.g. gpu,ane."),
    loader_threads: int | None = typer.Option(None, "--loader-threads", min=1, help="Loader threads."),
    prefetch_depth: int | None = typer.Option(None, "--prefetch-depth", min=1, help="Blocks loaded ahead."),
    budget: str | None = typer.Option(
        None, "--budget", help="3.3GB, 3300MB, 3.3GiB or bytes (default: the app budget)."),
    budget_drop: list[str] = typer.Option([], "--budget-drop", help="AT:SIZE memory pressure (repeatable)."),
    out: Path = typer.Option(Path("cidl-out"), "--out", help="Directory for traces and Gantt plots."),
    json_out: bool = typer.Option(False, "--json", help="Machine-readable summary on stdout."),
    no_plots: bool = typer.Option(False, "--no-plots", help="Skip the Gantt PNGs."),
) -> None:
    """Simulate the pipeline on a device profile: latency per model, lower bound, peak memory, per policy."""
    from cidl.device_profiles import format_size, load_profile, parse_size
    from cidl.scheduler import make_options, open_sora_workload
    from cidl.scheduler.pipeline import parse_workload_name
    from cidl.scheduler.policies.base import parse_policy_name
    from cidl.scheduler.report import summarize
    from cidl.scheduler.sim import simulate as run_sim

    with user_errors():
        prof = load_profile(profile)
        res = resolution if resolution is not None else parse_workload_name(workload)
        w = open_sora_workload(res, frames, steps, lpl_leap=lpl_leap, tdtm_steps=tdtm_steps, preset=preset)
        budget_bytes = parse_size(budget) if budget is not None else prof.memory.app_budget_bytes
        if budget_bytes <= 0:
            raise CliError(f"--budget {budget!r}: expected a positive size, e.g. 3.3GB")
        drops = sorted(parse_budget_drop(d) for d in budget_drop)
        unit_list = [u.strip() for u in units.split(",")] if units else None
        for u in unit_list or []:
            if u not in prof.units:
                have = ", ".join(prof.units)
                raise CliError(f"--units: profile {prof.name} has no unit {u!r} (it has {have})")
        names = [parse_policy_name(p).value for p in dict.fromkeys(policy)]
        results = []
        for name in names:
            opts = make_options(name, loader_threads=loader_threads, prefetch_depth=prefetch_depth,
                                units=unit_list)  # type: ignore[arg-type]
            results.append(run_sim(w, prof, name, budget_bytes, options=opts, budget_drops=drops,
                                   trace_id=f"sim-{name}-{w.content_hash()[:8]}"))
    summaries = [summarize(w, r) for r in results]
    _write_outputs(results, out, plots=not no_plots)

    if json_out:
        print(json.dumps({
            "workload": w.name, "profile": prof.name, "budget_bytes": budget_bytes, "frames": frames,
            "steps": steps, "lpl_leap": lpl_leap, "tdtm_steps": tdtm_steps, "out": str(out),
            "policies": {s.policy: s.model_dump(mode="json") for s in summaries},
        }, indent=2))
    else:
        _print_table(w.name, prof.name, budget_bytes, summaries, out, format_size)
    if any(s.error for s in summaries):
        for s in summaries:
            if s.error:
                print(f"cidl: error: {s.policy}: {s.error} (trace so far in {out})", file=sys.stderr)
        raise typer.Exit(1)


def _write_outputs(results: list, out: Path, *, plots: bool) -> None:
    from cidl.traces import plot_gantt, write_trace

    out.mkdir(parents=True, exist_ok=True)
    for r in results:
        write_trace(r.trace, out / f"trace-{r.policy}.json")
        if plots:
            plot_gantt(r.trace, out / f"gantt-{r.policy}.png", budget_bytes=r.budget_bytes)


def _print_table(workload: str, profile: str, budget: int, summaries: list, out: Path, fmt) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{workload} on {profile}, budget {fmt(budget)}", title_justify="left")
    for col in ("policy", "T5 s", "STDiT s", "VAE s", "total s", "lower bound s", "vs bound", "peak bytes"):
        table.add_column(col, justify="left" if col == "policy" else "right")
    for s in summaries:
        total = f"{s.total_s:,.1f}" + (" (ended early)" if s.error else "")
        per_model = [f"{s.model_s[m]:,.1f}" for m in ("t5", "stdit", "vae")]
        table.add_row(s.policy, *per_model, total, f"{s.lower_bound_s:,.1f}", f"{s.vs_lower_bound:.2f}x",
                      fmt(s.peak_bytes))
    # Piped output is not cut to 80 columns (rich's default off a terminal); COLUMNS still wins.
    console = Console(width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 120)
    console.print(table)
    console.print(f"[dim]traces and Gantt plots in {out}/ (open trace-*.json in ui.perfetto.dev)[/dim]")
