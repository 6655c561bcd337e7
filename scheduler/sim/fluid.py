"""Progress-based durations: loads and execs whose speeds change whenever the set of active ones changes.

A job has an amount of *work* in seconds at full speed:

* an exec: ``ComputeUnit.exec_seconds(flops / part_count, dtype)``; speed 1, or ``1 / compute_slowdown``
  while at least one load is active (contention);
* a load: ``per_load_overhead_s + load_bytes / bytes_per_s[fmt]`` -- one loader thread alone; speed
  ``thread_rate(fmt, n) / bytes_per_s[fmt]`` with ``n`` active loads (threads share the storage's total
  bandwidth, the per-load overhead included), divided by ``load_slowdown`` while any exec is active.

Speeds are recomputed at every start and finish (event boundaries); between them each job progresses
linearly. One pending wake-up (a simpy timeout) marks the next completion; a newer plan supersedes it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial

import simpy

from cidl.device_profiles.profile import DeviceProfile

# A job is complete when it would finish within this many seconds (absorbs float rounding).
EPS_S = 1e-9


@dataclass(eq=False)
class Job:
    is_load: bool
    work: float
    done: simpy.Event
    rate: float = 1.0  # loads: one thread's bytes/s for the block's format
    left: float = field(init=False)
    speed: float = 0.0

    def __post_init__(self) -> None:
        self.left = self.work


class Fluid:
    def __init__(self, env: simpy.Environment, profile: DeviceProfile) -> None:
        self.env = env
        self.max_total = profile.loading.max_total_bytes_per_s
        self.load_slow = profile.contention.load_slowdown
        self.compute_slow = profile.contention.compute_slowdown
        self.jobs: list[Job] = []
        self.loads = 0
        self.execs = 0
        self._t = 0.0
        self._gen = 0

    def start(self, job: Job) -> simpy.Event:
        self._advance()
        self.jobs.append(job)
        if job.is_load:
            self.loads += 1
        else:
            self.execs += 1
        self._plan()
        return job.done

    def _advance(self) -> None:
        now = self.env.now
        dt = now - self._t
        if dt > 0:
            for j in self.jobs:
                j.left -= j.speed * dt
        self._t = now

    def _plan(self) -> None:
        self._gen += 1
        if not self.jobs:
            return
        load_speed_cap = self.max_total / self.loads if self.loads else 0.0
        load_div = self.load_slow if self.execs else 1.0
        exec_speed = 1.0 / self.compute_slow if self.loads else 1.0
        nxt = math.inf
        for j in self.jobs:
            j.speed = (min(j.rate, load_speed_cap) / j.rate / load_div) if j.is_load else exec_speed
            nxt = min(nxt, j.left / j.speed)
        wake = self.env.timeout(max(nxt, 0.0))
        wake.callbacks.append(partial(self._wake, self._gen))

    def _wake(self, gen: int, _ev: simpy.Event) -> None:
        if gen != self._gen:
            return  # superseded by a later change
        self._advance()
        still: list[Job] = []
        finished: list[Job] = []
        for j in self.jobs:
            (finished if j.left <= EPS_S * j.speed else still).append(j)
        self.jobs = still
        for j in finished:
            j.left = 0.0
            if j.is_load:
                self.loads -= 1
            else:
                self.execs -= 1
        self._plan()
        for j in finished:
            j.done.succeed()
