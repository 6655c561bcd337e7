"""``cidl``: Concurrent Inference with Dynamic Loading, as On-device Sora's app does it.

The same as ``concurrent``, plus: once a repeated model's working memory is known (STDiT: after its first,
sequential step -- a re-plan point), keep the first N blocks that fit in the budget beside the measured
working memory and the prefetch buffer, and reload the rest every call. STDiT's part1 and part2 are never
kept (the app reloads them every step). Other repeated models (the VAE decoders) are kept the same way from
the start, with the cost model's working bytes.
"""

from __future__ import annotations

from dataclasses import replace

from ..plan import PlanState
from ..schedule import Schedule
from .base import CidlOptions, ConcurrentOptions, Policy, PolicyName
from .common import build_first_fit, first_n, is_stdit_part, repeated_models
from .concurrent import ConcurrentPolicy


def app_retention(state: PlanState, depth: int) -> tuple[str, ...]:
    keep: list[str] = []
    for model, stages in repeated_models(state).items():
        if model == "stdit" and not any(state.measured(s) for s in stages):
            continue  # the app keeps nothing before it measured STDiT's working memory
        seen: set[str] = set()
        cands = []
        for s in stages:
            for b in state.workload.stages[s].blocks:
                if b.id not in seen and not is_stdit_part(b):
                    seen.add(b.id)
                    cands.append(b)
        keep.extend(first_n(state, stages, cands, depth))
    return tuple(keep)


class CidlPolicy(Policy):
    name = PolicyName.CIDL.value

    def __init__(self, options: CidlOptions | None = None) -> None:
        self.options = options or CidlOptions()

    def plan(self, state: PlanState) -> Schedule:
        o = self.options
        app = ConcurrentOptions(loader_threads=o.loader_threads, prefetch_depth=o.prefetch_depth,
                                units=o.units)
        base = ConcurrentPolicy(app).spec(state)
        spec = replace(base, policy=self.name, retained=app_retention(state, o.prefetch_depth),
                       plan_options={**base.plan_options, "variant": self.name})
        return build_first_fit(state, [spec, replace(spec, depth=1)])
