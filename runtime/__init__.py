"""cidl.runtime: the real models, their measurement and cost model, the block store and the executor.

Importing the package is cheap and has no side effects: the names below load their module (and torch) on
first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    # measure: FLOPs, live bytes and weight bytes of each piece (meta or CPU)
    "PieceMeasure": "cidl.runtime.measure",
    "measure_pieces": "cidl.runtime.measure",
    "count_flops": "cidl.runtime.measure",
    "piece_params": "cidl.runtime.measure",
    "piece_weight_bytes": "cidl.runtime.measure",
    "cpu_allocator_peak": "cidl.runtime.measure",
    # inventory: the shipped cost model, measured and fitted exactly
    "build_cost_model": "cidl.runtime.inventory",
    "PresetModels": "cidl.runtime.inventory",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'cidl.runtime' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
