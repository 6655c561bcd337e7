"""``sequential``: load a block, run it, evict it -- On-device Sora without CI-DL. Needs the least memory."""

from __future__ import annotations

from ..plan import PlanState
from ..schedule import Schedule
from .base import Policy, PolicyName, SequentialOptions
from .builder import PlanSpec
from .common import build_first_fit, preferred_queues


class SequentialPolicy(Policy):
    name = PolicyName.SEQUENTIAL.value

    def __init__(self, options: SequentialOptions | None = None) -> None:
        self.options = options or SequentialOptions()

    def plan(self, state: PlanState) -> Schedule:
        spec = PlanSpec(policy=self.name, depth=0, lanes=1, plan_options={"variant": self.name},
                        queues=preferred_queues(state, self.options.units))
        return build_first_fit(state, [spec])
