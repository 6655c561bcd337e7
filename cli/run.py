"""`cidl run PRESET`: the whole pipeline from the block store on real threads under a hard budget."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

import typer

from cidl.cli.choices import DType, Preset
from cidl.cli.errors import CliError, user_errors
from cidl.scheduler.policies.base import PolicyName


class ModeName(StrEnum):
    real = "real"
    emulate = "emulate"


_PROFILE_HELP = ("emulate: the device to emulate (shipped name or JSON file); real: the profile to plan with "
                 "[default: this host's].")
_DROP_HELP = "Budget change AT:SIZE, AT = seconds or STAGE@CALL (2.5s:1GB, stdit@2:1GB); repeatable."


def run(
    preset: Preset = typer.Argument(..., help="Model preset: tiny, small or full."),
    store: Path | None = typer.Option(
        None, "--store", help="Block store [default: cidl-store/PRESET-DTYPE, prepared on first use]."),
    policy: PolicyName = typer.Option(PolicyName.CIDL, "--policy", help="Scheduling policy."),
    budget: str = typer.Option("3.3GB", "--budget", help="Memory budget (GB = 10^9, GiB = 2^30)."),
    mode: ModeName = typer.Option(ModeName.real, "--mode", help="real: host speed; emulate: as --profile."),
    profile: str | None = typer.Option(None, "--profile", help=_PROFILE_HELP),
    host_profile: Path | None = typer.Option(
        None, "--host-profile", help="This host's profile (`cidl profile host`) [default: measure, quick]."),
    cold: bool = typer.Option(False, "--cold", help="Drop each block file from the page cache first."),
    resolution: int | None = typer.Option(None, "--resolution", help="Video height = width in pixels."),
    frames: int | None = typer.Option(None, "--frames", help="Video frames."),
    steps: int | None = typer.Option(None, "--steps", help="Denoising steps."),
    lpl_leap: int | None = typer.Option(None, "--lpl-leap", help="LPL: leap after step K."),
    tdtm_steps: int = typer.Option(0, "--tdtm-steps", help="TDTM: merge tokens in the first M steps."),
    loader_threads: int | None = typer.Option(None, "--loader-threads", help="Loader threads [policy's]."),
    budget_drop: list[str] = typer.Option([], "--budget-drop", help=_DROP_HELP),
    ladder: bool = typer.Option(False, "--ladder", help="Follow Schedules precomputed for budget rungs."),
    time_scale: str = typer.Option(
        "auto", "--time-scale", help="emulate: wall seconds per device second, or auto."),
    dtype: DType = typer.Option(DType.fp32, "--dtype", help="Store format when preparing one."),
    seed: int = typer.Option(0, "--seed", help="Seed of prompt tokens, noise and (new) store weights."),
    out: Path = typer.Option(Path("cidl-out/run"), "--out", help="Output directory."),
) -> None:
    """Run T5 -> STDiT denoising -> VAE decode; write trace.json, gantt.png, latents and PNG frames."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from cidl.device_profiles import load_profile
    from cidl.device_profiles.units import format_size
    from cidl.runtime.executor import ExecutorError
    from cidl.runtime.run import parse_budget_drop, run_pipeline

    console = Console(stderr=True)
    with user_errors():
        try:
            drops = [parse_budget_drop(d) for d in budget_drop]
            dev = load_profile(profile) if profile else None
            host = load_profile(host_profile) if host_profile else None
            scale: float | str = "auto" if time_scale == "auto" else float(time_scale)
            columns = (TextColumn("{task.description:<14}"), BarColumn(), MofNCompleteColumn(),
                       TimeElapsedColumn())
            with Progress(*columns, console=console, transient=True) as bar:
                tasks: dict[str, int] = {}

                def progress(stage: str, done: int, total: int) -> None:
                    if stage not in tasks:
                        tasks[stage] = bar.add_task(stage, total=total or None)
                    bar.update(tasks[stage], completed=done, total=total or None)

                result = run_pipeline(
                    preset.value, out_dir=out, store=store, policy=policy.value, budget=budget,
                    mode=mode.value, profile=dev, host_profile=host, cold=cold, resolution=resolution,
                    frames=frames, steps=steps, lpl_leap=lpl_leap, tdtm_steps=tdtm_steps,
                    loader_threads=loader_threads, budget_drops=drops, ladder=ladder,
                    time_scale=scale, dtype=dtype.value, seed=seed, progress=progress,  # type: ignore[arg-type]
                )
        except ExecutorError as e:
            raise CliError(f"{e} (trace so far: {out / 'trace.json'})") from e
    trace = result.trace
    table = Table(title=f"cidl run {preset.value}: policy {policy.value}, budget {budget}, {mode.value}")
    for col in ("stage", "calls", "seconds", "load busy s", "exec busy s"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for r in result.rows:
        table.add_row(r.stage, str(r.calls), f"{r.seconds:.3f}", f"{r.load_s:.3f}", f"{r.exec_s:.3f}")
    table.add_row("total", "", f"{trace.makespan:.3f}", "", "", style="bold")
    Console().print(table)
    extra = trace.meta.extra
    lb = trace.meta.lower_bound_s
    bound = f"{trace.makespan:.3f} s vs lower bound {lb:.3f} s ({trace.makespan / lb:.2f}x)" if lb else \
        f"{trace.makespan:.3f} s (no lower bound)"
    print(f"latency {bound}; peak accounted {format_size(trace.peak('total'))} of "
          f"{format_size(trace.meta.budget_bytes or 0)}; peak RSS growth "
          f"{format_size(extra.get('rss_peak_growth_bytes') or 0)}")
    print(f"time scale {extra.get('time_scale', 1.0):g}; schedules {', '.join(trace.meta.schedule_hashes)}")
    print(f"wrote {out}/: trace.json, gantt.png, summary.json, latents.safetensors, frames/")
