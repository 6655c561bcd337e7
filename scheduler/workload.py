"""Block and Workload: the pipeline as the scheduler sees it (no torch).

A Workload is an ordered list of stages; a stage runs one model's blocks in order, ``calls`` times, all
calls at the same shape. Stages of the same model share block ids (the same weights), so blocks resident at
the end of one stage are still resident in the next: TDTM-merged STDiT steps and the unmerged steps are
two stages over the same 28 blocks.
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cidl.device_profiles.profile import Unit, WeightDType

from .costmodel import ModelName, Variant

SCHEMA_VERSION = 1


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Block(_Frozen):
    """One block as executed in one stage: its weights and the cost of one call at the stage's shape."""

    id: str = Field(description="Unique per weights, e.g. 'stdit.block03'; shared by stages of one model.")
    model: ModelName
    index: int = Field(ge=0)
    weight_bytes: dict[WeightDType, int] = Field(description="Stored size per weight format.")
    dtype: WeightDType = Field(description="The format this workload stores and loads the block in.")
    compute_dtype: WeightDType | None = Field(
        None, description="The dtype kernels run in when it differs from the stored one (host kernels: fp32)."
    )
    resident_bytes: int = Field(
        ge=0,
        description="Bytes while resident, in the form the kernel uses (int8 dequantized on a host: fp32).",
    )
    flops: int = Field(ge=0, description="FLOPs of one call (FlopCounterMode's count).")
    working_bytes: int = Field(ge=0, description="Peak activation + scratch bytes while one call runs.")
    unit: Unit = Field(description="Preferred compute unit.")

    @property
    def kernel_dtype(self) -> WeightDType:
        """The dtype exec time is priced at: the stored format unless kernels convert it."""
        return self.compute_dtype or self.dtype

    @property
    def load_bytes(self) -> int:
        """Bytes read from storage for one load."""
        return self.weight_bytes[self.dtype]


class Stage(_Frozen):
    name: str
    model: ModelName
    variant: Variant = "default"
    calls: int = Field(ge=1)
    shape: dict[str, int] = Field(description="Shape variables of the cost model for this stage.")
    batch_splittable: int = Field(
        1, ge=1, description="Independent batch halves a call can be split into across queues (STDiT CFG: 2)."
    )
    blocks: list[Block] = Field(min_length=1)


class Workload(_Frozen):
    schema_version: Literal[1] = SCHEMA_VERSION
    name: str
    preset: str = Field(description="Model preset the cost model came from: tiny, small or full.")
    resolution: tuple[int, int]
    frames: int
    steps: int
    lpl_leap: int | None = None
    tdtm_steps: int = 0
    persistent_bytes: int = Field(
        ge=0,
        description="Tensors alive across stages (text embeddings, latents, decoded frames), counted for the "
        "whole run: a simple upper bound of what is alive at any instant.",
    )
    stages: list[Stage] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent_blocks(self) -> Workload:
        seen: dict[str, Block] = {}
        for stage in self.stages:
            for b in stage.blocks:
                prev = seen.setdefault(b.id, b)
                if prev.resident_bytes != b.resident_bytes or prev.load_bytes != b.load_bytes:
                    raise ValueError(f"block {b.id}: stages disagree on its bytes")
        return self

    def distinct_blocks(self) -> dict[str, Block]:
        """Every block id once, in first-use order."""
        out: dict[str, Block] = {}
        for stage in self.stages:
            for b in stage.blocks:
                out.setdefault(b.id, b)
        return out

    def total_calls(self) -> int:
        return sum(s.calls for s in self.stages)

    def content_hash(self) -> str:
        data = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(data.encode()).hexdigest()[:16]
