"""Device profiles: shipped files, loading errors (one line naming file and field), atomic save, sizes."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from cidl.device_profiles import (
    DeviceProfile,
    ProfileError,
    list_profiles,
    load_profile,
    parse_profile,
    profile_path,
    profile_schema,
    save_profile,
)
from cidl.device_profiles.registry import SCHEMA_PATH, profile_json
from cidl.device_profiles.units import format_size, parse_size

SHIPPED = ["android-flagship", "ipad-pro-m2", "iphone-15", "iphone-15-pro"]


def _data(name: str = "iphone-15-pro") -> dict[str, Any]:
    return json.loads(profile_path(name).read_text())


def _write(tmp_path: Path, data: dict[str, Any] | str, name: str = "my.json") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data, indent=2))
    return path


def _error(path: Path) -> str:
    with pytest.raises(ProfileError) as info:
        load_profile(str(path))
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{path}: ")
    return msg


# --- shipped profiles ----------------------------------------------------------------------------------


def test_list_profiles_names_the_shipped_files() -> None:
    assert list_profiles() == SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_profile_is_valid_and_canonical(name: str) -> None:
    p = load_profile(name)
    assert p.name == name
    # Only the iPhone 15 Pro is fitted (to the paper's figures, scheduler/calibrate.py); the rest are spec sheets.
    assert p.calibration.calibrated is (name == "iphone-15-pro") and len(p.calibration.source) > 100
    assert p.memory.app_budget_bytes < p.memory.total_bytes
    assert set(p.units) == {"gpu", "ane", "cpu"}
    assert "fp32" not in p.units["ane"].efficiency  # neural accelerators run fp16/int8 only
    assert p.units["ane"].peak_flops > p.units["gpu"].peak_flops > p.units["cpu"].peak_flops
    assert p.contention.load_slowdown >= 1 and p.contention.compute_slowdown >= 1
    # The file is exactly what save_profile writes, so a calibrated rewrite shows a minimal diff.
    assert profile_path(name).read_text() == profile_json(p)


def test_iphone_15_pro_spec_numbers() -> None:
    p = load_profile("iphone-15-pro")
    assert p.memory.total_bytes == 8_000_000_000
    assert p.memory.app_budget_bytes == 3_300_000_000
    assert p.units["gpu"].peak_flops == 2.15e12
    assert p.units["ane"].peak_flops == 35e12
    assert p.loading.loader_threads == 1
    assert p.units_for("fp32") == ["gpu", "cpu"]
    # Core ML loading is far below the raw NVMe rate the threads share.
    assert p.loading.bytes_per_s["fp32"] < p.loading.max_total_bytes_per_s


def test_other_devices_memory() -> None:
    assert load_profile("iphone-15").memory.total_bytes == 6_000_000_000
    assert 2_000_000_000 <= load_profile("iphone-15").memory.app_budget_bytes <= 2_500_000_000
    assert load_profile("ipad-pro-m2").units["gpu"].peak_flops == 3.6e12
    assert load_profile("ipad-pro-m2").units["ane"].peak_flops == 15.8e12
    assert load_profile("android-flagship").memory.total_bytes == 12_000_000_000


# --- round trip and atomic save ------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path: Path) -> None:
    p = load_profile("iphone-15-pro")
    changed = p.model_copy(update={"name": "mine"})
    out = save_profile(changed, tmp_path / "mine.json")
    assert load_profile(str(out)) == changed
    assert load_profile(out) == changed  # a Path works too
    assert [f.name for f in tmp_path.iterdir()] == ["mine.json"]  # no temp file left


def test_save_is_atomic_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "p.json"
    save_profile(load_profile("iphone-15"), path)
    before = path.read_text()

    def boom(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        save_profile(load_profile("iphone-15-pro"), path)
    assert path.read_text() == before
    assert [f.name for f in tmp_path.iterdir()] == ["p.json"]


# --- errors: one line, naming file and field -----------------------------------------------------------


def test_malformed_json_names_line_and_column(tmp_path: Path) -> None:
    path = _write(tmp_path, '{\n  "name": "x",\n  "memory": {,}\n}\n')
    msg = _error(path)
    assert "malformed JSON at line 3 column 14" in msg


def test_contention_below_one(tmp_path: Path) -> None:
    data = _data()
    data["contention"]["load_slowdown"] = 0.9
    msg = _error(_write(tmp_path, data))
    assert msg.endswith("my.json: field contention.load_slowdown: Input should be greater than or equal to 1")


def test_efficiency_above_one(tmp_path: Path) -> None:
    data = _data()
    data["units"]["gpu"]["efficiency"]["fp32"] = 1.5
    msg = _error(_write(tmp_path, data))
    assert "field units.gpu: efficiency.fp32 must be in (0, 1], got 1.5" in msg


def test_app_budget_above_total(tmp_path: Path) -> None:
    data = _data()
    data["memory"]["app_budget_bytes"] = 9_000_000_000
    msg = _error(_write(tmp_path, data))
    assert "field memory: app_budget_bytes (9000000000) must be <= total_bytes (8000000000)" in msg


def test_unknown_field_and_wrong_type(tmp_path: Path) -> None:
    data = _data()
    data["loading"]["threads"] = 2
    assert "field loading.threads: Extra inputs are not permitted" in _error(_write(tmp_path, data))
    data = _data()
    data["loading"]["loader_threads"] = "many"
    assert "field loading.loader_threads: Input should be a valid integer" in _error(_write(tmp_path, data))


def test_several_errors_reported_on_one_line(tmp_path: Path) -> None:
    data = _data()
    data["contention"] = {"load_slowdown": 0.5, "compute_slowdown": 0.5}
    assert _error(_write(tmp_path, data)).endswith("(and 1 more error)")


def test_unknown_name_lists_known_ones() -> None:
    with pytest.raises(ProfileError) as info:
        load_profile("iphone-99")
    assert str(info.value) == ("unknown device profile 'iphone-99' (known: android-flagship, ipad-pro-m2, "
                               "iphone-15, iphone-15-pro)")


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.json: no such profile file"):
        load_profile(str(tmp_path / "nope.json"))
    with pytest.raises(ProfileError, match="is a directory"):
        load_profile(str(tmp_path) + "/")


def test_parse_profile_of_non_object() -> None:
    with pytest.raises(ProfileError, match=r"^x\.json: expected a JSON object, got list$"):
        parse_profile("[1, 2]", "x.json")


def test_schema_file_is_up_to_date() -> None:
    # Regenerate: python -c "from cidl.device_profiles import write_profile_schema as w; w()"
    assert json.loads(SCHEMA_PATH.read_text()) == profile_schema()
    assert profile_schema()["properties"]["contention"]["$ref"].endswith("Contention")


def test_validation_holds_in_python_too() -> None:
    data = _data()
    data["units"]["ane"]["efficiency"]["int8"] = 0.0
    with pytest.raises(ValueError, match="efficiency.int8 must be in"):
        DeviceProfile.model_validate(data)


# --- sizes ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("3.3GB", 3_300_000_000), ("3300MB", 3_300_000_000), ("3.3 GB", 3_300_000_000), ("3.3gb", 3_300_000_000),
    ("3.3GiB", round(3.3 * 2**30)), ("1KiB", 1024), ("1234", 1234), ("1234B", 1234), (".5kB", 500),
    (4096, 4096), (0, 0),
])
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["-1GB", "-5", -5, "GB", "3.3XB", "abc", "", "1e9", "3.3 G B", True])
def test_parse_size_rejects(text: str | int) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_format_size() -> None:
    assert format_size(3_300_000_000) == "3.30 GB"
    assert format_size(170_000_000) == "170.00 MB"
    assert format_size(999) == "999 B"
