"""`cidl profile host`: measure this machine into a DeviceProfile JSON."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from cidl.cli.errors import user_errors

profile_app = typer.Typer(no_args_is_help=True, help="Measure a device into a DeviceProfile.")


@profile_app.command("host")
def host(
    out: Path = typer.Option(Path("cidl-out/host-profile.json"), "--out", help="Where to write the profile."),
    quick: bool = typer.Option(False, "--quick", help="Small files, few repeats: seconds, for tests."),
    directory: Path | None = typer.Option(
        None, "--dir", help="Where the test block files go: the storage you load from (default: temp)."
    ),
    name: str = typer.Option("host", "--name", help="The profile's name."),
) -> None:
    """Measure storage (cold/warm, per format, 2 threads), matmul FLOP/s, dispatch, contention, memory."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from cidl.device_profiles.units import format_size
    from cidl.runtime.hostprofile import profile_host

    console = Console(stderr=True)
    with user_errors():
        if directory is not None and not directory.is_dir():
            raise FileNotFoundError(f"{directory}: --dir must be an existing directory")
        columns = (TextColumn("{task.description:<20}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn())
        with Progress(*columns, console=console, transient=True) as bar:
            task = bar.add_task("starting", total=None)

            def progress(step: str, done: int, total: int) -> None:
                bar.update(task, description=step, completed=done, total=total)

            profile = profile_host(quick=quick, workdir=directory, name=name, progress=progress)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
        tmp.write_text(profile.model_dump_json(indent=1) + "\n")
        os.replace(tmp, out)
    load, cpu, c = profile.loading, profile.units["cpu"], profile.contention
    rates = ", ".join(f"{fmt} {format_size(r)}/s" for fmt, r in load.bytes_per_s.items())
    print(f"loads (cold): {rates}; +{load.per_load_overhead_s * 1e3:.2f} ms per load; "
          f"{load.loader_threads} loader thread(s), {format_size(load.max_total_bytes_per_s)}/s in all")
    print(f"cpu: {cpu.peak_flops * cpu.efficiency['fp32'] / 1e9:.1f} GFLOP/s fp32 "
          f"({cpu.efficiency['fp32']:.0%} of a {cpu.peak_flops / 1e9:.0f} GFLOP/s peak estimate), "
          f"dispatch {cpu.dispatch_overhead_s * 1e6:.0f} us")
    print(f"contention: loads x{c.load_slowdown:.2f}, compute x{c.compute_slowdown:.2f}; "
          f"memory {format_size(profile.memory.total_bytes)} total, "
          f"{format_size(profile.memory.app_budget_bytes)} available")
    print(f"wrote {out}")
