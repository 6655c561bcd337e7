"""One-line errors for the CLI: bad input exits non-zero with a single clear line on stderr."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import typer


class CliError(Exception):
    """An error whose message is the whole story for the user."""


def fail(message: str, code: int = 2) -> None:
    print(f"cidl: error: {message}", file=sys.stderr)
    raise typer.Exit(code)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn the errors bad input raises (ValueError, FileNotFoundError, KeyError, CliError) into one line."""
    try:
        yield
    except (CliError, ValueError, FileNotFoundError, KeyError, PermissionError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        fail(msg)
