"""cidl.scheduler: workloads, Schedules, policies, the lower bound and the simulator (no torch).

Public API::

    from cidl.scheduler import simulate, make_policy, lower_bound, open_sora_workload, PolicyName
    res = simulate(open_sora_workload(), profile, "cidl", 3_300_000_000)
    res.latency_s, res.lower_bound_s, res.trace
"""

from __future__ import annotations

from .bounds import LowerBound, lower_bound
from .pipeline import open_sora_workload
from .plan import BudgetTooSmall, PlanState, check_feasible, min_feasible_budget, resident_before
from .policies import (
    CidlOptions,
    ConcurrentOptions,
    OptimalOptions,
    Policy,
    PolicyName,
    PolicyOptions,
    SequentialOptions,
    create_policy,
    make_options,
)
from .schedule import CallOps, EvictOp, ExecOp, LoadOp, Schedule
from .sim import DeadlockError, SimResult, SimulationError, evaluate, make_policy, simulate
from .workload import Block, Stage, Workload

__all__ = [
    "Block", "BudgetTooSmall", "CallOps", "CidlOptions", "ConcurrentOptions", "DeadlockError", "EvictOp",
    "ExecOp", "LoadOp", "LowerBound", "OptimalOptions", "PlanState", "Policy", "PolicyName", "PolicyOptions",
    "Schedule", "SequentialOptions", "SimResult", "SimulationError", "Stage", "Workload", "check_feasible",
    "create_policy", "evaluate", "lower_bound", "make_options", "make_policy", "min_feasible_budget",
    "open_sora_workload", "resident_before", "simulate",
]
