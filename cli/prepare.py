"""`cidl prepare PRESET`: write the block store (one safetensors file per block + a manifest with sha256)."""

from __future__ import annotations

from pathlib import Path

import typer

from cidl.cli.choices import DType, Preset
from cidl.cli.errors import user_errors


def default_out(preset: str, dtype: str) -> Path:
    return Path("cidl-store") / f"{preset}-{dtype}"


def prepare(
    preset: Preset = typer.Argument(..., help="Model preset: tiny, small or full."),
    dtype: DType = typer.Option(DType.fp32, "--dtype", help="Stored weight format."),
    out: Path | None = typer.Option(None, "--out", help="Store dir (default: cidl-store/PRESET-DTYPE)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the deterministic weights."),
) -> None:
    """Write every block of PRESET's pipeline (T5, STDiT, VAE) as its own file, streamed block by block.

    Re-running completes an interrupted store and leaves a complete one as it is (after verifying it).
    """
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    from cidl.device_profiles.units import format_size
    from cidl.runtime.store import PrepareProgress, prepare_store

    directory = out or default_out(preset.value, dtype.value)
    console = Console(stderr=True)
    written: set[str] = set()
    reused: set[str] = set()
    columns = (TextColumn("{task.description:<28}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeRemainingColumn())
    with user_errors(), Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("planning", total=None)

        def progress(e: PrepareProgress) -> None:
            (reused if e.reused else written).add(e.block_id)
            verb = "verified" if e.reused else "writing"
            bar.update(task, total=e.total, completed=e.done, description=f"{verb} {e.block_id}")

        prepare_store(preset.value, directory, dtype=dtype.value, seed=seed, progress=progress)
        total = bar.tasks[0].total or 0
    size = format_size(total)
    if not written:
        print(f"{directory}: store is complete and verified ({len(reused)} blocks, {size}); nothing to write")
    else:
        note = f", kept {len(reused)} verified blocks" if reused else ""
        print(f"{directory}: wrote {len(written)} blocks{note} ({size} of {dtype.value} weights)")
