"""Published JSON Schemas of the scheduler's on-disk contracts (the phone agent validates against them)."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel

from .costmodel import CostModel
from .schedule import Schedule
from .workload import Workload

SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"
CONTRACTS: dict[str, type[BaseModel]] = {"schedule": Schedule, "workload": Workload, "costmodel": CostModel}


def schema_text(name: str) -> str:
    return json.dumps(CONTRACTS[name].model_json_schema(), indent=2, sort_keys=True) + "\n"


def write_schemas(directory: Path = SCHEMA_DIR) -> list[Path]:
    """Regenerate ``scheduler/schemas/<name>.schema.json`` (a test checks they are up to date)."""
    from cidl.traces.io import atomic_write_bytes

    return [atomic_write_bytes(directory / f"{name}.schema.json", schema_text(name).encode()) for name in CONTRACTS]


if __name__ == "__main__":
    for path in write_schemas():
        print(path)
