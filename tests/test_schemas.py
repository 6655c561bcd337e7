"""The published JSON Schemas match the pydantic contracts, and a Schedule validates against its schema."""

from __future__ import annotations

import json

import pytest

from cidl.scheduler.schemas import CONTRACTS, SCHEMA_DIR, schema_text


@pytest.mark.parametrize("name", sorted(CONTRACTS))
def test_schema_file_is_up_to_date(name: str) -> None:
    path = SCHEMA_DIR / f"{name}.schema.json"
    assert path.read_text() == schema_text(name), f"regenerate with: python -m cidl.scheduler.schemas ({path})"


def test_every_contract_is_versioned() -> None:
    for name in CONTRACTS:
        schema = json.loads(schema_text(name))
        assert "schema_version" in schema["properties"], name
