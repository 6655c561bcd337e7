"""The lower bound: its terms on hand-made workloads, and that simulated runs never beat it."""

from __future__ import annotations

import pytest

from cidl.device_profiles.profile import DeviceProfile
from cidl.scheduler import lower_bound, simulate
from cidl.scheduler.bounds import fractional_knapsack
from cidl.scheduler.workload import Block, Stage, Workload


def _profile(rate: float = 100.0, total: float = 800.0, overhead: float = 0.0, threads: int = 1,
             units: tuple[str, ...] = ("gpu",)) -> DeviceProfile:
    return DeviceProfile.model_validate({
        "name": "toy", "memory": {"total_bytes": 10**12, "app_budget_bytes": 10**12},
        "loading": {"per_load_overhead_s": overhead, "bytes_per_s": {"fp32": rate},
                    "max_total_bytes_per_s": total, "loader_threads": threads},
        "units": {u: {"peak_flops": 1.0, "efficiency": {"fp32": 1.0}, "dispatch_overhead_s": 0.0}
                  for u in units},
        "contention": {"load_slowdown": 1.5, "compute_slowdown": 1.2}, "calibration": {"calibrated": False}})


def _block(i: int, nbytes: int, flops: int, working: int = 0, model: str = "t5") -> Block:
    return Block(id=f"{model}.b{i}", model=model, index=i, weight_bytes={"fp32": nbytes}, dtype="fp32",
                 resident_bytes=nbytes, flops=flops, working_bytes=working, unit="gpu")


def _wl(blocks: list[Block], calls: int = 1, persistent: int = 0, split: int = 1) -> Workload:
    return Workload(name="toy", preset="tiny", resolution=(64, 64), frames=1, steps=1,
                    persistent_bytes=persistent,
                    stages=[Stage(name="s", model=blocks[0].model, calls=calls, shape={}, blocks=blocks,
                                  batch_splittable=split)])


def test_fractional_knapsack() -> None:
    assert fractional_knapsack([3.0, 2.0], [30, 10], 20) == pytest.approx(2.0 + 1.0)
    assert fractional_knapsack([3.0, 2.0], [30, 10], 100) == pytest.approx(5.0)
    assert fractional_knapsack([3.0, 1.0], [30, 0], 0) == pytest.approx(1.0)  # weightless items are free
    assert fractional_knapsack([3.0], [30], -5) == 0.0


def test_single_pass_terms() -> None:
    wl = _wl([_block(0, 100, 2), _block(1, 200, 3)])
    lb = lower_bound(wl, _profile(), 10**6)
    assert (lb.l1, lb.exec_total, lb.queues, lb.e_min) == (1.0, 5.0, 1, 2.0)
    assert lb.storage_rate == 100.0 and lb.load_total == pytest.approx(3.0)
    assert lb.seconds == pytest.approx(max(1 + 5, 3 + 2))
    # several threads share the storage (800 B/s in total) and split the per-load overhead
    lb2 = lower_bound(wl, _profile(overhead=1.0, threads=2), 10**6)
    assert lb2.storage_rate == 200.0
    assert lb2.load_total == pytest.approx(2 * 0.5 + 300 / 200)
    assert lb2.l1 == pytest.approx(1.0 + 1.0)


def test_repeated_stage_reloads_what_no_budget_can_hold() -> None:
    # 3 calls of two 100-byte blocks (1 s each to load); 150 bytes beside persistent and working: half of
    # one block's cost (fractionally) can stay, the rest reloads twice.
    wl = _wl([_block(0, 100, 1, working=20), _block(1, 100, 1)], calls=3, persistent=30)
    lb = lower_bound(wl, _profile(), 30 + 20 + 150)
    assert lb.load_total == pytest.approx(2.0 + 2 * (2.0 - 1.5))
    roomy = lower_bound(wl, _profile(), 10**6)
    assert roomy.load_total == pytest.approx(2.0)
    # a later budget rise counts: the largest budget in force
    risen = lower_bound(wl, _profile(), 200, budget_drops=[(1.0, 10**6)])
    assert risen.load_total == pytest.approx(2.0)


def test_split_calls_and_queues() -> None:
    wl = _wl([_block(0, 100, 8, model="stdit")], calls=2, split=2)
    lb = lower_bound(wl, _profile(units=("gpu", "ane")), 10**6)
    assert lb.queues == 2 and lb.exec_total == 16.0 and lb.e_min == 4.0
    assert lb.seconds == pytest.approx(max(1 + 16 / 2, 1 + 4))
    only_gpu = lower_bound(wl, _profile(units=("gpu", "ane")), 10**6, units=["gpu"])
    assert only_gpu.queues == 1
    with pytest.raises(ValueError, match="none is in profile"):
        lower_bound(wl, _profile(), 10**6, units=["ane"])


@pytest.mark.parametrize("policy", ["sequential", "concurrent", "cidl", "optimal"])
def test_simulated_latency_never_beats_the_bound(policy: str) -> None:
    wl = _wl([_block(0, 100, 1, working=20), _block(1, 300, 2), _block(2, 50, 4)], calls=4, persistent=30)
    for budget in (30 + 20 + 300, 30 + 20 + 450, 10**6):
        for prof in (_profile(), _profile(overhead=0.3, threads=3, total=150.0)):
            res = simulate(wl, prof, policy, budget)
            assert res.lower_bound_s <= res.latency_s + 1e-9
            threads = max(prof.loading.loader_threads, *(s.loader_threads for s in res.schedules))
            assert res.lower_bound_s == pytest.approx(
                lower_bound(wl, prof, budget, loader_threads=threads).seconds)


def test_bound_is_tight_for_concurrent_two_blocks() -> None:
    wl = _wl([_block(0, 100, 2), _block(1, 200, 3)])
    prof = DeviceProfile.model_validate({**_profile().model_dump(), "contention": {"load_slowdown": 1.0,
                                                                                    "compute_slowdown": 1.0}})
    lb = lower_bound(wl, prof, 10**6).seconds
    assert simulate(wl, prof, "concurrent", 10**6).latency_s == pytest.approx(lb)
