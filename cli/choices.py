"""The fixed choices the commands share, as enums so typer lists and checks them."""

from __future__ import annotations

from enum import StrEnum


class Preset(StrEnum):
    """Model presets: the same code at different widths and depths."""

    tiny = "tiny"
    small = "small"
    full = "full"


class DType(StrEnum):
    """Stored weight formats."""

    fp32 = "fp32"
    fp16 = "fp16"
    int8 = "int8"
