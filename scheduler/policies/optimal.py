"""``optimal`` (ours): the best plan we know, and never worse than ``cidl``.

A candidate (:class:`OptimalVariant`) overlaps from the very first block (no sequential measuring step),
prefetches ``depth`` blocks ahead across call *and* model boundaries (T5 -> STDiT -> VAE), spreads loads
over ``lanes`` loader threads, runs each block on its fastest queue -- splitting a call's batch halves across
queues when that is faster -- and keeps resident the blocks of repeated models that save the most reload time
per byte (a 0/1 knapsack: benefit = one load's time x the reloads it avoids; capacity = the budget less the
persistent bytes and what the streamed blocks need).

:class:`OptimalPolicy` searches depth, lanes and splitting, and also considers ``cidl`` itself; with an
:data:`~cidl.scheduler.policies.base.Evaluator` it keeps the candidate predicted fastest from the state.
At the start of a run the evaluator simulates each candidate's whole run (its re-plans included), exactly
what the simulator then does, so the result is never slower than ``cidl``. At a later first-call re-plan it
continues with the candidate it chose (recorded in ``Schedule.plan_options``); after a budget change it
chooses again.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from cidl.device_profiles.profile import Unit

from ..plan import PlanState
from ..schedule import Schedule
from .base import CidlOptions, Evaluator, OptimalOptions, Policy, PolicyName
from .builder import PlanSpec
from .cidl import CidlPolicy
from .common import (
    build_first_fit,
    continuation,
    fastest_queues,
    knapsack,
    load_seconds,
    measured_as_planned,
    repeated_models,
    splittable,
    stream_reserve,
)


def knapsack_retention(state: PlanState, depth: int) -> tuple[str, ...]:
    """Blocks to keep across calls, highest benefit per byte first."""
    keep: list[tuple[float, str]] = []
    for _model, stages in repeated_models(state).items():
        uses: dict[str, int] = {}
        blocks = {}
        for s, _c in state.remaining_calls():
            if s in stages:
                for b in state.workload.stages[s].blocks:
                    uses[b.id] = uses.get(b.id, 0) + 1
                    blocks[b.id] = b
        ids = list(blocks)
        values = [load_seconds(state.profile, blocks[i]) * (uses[i] - (0 if i in state.resident else 1))
                  for i in ids]
        weights = [blocks[i].resident_bytes for i in ids]
        cap = state.budget_bytes - state.workload.persistent_bytes - stream_reserve(state, stages, depth)
        for j in knapsack(values, weights, cap):
            keep.append((values[j] / max(1, weights[j]), ids[j]))
    keep.sort(key=lambda t: (-t[0], t[1]))
    return tuple(b for _, b in keep)


class OptimalVariant(Policy):
    """One candidate of ``optimal``, with fixed depth, lanes and splitting."""

    name = PolicyName.OPTIMAL.value

    def __init__(self, depth: int, lanes: int, split: bool, units: list[Unit] | None = None) -> None:
        self.depth, self.lanes, self.split, self.units = depth, lanes, split, units

    def describe(self) -> dict[str, Any]:
        return {"variant": "optimal", "depth": self.depth, "lanes": self.lanes, "split": self.split}

    def plan(self, state: PlanState) -> Schedule:
        cur = state.current
        if (state.reason == "first-call" and cur is not None and cur.plan_options == self.describe()
                and cur.budget_bytes == state.budget_bytes and measured_as_planned(state)):
            return continuation(cur, state)  # planned with exact working sizes: nothing to change
        spec = PlanSpec(
            policy=self.name, retained=knapsack_retention(state, self.depth), depth=self.depth,
            lanes=self.lanes, cross_model=True, queues=fastest_queues(state, self.units, self.split),
            plan_options=self.describe(),
        )
        return build_first_fit(state, [spec, replace(spec, depth=1)])

    def __repr__(self) -> str:
        return f"OptimalVariant(depth={self.depth}, lanes={self.lanes}, split={self.split})"


class OptimalPolicy(Policy):
    name = PolicyName.OPTIMAL.value

    def __init__(self, options: OptimalOptions | None = None, evaluator: Evaluator | None = None) -> None:
        self.options = options or OptimalOptions()
        self.evaluator = evaluator

    def candidates(self, state: PlanState) -> list[Policy]:
        """Best guess first (what is used without an evaluator), ``cidl`` last."""
        o = self.options
        prof_threads = state.profile.loading.loader_threads
        lanes = [o.loader_threads] if o.loader_threads else sorted({prof_threads, 1}, reverse=True)
        depths = [o.prefetch_depth] if o.prefetch_depth else [2, 1, *range(3, o.max_prefetch_depth + 1)]
        depths = [d for d in depths if d <= max(o.max_prefetch_depth, o.prefetch_depth or 0)]
        splits = [True, False] if o.split_calls and splittable(state, o.units) else [False]
        out: list[Policy] = [OptimalVariant(d, n, sp, o.units)
                             for sp in splits for n in lanes for d in depths]
        out.append(CidlPolicy(CidlOptions(units=o.units)))
        return out

    def _resume(self, options: dict[str, Any]) -> Policy | None:
        if options.get("variant") == "optimal":
            return OptimalVariant(int(options["depth"]), int(options["lanes"]), bool(options["split"]),
                                  self.options.units)
        if options.get("variant") == "cidl":
            return CidlPolicy(CidlOptions(units=self.options.units))
        return None

    def choose(self, state: PlanState) -> Policy:
        cur = state.current
        if state.reason == "first-call" and cur is not None and cur.policy == self.name:
            resumed = self._resume(cur.plan_options)
            if resumed is not None:
                return resumed
        cands = self.candidates(state)
        if self.evaluator is None or len(cands) == 1:
            return cands[0]
        best, chosen = math.inf, cands[0]
        for cand in cands:
            t = self.evaluator(state, cand)
            if t < best:
                best, chosen = t, cand
        return chosen

    def plan(self, state: PlanState) -> Schedule:
        chosen = self.choose(state)
        sched = chosen.plan(state)
        return sched.model_copy(update={"policy": self.name, "plan_options": dict(sched.plan_options)})
