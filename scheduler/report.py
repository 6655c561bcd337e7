"""What `cidl simulate` reports per policy: seconds per model, total, lower bound, peak accounted bytes."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from .sim import SimResult
from .workload import Workload

# Report columns: the pipeline's models, grouped as a reader thinks of them.
MODEL_GROUPS: dict[str, tuple[str, ...]] = {
    "t5": ("t5",), "stdit": ("stdit",), "vae": ("vae_temporal", "vae_2d"),
}


class PolicySummary(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    policy: str
    stage_s: dict[str, float]
    model_s: dict[str, float]
    total_s: float
    lower_bound_s: float
    peak_bytes: int
    budget_bytes: int
    schedule_hashes: list[str]
    error: str | None = None

    @property
    def vs_lower_bound(self) -> float:
        return self.total_s / self.lower_bound_s if self.lower_bound_s > 0 else float("inf")


def summarize(workload: Workload, result: SimResult) -> PolicySummary:
    """Stage latencies are consecutive (each from the previous stage's last exec): they sum to the total."""
    model_of = {s.name: s.model for s in workload.stages}
    by_model = {
        group: sum(v for stage, v in result.stage_latency_s.items() if model_of.get(stage) in models)
        for group, models in MODEL_GROUPS.items()
    }
    return PolicySummary(
        policy=result.policy, stage_s=dict(result.stage_latency_s), model_s=by_model,
        total_s=result.latency_s,
        lower_bound_s=result.lower_bound_s, peak_bytes=result.peak_bytes, budget_bytes=result.budget_bytes,
        schedule_hashes=list(result.schedule_hashes), error=result.error,
    )
