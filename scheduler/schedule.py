"""The Schedule contract: explicit ops that a simulator, the runtime or the phone agent executes alike.

Semantics (the same in every executor):

* Ops are **issued in list order** (prologue, then each call's ops): an op cannot start before every op
  listed earlier has started. Completion may be out of order. This is how a policy expresses prefetch
  depth: a load listed right after ``exec(b_i)`` starts no earlier than ``b_i``'s exec.
* ``load(block, lane)`` runs on loader thread ``lane`` (one load at a time per lane). It first reserves
  the block's resident bytes from the budget and waits while they do not fit.
* ``exec(block, stage, call, queue, part)`` waits for the block's load to complete, for every exec of
  the previous exec group (the block before it in the pipeline) to finish, and for its queue. It holds
  the block's working bytes (divided by ``part_count`` when a call is split into batch parts) while it runs.
* ``evict(block)`` waits for every exec of that block listed before it, then frees the block's bytes.
* A schedule whose next op can never start (it waits for memory that only a later-listed eviction
  frees) deadlocks; executors detect and report it, and policies must not emit one.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cidl.device_profiles.profile import Unit

SCHEMA_VERSION = 1


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class LoadOp(_Frozen):
    kind: Literal["load"] = "load"
    block: str
    lane: int = Field(ge=0)


class ExecOp(_Frozen):
    kind: Literal["exec"] = "exec"
    block: str
    stage: str
    call: int = Field(ge=0)
    queue: Unit
    part: int = Field(0, ge=0, description="Which batch part of a split call (0 when not split).")
    part_count: int = Field(1, ge=1)


class EvictOp(_Frozen):
    kind: Literal["evict"] = "evict"
    block: str


Op = Annotated[LoadOp | ExecOp | EvictOp, Field(discriminator="kind")]


class CallOps(_Frozen):
    """The ops of one call of one stage (one denoising step for STDiT)."""

    stage: str
    call: int = Field(ge=0)
    ops: list[Op]


class Schedule(_Frozen):
    """A plan for the rest of a run, from (``start_stage``, ``start_call``) on."""

    schema_version: Literal[1] = SCHEMA_VERSION
    policy: str
    workload: str = Field(description="Workload content hash this was planned for.")
    budget_bytes: int = Field(gt=0)
    loader_threads: int = Field(ge=1)
    prefetch_depth: int = Field(ge=0)
    retained: list[str] = Field(default_factory=list, description="Blocks kept resident across calls.")
    start_stage: int = Field(0, ge=0)
    start_call: int = Field(0, ge=0)
    planned_peak_bytes: int = Field(0, ge=0, description="The policy's own bound on accounted bytes.")
    plan_options: dict[str, Any] = Field(
        default_factory=dict,
        description="How the policy planned it (e.g. the variant `optimal` chose), for re-plans to continue.",
    )
    prologue: list[Op] = Field(default_factory=list)
    calls: list[CallOps] = Field(default_factory=list)

    def content_hash(self) -> str:
        data = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(data.encode()).hexdigest()[:16]

    def ops(self) -> list[Op]:
        """All ops in issue order."""
        out: list[Op] = list(self.prologue)
        for c in self.calls:
            out.extend(c.ops)
        return out


def schedule_json_schema() -> dict:
    return Schedule.model_json_schema()
