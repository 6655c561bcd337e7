"""Shipped profiles by name, profile files by path: load, list, save, and the JSON Schema.

Every failure is one line naming the file and, for a validation error, the dotted field path and what was
expected, e.g. ``my.json: field contention.load_slowdown: Input should be greater than or equal to 1``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .profile import DeviceProfile

PROFILES_DIR = Path(__file__).resolve().parent / "profiles"
SCHEMA_PATH = Path(__file__).resolve().parent / "schema.json"


class ProfileError(ValueError):
    """A profile that cannot be used: unknown name, malformed JSON or a field that fails validation."""


def list_profiles() -> list[str]:
    """Names of the shipped profiles, sorted."""
    return sorted(p.stem for p in PROFILES_DIR.glob("*.json"))


def profile_path(name: str) -> Path:
    """The file of a shipped profile. Raises ProfileError for an unknown name (listing the known ones)."""
    path = PROFILES_DIR / f"{name}.json"
    if "/" in name or os.sep in name or not path.is_file():
        raise ProfileError(f"unknown device profile {name!r} (known: {', '.join(list_profiles())})")
    return path


def _looks_like_path(text: str) -> bool:
    return text.endswith(".json") or "/" in text or os.sep in text or Path(text).is_file()


def load_profile(name_or_path: str | os.PathLike[str]) -> DeviceProfile:
    """A shipped profile by name (``iphone-15-pro``, see ``list_profiles()``) or a profile JSON file."""
    text = os.fspath(name_or_path)
    if text in list_profiles():
        return _read(PROFILES_DIR / f"{text}.json")
    if not _looks_like_path(text):
        profile_path(text)  # raises the unknown-name error
    return _read(Path(text))


def parse_profile(data: str | bytes | dict[str, Any], source: str = "<profile>") -> DeviceProfile:
    """Validate profile JSON (text or an already parsed object); errors name ``source`` and the field."""
    if not isinstance(data, dict):
        try:
            data = json.loads(data)
        except json.JSONDecodeError as e:
            where = f"line {e.lineno} column {e.colno}"
            raise ProfileError(f"{source}: malformed JSON at {where}: {e.msg}") from None
        except UnicodeDecodeError as e:
            raise ProfileError(f"{source}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not isinstance(data, dict):
        raise ProfileError(f"{source}: expected a JSON object, got {type(data).__name__}")
    try:
        return DeviceProfile.model_validate(data)
    except ValidationError as e:
        raise ProfileError(f"{source}: {describe_validation_error(e)}") from None


def describe_validation_error(e: ValidationError) -> str:
    """pydantic's first error as ``field a.b.c: message`` (+ how many more), on one line."""
    errs = e.errors(include_url=False)
    first = errs[0]
    where = ".".join(str(p) for p in first["loc"])
    msg = str(first["msg"]).removeprefix("Value error, ")
    more = f" (and {len(errs) - 1} more error{'s' if len(errs) > 2 else ''})" if len(errs) > 1 else ""
    head = f"field {where}: " if where else ""
    return f"{head}{msg}{more}".replace("\n", " ")


def _read(path: Path) -> DeviceProfile:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such profile file") from None
    except IsADirectoryError:
        raise ProfileError(f"{path}: is a directory, not a profile file") from None
    return parse_profile(raw, str(path))


def profile_json(profile: DeviceProfile) -> str:
    """The canonical text of a profile file: indented JSON, a trailing newline."""
    return json.dumps(profile.model_dump(mode="json"), indent=2) + "\n"


def atomic_write_text(path: Path, text: str) -> Path:
    """Write ``text`` to a temp file beside ``path`` and rename it over ``path``: never half-written."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; the result should look like any written file
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_profile(profile: DeviceProfile, path: str | os.PathLike[str]) -> Path:
    """Write ``profile`` as JSON to ``path`` atomically (temp file + rename); returns the path."""
    return atomic_write_text(Path(path), profile_json(profile))


def profile_schema() -> dict[str, Any]:
    """The JSON Schema of a DeviceProfile file (what ``schema.json`` holds)."""
    return DeviceProfile.model_json_schema()


def write_profile_schema(path: str | os.PathLike[str] = SCHEMA_PATH) -> Path:
    """Regenerate ``device_profiles/schema.json`` (a test checks it is up to date)."""
    return atomic_write_text(Path(path), json.dumps(profile_schema(), indent=2) + "\n")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
