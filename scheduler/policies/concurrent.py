"""``concurrent``: On-device Sora's Concurrent Inference as the app does it.

Block i+1 loads while block i runs (one loader thread, one block ahead, within a model: the next model's
first block loads once the previous model is done). STDiT's first step runs without overlap while its
working memory is measured; nothing is kept across calls, so part1/part2 and every block reload each step.
"""

from __future__ import annotations

from dataclasses import replace

from ..plan import PlanState
from ..schedule import Schedule
from .base import ConcurrentOptions, Policy, PolicyName
from .builder import PlanSpec
from .common import build_first_fit, preferred_queues


def first_stdit_call(state: PlanState) -> frozenset[tuple[int, int]]:
    """The app's measuring step: call 0 of the first STDiT stage, while its memory is not measured yet."""
    for s, stage in enumerate(state.workload.stages):
        if stage.model == "stdit":
            ahead = s > state.stage or (s == state.stage and state.call == 0)
            return frozenset({(s, 0)}) if ahead and not state.measured(s) else frozenset()
    return frozenset()


class ConcurrentPolicy(Policy):
    name = PolicyName.CONCURRENT.value

    def __init__(self, options: ConcurrentOptions | None = None) -> None:
        self.options = options or ConcurrentOptions()

    def spec(self, state: PlanState) -> PlanSpec:
        o = self.options
        return PlanSpec(
            policy=self.name, depth=o.prefetch_depth, lanes=o.loader_threads,
            sequential_calls=first_stdit_call(state), cross_model=False,
            queues=preferred_queues(state, o.units),
            plan_options={"variant": self.name, "loader_threads": o.loader_threads,
                          "prefetch_depth": o.prefetch_depth},
        )

    def plan(self, state: PlanState) -> Schedule:
        spec = self.spec(state)
        return build_first_fit(state, [spec, replace(spec, depth=1)])
