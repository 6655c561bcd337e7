"""The `cidl` console script: a thin layer over the packages' public functions.

Each command lives in its own module under ``cli/`` and is registered here. Command modules import
torch (via ``cidl.runtime``) only inside the command body, so `cidl simulate` starts fast.
"""

from __future__ import annotations

import typer

from cidl.cli import compare as compare_cmd
from cidl.cli import inspect as inspect_cmd
from cidl.cli import prepare as prepare_cmd
from cidl.cli import profile as profile_cmd
from cidl.cli import run as run_cmd
from cidl.cli import simulate as simulate_cmd

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Simulate, run and tune Concurrent Inference with Dynamic Loading (On-device Sora's scheduler).",
)


@app.command()
def version() -> None:
    """Print cidl's version."""
    from importlib.metadata import version as _v

    print(_v("cidl"))


# Command registrations (one line each; keep alphabetical):
app.command("compare")(compare_cmd.compare)
app.command("inspect")(inspect_cmd.inspect)
app.command("prepare")(prepare_cmd.prepare)
app.add_typer(profile_cmd.profile_app, name="profile")
app.command("run")(run_cmd.run)
app.command("simulate")(simulate_cmd.simulate)
