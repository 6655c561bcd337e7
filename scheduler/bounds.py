r"""A lower bound on the latency of any schedule the simulator can produce: LB = max(l1 + E/Q, L + e_min).

Definitions (``N`` loader threads, ``U`` the usable queues, ``Q = |U|``, ``o`` the per-load overhead,
``r_f`` one thread's load rate for weight format ``f``, ``R_max`` the storage's total rate):

* ``R = min(R_max, N * max_f r_f)`` over the formats the workload loads -- the highest total storage rate;
* ``t_b = o / N + load_bytes_b / R`` -- the *cost* of one load of block ``b``;
* ``l1 = o + load_bytes_0 / min(r_f0, R_max)`` -- the first block (stage 0, block 0) loading alone;
* ``E`` -- the sum over every call of every stage of each block's fastest whole-call exec time on a queue
  of ``U``; ``e_min`` -- the shortest exec of any part of any call (a call split into
  ``p <= batch_splittable`` parts runs ``flops / p`` per part);
* ``L = sum_{distinct b} t_b + sum_s (calls_s - 1) * max(0, T_s - K_s)``, ``T_s = sum_{b in s} t_b`` and
  ``K_s`` the fractional knapsack of stage ``s``'s blocks (value ``t_b``, weight ``resident_bytes_b``) with
  capacity ``C_s = B_max - persistent - ceil(working_{s,0} / batch_splittable_s)``, ``B_max`` the largest
  budget in force during the run.

Contention is left out; every contention factor is >= 1 (profile validation), so it only lengthens ops.

Proof that each term is <= the makespan ``T`` of any run (any policy, at most ``N`` loader threads, queues
of ``U``, split calls, budget drops), under the semantics of :mod:`cidl.scheduler.sim`:

1. *Exec chain.* Every exec waits for every exec of the previous group, so the first group (stage 0,
   call 0, block 0) starts before any other exec, and it waits for its block's load. A load is a job of work
   ``o + bytes / r_f`` progressing at speed ``<= min(1, R_max / r_f)`` (its share of the storage, further
   divided by contention), so it lasts at least ``l1``: no exec starts before ``l1``. An exec occupies one
   queue from start to end; a call split into ``p`` parts on queues ``q_i`` occupies them for
   ``sum_i (d_{q_i} + flops / p / rate_{q_i}) >= min_q (d_q + flops / rate_q)`` in total (dispatch overheads
   are >= 0). So the queues are busy for at least ``E`` after ``l1``, at most ``Q`` of them at a time:
   ``T >= l1 + E / Q``.

2. *Required loads.* Each block needs a first load before its first exec. For calls ``k`` and ``k+1`` of
   a stage ``s``, let ``tau`` be the start of call ``k+1``'s first exec; every exec of call ``k`` has
   finished by then. A block of the stage with no load starting between the start of its call-``k`` exec
   and the start of its call-``k+1`` exec holds its resident bytes throughout (an eviction in between would
   need such a load). At ``tau``, beside the first exec's working bytes (at least
   ``ceil(working_{s,0} / batch_splittable_s)``) and the persistent bytes, those blocks fit in the budget in
   force, itself ``<= B_max``: their resident bytes are ``<= C_s``, so their summed ``t_b`` is at most the
   0/1 knapsack, hence at most ``K_s``. Each other block of the stage has a load starting in that window:
   at least ``T_s - K_s`` of cost per window. The windows of one block are disjoint and come after its first
   load, so these are distinct loads, ``L`` of cost in all, each followed by an exec of its block that starts
   after the load completes.

   *Cost rate.* With ``n <= N`` loads active, a load of format ``f`` runs at speed
   ``s <= min(1, R_max / (n r_f))`` through its work ``W = o + B / r_f``, so it spends its cost at rate
   ``(o/N + B/R) s / W``. If ``R_max >= n r_f``: ``s <= 1`` and ``R >= n r_f`` (``N max r >= n r_f`` too),
   so the rate is ``<= (o/n + B/(n r_f)) / W = 1/n``. Otherwise ``s <= R_max / (n r_f) < 1`` and the rate is
   ``<= (o/N + B/R) R_max / (n (o r_f + B))``, where ``o R_max / N < o n r_f / N <= o r_f`` and
   ``B R_max / R <= B`` (trivial if ``R = R_max``; if ``R = N max r``, ``< B n r_f / (N max r) <= B``): again
   ``<= 1/n``. Together the active loads spend cost at rate ``<= 1``, so the last required load completes at
   ``t* >= L``, and the exec that follows lasts at least ``e_min``: ``T >= L + e_min``.  QED
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from cidl.device_profiles.profile import DeviceProfile, Unit

from .workload import Block, Workload


@dataclass(frozen=True)
class LowerBound:
    seconds: float
    l1: float
    exec_total: float  # E
    queues: int  # Q
    e_min: float
    load_total: float  # L
    loader_threads: int  # N
    storage_rate: float  # R
    budget_bytes: int  # B_max

    @property
    def compute_term(self) -> float:
        return self.l1 + self.exec_total / self.queues

    @property
    def load_term(self) -> float:
        return self.load_total + self.e_min


def fractional_knapsack(values: Sequence[float], weights: Sequence[int], capacity: float) -> float:
    """Largest value of items (fractions allowed) with total weight <= ``capacity``."""
    if capacity < 0:
        return 0.0
    total = sum(v for v, w in zip(values, weights, strict=True) if w <= 0)
    left = float(capacity)
    for v, w in sorted(((v, w) for v, w in zip(values, weights, strict=True) if w > 0),
                       key=lambda t: t[0] / t[1], reverse=True):
        if left <= 0:
            break
        take = min(1.0, left / w)
        total += v * take
        left -= w * take
    return total


def _units(profile: DeviceProfile, units: Sequence[Unit] | None) -> list[Unit]:
    out = [u for u in ("gpu", "ane", "cpu") if u in profile.units and (units is None or u in units)]
    if not out:
        raise ValueError(f"units {list(units or [])}: none is in profile {profile.name}")
    return out


def _fastest(profile: DeviceProfile, units: list[Unit], block: Block, flops: float) -> float:
    times = [profile.units[u].exec_seconds(flops, block.kernel_dtype) for u in units
             if block.kernel_dtype in profile.units[u].efficiency]
    if not times:
        raise ValueError(f"block {block.id} ({block.kernel_dtype}) runs on none of the queues {units}")
    return min(times)


def lower_bound(
    workload: Workload,
    profile: DeviceProfile,
    budget_bytes: int,
    *,
    loader_threads: int | None = None,
    units: Sequence[Unit] | None = None,
    budget_drops: Sequence[tuple[float, int]] = (),
) -> LowerBound:
    """LB for ``workload`` on ``profile`` (see the module docstring). ``loader_threads`` defaults to the
    profile's; it must be >= the loader threads any schedule of the run uses."""
    ld = profile.loading
    n = loader_threads or ld.loader_threads
    qs = _units(profile, units)
    distinct = workload.distinct_blocks()
    for b in distinct.values():
        if b.dtype not in ld.bytes_per_s:
            raise ValueError(f"profile {profile.name} has no load rate for {b.dtype} (block {b.id})")
    r_top = max(ld.bytes_per_s[b.dtype] for b in distinct.values())
    rate = min(ld.max_total_bytes_per_s, n * r_top)
    cost = {bid: ld.per_load_overhead_s / n + b.load_bytes / rate for bid, b in distinct.items()}
    b_max = max([budget_bytes, *(nb for _, nb in budget_drops)])

    first = workload.stages[0].blocks[0]
    alone = min(ld.bytes_per_s[first.dtype], ld.max_total_bytes_per_s)
    l1 = ld.per_load_overhead_s + first.load_bytes / alone

    exec_total = 0.0
    e_min = math.inf
    load_total = sum(cost.values())
    for stage in workload.stages:
        per_call = sum(_fastest(profile, qs, b, b.flops) for b in stage.blocks)
        exec_total += stage.calls * per_call
        for b in stage.blocks:
            e_min = min(e_min, _fastest(profile, qs, b, b.flops / stage.batch_splittable))
        if stage.calls > 1:
            blocks = list({b.id: b for b in stage.blocks}.values())
            cap = (b_max - workload.persistent_bytes
                   - math.ceil(stage.blocks[0].working_bytes / stage.batch_splittable))
            held = fractional_knapsack([cost[b.id] for b in blocks], [b.resident_bytes for b in blocks], cap)
            stage_cost = sum(cost[b.id] for b in blocks)
            load_total += (stage.calls - 1) * max(0.0, stage_cost - held)
    seconds = max(l1 + exec_total / len(qs), load_total + e_min)
    return LowerBound(seconds=seconds, l1=l1, exec_total=exec_total, queues=len(qs), e_min=e_min,
                      load_total=load_total, loader_threads=n, storage_rate=rate, budget_bytes=b_max)
