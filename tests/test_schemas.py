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


def test_workload_json_round_trips_as_traces_embed_it() -> None:
    """Replay and calibration rebuild the Workload from the JSON a trace embeds: it must validate back equal."""
    from cidl.scheduler.pipeline import open_sora_workload
    from cidl.scheduler.workload import Workload

    w = open_sora_workload(192, 51, 5, lpl_leap=3, tdtm_steps=2, kernel_dtype="fp32")
    assert Workload.model_validate(w.model_dump(mode="json")) == w
    assert Workload.model_validate_json(w.model_dump_json()) == w
