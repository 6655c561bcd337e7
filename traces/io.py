"""Atomic file writes for traces and plots, and the JSON Schema of the Trace model."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .model import Trace

SCHEMA_PATH = Path(__file__).resolve().parent / "schema.json"


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to a temp file in ``path``'s folder, then ``os.replace`` it: never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; the result should look like any written file
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def trace_schema() -> dict[str, Any]:
    """JSON Schema of the Trace model: the logical contract (on disk a trace is Chrome JSON, chrome.py)."""
    return Trace.model_json_schema()


def write_trace_schema(path: str | os.PathLike[str] = SCHEMA_PATH) -> Path:
    """Regenerate ``traces/schema.json`` (a test checks it is up to date)."""
    return atomic_write_bytes(path, (json.dumps(trace_schema(), indent=2) + "\n").encode())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
