"""The DeviceProfile contract: few, physically meaningful parameters of a device that runs CI-DL.

Times are seconds, rates bytes/s or FLOP/s, sizes bytes. Contention factors are >= 1 by validation:
overlapping a load with compute can only slow each down, which the lower bound in
``cidl.scheduler.bounds`` relies on.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

SCHEMA_VERSION = 1

Unit = Literal["gpu", "ane", "cpu"]
WeightDType = Literal["fp32", "fp16", "int8"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class MemorySpec(_Frozen):
    total_bytes: int = Field(gt=0, description="Physical RAM of the device.")
    app_budget_bytes: int = Field(gt=0, description="What the OS lets one app use (iPhone 15 Pro: 3.3 GB).")

    @model_validator(mode="after")
    def _budget_within_total(self) -> MemorySpec:
        if self.app_budget_bytes > self.total_bytes:
            raise ValueError(
                f"app_budget_bytes ({self.app_budget_bytes}) must be <= total_bytes ({self.total_bytes})"
            )
        return self


class LoadingSpec(_Frozen):
    """Storage -> resident weights. One load costs ``per_load_overhead_s + bytes / rate``.

    ``bytes_per_s`` is the rate of *one* loader thread per stored weight format (it includes whatever the
    platform does on load, e.g. Core ML's preparation of a package). With n threads loading at once, each
    runs at ``min(rate, max_total_bytes_per_s / n)``: threads share the storage's total bandwidth.
    """

    per_load_overhead_s: float = Field(ge=0)
    bytes_per_s: dict[WeightDType, float] = Field(min_length=1)
    max_total_bytes_per_s: float = Field(gt=0)
    loader_threads: int = Field(ge=1, le=64, description="Default loader threads (CLI may override).")

    @model_validator(mode="after")
    def _positive_rates(self) -> LoadingSpec:
        for fmt, rate in self.bytes_per_s.items():
            if not rate > 0:
                raise ValueError(f"bytes_per_s.{fmt} must be > 0, got {rate}")
        return self

    def thread_rate(self, fmt: WeightDType, active_loads: int) -> float:
        """Bytes/s one of ``active_loads`` concurrent loads gets (before contention with compute)."""
        if fmt not in self.bytes_per_s:
            raise KeyError(f"profile has no load rate for weight format {fmt!r}")
        return min(self.bytes_per_s[fmt], self.max_total_bytes_per_s / max(1, active_loads))


class ComputeUnit(_Frozen):
    """A compute queue. Exec time = ``dispatch_overhead_s + flops / (peak_flops * efficiency[dtype])``.

    ``efficiency`` lists the weight dtypes this unit runs; a block whose dtype is missing cannot run here.
    """

    peak_flops: float = Field(gt=0, description="Spec-sheet peak FLOP/s (or OP/s) of the unit.")
    efficiency: dict[WeightDType, float] = Field(min_length=1)
    dispatch_overhead_s: float = Field(ge=0)

    @model_validator(mode="after")
    def _efficiency_range(self) -> ComputeUnit:
        for dt, eff in self.efficiency.items():
            if not 0 < eff <= 1:
                raise ValueError(f"efficiency.{dt} must be in (0, 1], got {eff}")
        return self

    def exec_seconds(self, flops: float, dtype: WeightDType) -> float:
        if dtype not in self.efficiency:
            raise KeyError(f"unit cannot run weight dtype {dtype!r}")
        return self.dispatch_overhead_s + flops / (self.peak_flops * self.efficiency[dtype])


class Contention(_Frozen):
    """Slowdown while loads and compute overlap (they share memory bandwidth on a phone's SoC).

    While at least one load and one exec are in progress, loads proceed ``load_slowdown`` times slower and
    execs ``compute_slowdown`` times slower. Both >= 1.
    """

    load_slowdown: float = Field(ge=1.0)
    compute_slowdown: float = Field(ge=1.0)


class Calibration(_Frozen):
    calibrated: bool
    fitted_to: list[str] = Field(default_factory=list, description="Figures the parameters were fitted to.")
    method: str = ""
    residuals: dict[str, float] = Field(default_factory=dict, description="Relative error per fitted figure.")
    source: str = Field("", description="Where the uncalibrated numbers come from (spec sheets, ...).")


class DeviceProfile(_Frozen):
    schema_version: Literal[1] = SCHEMA_VERSION
    name: str = Field(min_length=1)
    description: str = ""
    memory: MemorySpec
    loading: LoadingSpec
    units: dict[Unit, ComputeUnit] = Field(min_length=1)
    contention: Contention
    calibration: Calibration

    def units_for(self, dtype: WeightDType) -> list[Unit]:
        """Units that can run weights of ``dtype``, in a fixed order (gpu, ane, cpu)."""
        return [u for u in ("gpu", "ane", "cpu") if u in self.units and dtype in self.units[u].efficiency]
