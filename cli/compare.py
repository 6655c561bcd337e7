"""`cidl compare A B`: two traces side by side (per stage, per lane, overlap, peak memory, makespan)."""

from __future__ import annotations

from pathlib import Path

import typer

from cidl.cli.errors import user_errors


def compare(
    a: Path = typer.Argument(..., help="Trace A (Chrome JSON written by cidl): the reference."),
    b: Path = typer.Argument(..., help="Trace B: reported against A (relative error B vs A)."),
    json_out: bool = typer.Option(False, "--json", help="Print the comparison as JSON instead of a table."),
) -> None:
    """Compare two traces (simulated, host or device): B's relative error against A per metric."""
    from cidl.traces import compare_traces, read_trace, render_comparison

    with user_errors():
        cmp = compare_traces(read_trace(a), read_trace(b))
    if json_out:
        print(cmp.model_dump_json(indent=2))
        return
    from rich.console import Console

    Console().print(render_comparison(cmp))
