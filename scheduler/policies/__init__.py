"""Scheduling policies, keyed by :class:`PolicyName`: ``sequential``, ``concurrent``, ``cidl``, ``optimal``.

Each is a small class whose one method turns the state at a re-plan point into the Schedule for the rest
of the run. Use :func:`create_policy` (or ``cidl.scheduler.make_policy``, which also gives ``optimal`` the
simulator as its evaluator).
"""

from __future__ import annotations

from .base import (
    CidlOptions,
    ConcurrentOptions,
    Evaluator,
    OptimalOptions,
    Policy,
    PolicyName,
    PolicyOptions,
    SequentialOptions,
    make_options,
    parse_policy_name,
)
from .builder import Infeasible, PlanSpec, build
from .cidl import CidlPolicy
from .concurrent import ConcurrentPolicy
from .optimal import OptimalPolicy, OptimalVariant
from .sequential import SequentialPolicy

REGISTRY: dict[PolicyName, type[Policy]] = {
    PolicyName.SEQUENTIAL: SequentialPolicy,
    PolicyName.CONCURRENT: ConcurrentPolicy,
    PolicyName.CIDL: CidlPolicy,
    PolicyName.OPTIMAL: OptimalPolicy,
}


def create_policy(
    name: str | PolicyName,
    options: SequentialOptions | ConcurrentOptions | CidlOptions | OptimalOptions | None = None,
    *,
    evaluator: Evaluator | None = None,
) -> Policy:
    """The policy ``name`` with ``options`` (their ``kind`` must match); ``optimal`` uses ``evaluator``."""
    pname = parse_policy_name(str(name))
    if options is not None and options.kind != pname.value:
        raise ValueError(f"options.kind is {options.kind!r} but the policy is {pname.value!r}")
    if pname is PolicyName.OPTIMAL:
        return OptimalPolicy(options, evaluator)  # type: ignore[arg-type]
    return REGISTRY[pname](options)  # type: ignore[call-arg]


__all__ = [
    "REGISTRY", "CidlOptions", "CidlPolicy", "ConcurrentOptions", "ConcurrentPolicy", "Evaluator",
    "Infeasible", "OptimalOptions", "OptimalPolicy", "OptimalVariant", "PlanSpec", "Policy", "PolicyName",
    "PolicyOptions", "SequentialOptions", "SequentialPolicy", "build", "create_policy", "make_options",
    "parse_policy_name",
]
