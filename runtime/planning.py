"""What the runtime asks at a re-plan point, and ``emulate`` mode's time scale.

``make_planner`` wraps a policy of ``cidl.scheduler.policies`` (the very objects the simulator calls) as the
executor's :class:`~cidl.runtime.executor.Planner`; with ``ladder=True`` it instead follows Schedules
precomputed for a ladder of budgets, picking a rung from the budget in force -- no planner at run time, as
the phone agent does.

``resolve_time_scale``: a host slower than the emulated device cannot finish a kernel within the device's
predicted time. ``auto`` stretches every predicted duration by the worst ratio, over every load and exec
of the workload, of the host's predicted duration (its measured profile) to the device's, times the host's
worst contention factor (kernels and loads share two cores here); never below 1.
"""

from __future__ import annotations

from typing import Any, Literal

from cidl.device_profiles.profile import DeviceProfile, Unit
from cidl.runtime.executor import ReplanPoint
from cidl.scheduler.plan import BudgetTooSmall, PlanState, check_feasible, min_feasible_budget
from cidl.scheduler.policies import Policy
from cidl.scheduler.schedule import EvictOp, LoadOp, Schedule
from cidl.scheduler.workload import Block, Workload


def _unit_for(profile: DeviceProfile, block: Block) -> Unit:
    usable = profile.units_for(block.kernel_dtype)
    if not usable:
        raise ValueError(f"profile {profile.name}: no compute unit runs {block.kernel_dtype} (block {block.id})")
    return block.unit if block.unit in usable else usable[0]


def _exec_s(profile: DeviceProfile, block: Block, parts: int) -> float:
    unit = profile.units[_unit_for(profile, block)]
    return unit.exec_seconds(block.flops / parts, block.kernel_dtype)


def _load_s(profile: DeviceProfile, block: Block) -> float:
    ld = profile.loading
    return ld.per_load_overhead_s + block.load_bytes / ld.thread_rate(block.dtype, 1)


def resolve_time_scale(
    time_scale: float | Literal["auto"],
    workload: Workload,
    profile: DeviceProfile | None,
    host_workload: Workload,
    host_profile: DeviceProfile | None,
) -> tuple[float, dict[str, Any]]:
    """(scale, notes for the trace meta). See the module docstring."""
    if time_scale != "auto":
        scale = float(time_scale)
        if not scale > 0:
            raise ValueError(f"--time-scale: expected > 0 or auto, got {time_scale}")
        return scale, {"time_scale_source": "given"}
    if profile is None or host_profile is None:
        raise ValueError("--time-scale auto needs the emulated profile and a host profile")
    worst, where = 0.0, ""
    for st, hst in zip(workload.stages, host_workload.stages, strict=True):
        parts = st.batch_splittable
        for b, hb in zip(st.blocks, hst.blocks, strict=True):
            for kind, dev, host in (
                ("exec", _exec_s(profile, b, parts), _exec_s(host_profile, hb, parts)),
                ("load", _load_s(profile, b), _load_s(host_profile, hb)),
            ):
                ratio = host / max(dev, 1e-12)
                if ratio > worst:
                    worst, where = ratio, f"{kind} {b.id} ({st.name})"
    c = host_profile.contention
    margin = max(c.load_slowdown, c.compute_slowdown)
    scale = max(1.0, worst * margin)
    return scale, {"time_scale_source": "auto", "time_scale_worst_ratio": round(worst, 4),
                   "time_scale_worst_op": where, "time_scale_margin": round(margin, 4)}


# ------------------------------------------------------------------------------------------------ planners


def plan_state(point: ReplanPoint, workload: Workload, profile: DeviceProfile) -> PlanState:
    """The scheduler's PlanState for an executor's re-plan point."""
    return PlanState(workload=workload, profile=profile, budget_bytes=point.budget_bytes, stage=point.stage,
                     call=point.call, resident=frozenset(point.resident),
                     measured_working=point.measured_working, reason=point.reason,  # type: ignore[arg-type]
                     current=point.current, time_s=point.time_s)


class PolicyPlanner:
    """Calls a scheduler policy at every re-plan point (the simulator calls the same object)."""

    def __init__(self, policy: Policy, workload: Workload, profile: DeviceProfile) -> None:
        self.policy, self.workload, self.profile = policy, workload, profile

    def plan(self, point: ReplanPoint) -> Schedule:
        return self.policy.plan(plan_state(point, self.workload, self.profile))


def resident_at(schedule: Schedule, stage: str, call: int) -> set[str]:
    """Blocks a Schedule has resident (or loading) when it reaches call ``call`` of ``stage``."""
    res: set[str] = set()

    def apply(ops: list[Any]) -> None:
        for op in ops:
            if isinstance(op, LoadOp):
                res.add(op.block)
            elif isinstance(op, EvictOp):
                res.discard(op.block)

    apply(schedule.prologue)
    for co in schedule.calls:
        if (co.stage, co.call) == (stage, call):
            return res
        apply(co.ops)
    raise ValueError(f"Schedule {schedule.content_hash()} has no call {call} of stage {stage}")


def full_run_schedule(policy: Policy, workload: Workload, profile: DeviceProfile, budget: int) -> Schedule:
    """One Schedule for the whole run: the policy's plan at the start, spliced with its re-plans after the
    first call of each repeated stage (working memory = the cost model's, as the simulator assumes), so a
    device without a planner follows what a planner would have done."""
    sched = policy.plan(PlanState(workload=workload, profile=profile, budget_bytes=budget))
    measured: dict[str, dict[str, int]] = {}
    for s, stage in enumerate(workload.stages):
        if stage.calls < 2:
            continue
        measured[stage.name] = {b.id: b.working_bytes for b in stage.blocks}
        state = PlanState(workload=workload, profile=profile, budget_bytes=budget, stage=s, call=1,
                          resident=frozenset(resident_at(sched, stage.name, 1)), measured_working=measured,
                          reason="first-call", current=sched)
        later = policy.plan(state)
        at = next(n for n, co in enumerate(sched.calls) if (co.stage, co.call) == (stage.name, 1))
        first = later.calls[0]
        calls = [*sched.calls[:at], first.model_copy(update={"ops": [*later.prologue, *first.ops]}),
                 *later.calls[1:]]
        sched = sched.model_copy(update={
            "calls": calls, "retained": sorted(set(sched.retained) | set(later.retained)),
            "loader_threads": max(sched.loader_threads, later.loader_threads),
            "planned_peak_bytes": max(sched.planned_peak_bytes, later.planned_peak_bytes)})
    return sched


def ladder_budgets(low: int, high: int, rungs: int) -> list[int]:
    """``rungs`` budgets from ``low`` to ``high``, evenly spaced (distinct, ascending)."""
    if rungs < 1:
        raise ValueError(f"ladder rungs: expected >= 1, got {rungs}")
    if high <= low or rungs == 1:
        return [max(low, high)] if rungs == 1 else [low]
    return sorted({round(low + (high - low) * i / (rungs - 1)) for i in range(rungs)})


class LadderPlanner:
    """No planning at run time: Schedules precomputed for a ladder of budgets (each planned once from the
    start of the run), the rung for the budget in force picked at the start and at every budget change.

    Switching to another rung at a call boundary: evict what the new rung does not hold there, load what it
    does (its own earlier ops would have loaded it), then follow its op lists from that call on.
    """

    def __init__(self, policy: Policy, workload: Workload, profile: DeviceProfile,
                 budgets: list[int]) -> None:
        self.workload = workload
        self.rungs = [(b, full_run_schedule(policy, workload, profile, b)) for b in sorted(budgets)]
        self.current: int | None = None
        self.switches: list[dict[str, Any]] = []

    def rung_for(self, budget: int) -> int:
        fits = [i for i, (b, _) in enumerate(self.rungs) if b <= budget]
        if not fits:
            low = self.rungs[0][0]
            raise BudgetTooSmall(self.workload.name, budget, low, "below the ladder's lowest rung")
        return fits[-1]

    def plan(self, point: ReplanPoint) -> Schedule | None:
        if point.reason == "first-call":
            return None  # the phone has no planner: measured memory changes nothing
        i = self.rung_for(point.budget_bytes)
        if i == self.current:
            return None
        self.current = i
        budget, sched = self.rungs[i]
        self.switches.append({"stage": point.stage, "call": point.call, "rung": i, "budget_bytes": budget,
                              "rung_schedule": sched.content_hash()})
        if point.reason == "start":
            return sched
        stage = self.workload.stages[point.stage].name
        want = resident_at(sched, stage, point.call)
        have = set(point.resident)
        prologue: list[Any] = [EvictOp(block=b) for b in sorted(have - want)]
        prologue += [LoadOp(block=b, lane=n % sched.loader_threads) for n, b in enumerate(
            b for b in self.workload.distinct_blocks() if b in want - have)]
        calls = list(sched.calls)
        start = next(n for n, co in enumerate(calls) if (co.stage, co.call) == (stage, point.call))
        return sched.model_copy(update={"start_stage": point.stage, "start_call": point.call,
                                        "prologue": prologue, "calls": calls[start:]})


def make_planner(policy: str, workload: Workload, profile: DeviceProfile, budget_bytes: int,
                 loader_threads: int | None, *, ladder: bool = False,
                 rungs: int = 8) -> PolicyPlanner | LadderPlanner:
    """The executor's planner for ``policy`` (``optimal`` gets the simulator as its evaluator)."""
    from cidl.scheduler.policies import make_options
    from cidl.scheduler.sim.simulator import make_policy

    pol = make_policy(policy, make_options(policy, loader_threads=loader_threads))
    if not ladder:
        return PolicyPlanner(pol, workload, profile)
    low = min_feasible_budget(workload)
    check_feasible(workload, budget_bytes)
    return LadderPlanner(pol, workload, profile, ladder_budgets(low, budget_bytes, rungs))
