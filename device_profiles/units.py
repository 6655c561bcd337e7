"""Byte sizes as people write them: GB = 10^9, GiB = 2^30 (DESIGN.md), plus plain integers."""

from __future__ import annotations

import re

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int | float) -> int:
    """``"3.3GB"`` -> 3_300_000_000; ``"3.3GiB"``, ``"3300MB"``, ``"1234"`` likewise. Raises ValueError."""
    if isinstance(text, bool):
        raise ValueError(f"not a size: {text!r}")
    if isinstance(text, int | float):
        if text < 0:
            raise ValueError(f"size must be >= 0, got {text!r}")
        return int(text)
    m = _SIZE.match(text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (expected e.g. 3.3GB, 3300MB, 3.3GiB or a byte count)")
    return int(round(float(m.group(1)) * _UNITS[m.group(2).lower()]))


def format_size(n: float) -> str:
    """Decimal units, 3 significant digits: 3300000000 -> '3.30 GB'."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"
