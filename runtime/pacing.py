"""``emulate`` mode: pad every load and exec to the duration a DeviceProfile predicts for it.

Kernels still run at host speed (for correct outputs); the pacer then holds each op until its *emulated*
completion. Emulated progress is a fluid model integrated exactly between changes of the set of active ops,
the same rules the simulator uses (``cidl.device_profiles.profile``):

* a load costs ``per_load_overhead_s + load_bytes / bytes_per_s[fmt]`` alone, at speed
  ``thread_rate(fmt, n) / bytes_per_s[fmt]`` with ``n`` loads in progress, ``contention.load_slowdown``
  times slower while any exec is in progress (``cidl.scheduler.sim.fluid``);
* an exec costs ``ComputeUnit.exec_seconds(flops / part_count, dtype)`` on its queue's unit,
  ``contention.compute_slowdown`` times slower while any load is in progress.

Times here are device seconds. A host slower than the device cannot finish a kernel within its emulated
time; the run then stretches every predicted duration by ``time_scale`` (wall seconds per device second):
the executor's clock divides wall time by it, so traces stay in device seconds. Ops whose real work still
outran their padded time are counted as *overruns* and reported in the trace meta.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from cidl.device_profiles.profile import DeviceProfile
from cidl.runtime.budget import BudgetAborted
from cidl.scheduler.schedule import ExecOp, LoadOp
from cidl.scheduler.workload import Block

_EPS = 1e-9  # as the simulator's EPS_S


@dataclass
class _Job:
    is_load: bool
    left: float  # device seconds of work left at full speed
    rate: float = 1.0  # loads: one thread's bytes/s for the block's format
    finish: float | None = None


def predicted_seconds(profile: DeviceProfile, op: LoadOp | ExecOp, block: Block) -> float:
    """The op's duration on an otherwise idle device (one load, no contention)."""
    if isinstance(op, LoadOp):
        ld = profile.loading
        return ld.per_load_overhead_s + block.load_bytes / ld.thread_rate(block.dtype, 1)
    return _exec_seconds(profile, op, block)


def _exec_seconds(profile: DeviceProfile, op: ExecOp, block: Block) -> float:
    unit = profile.units.get(op.queue)
    if unit is None:
        raise ValueError(f"profile {profile.name}: no compute unit {op.queue!r} for exec of {block.id}")
    return unit.exec_seconds(block.flops / op.part_count, block.kernel_dtype)


class ProfilePacer:
    """Holds each op until its emulated completion; ``clock`` returns device seconds."""

    def __init__(self, profile: DeviceProfile, time_scale: float, clock: Callable[[], float]) -> None:
        if not time_scale > 0:
            raise ValueError(f"time_scale: expected > 0, got {time_scale}")
        self.profile = profile
        self.time_scale = float(time_scale)
        self.clock = clock
        self._cond = threading.Condition()
        self._acts: dict[object, _Job] = {}
        self._last = 0.0
        self.overruns = 0
        self.overrun_s = 0.0
        self.max_overrun_s = 0.0
        self.padded_ops = 0

    def begin(self, key: object, op: LoadOp | ExecOp, block: Block) -> None:
        with self._cond:
            self._advance(self.clock())
            if isinstance(op, LoadOp):
                ld = self.profile.loading
                rate = ld.bytes_per_s[block.dtype]
                job = _Job(True, ld.per_load_overhead_s + block.load_bytes / rate, rate)
            else:
                job = _Job(False, _exec_seconds(self.profile, op, block))
            self._acts[key] = job
            self._cond.notify_all()

    def wait(self, key: object, abort: threading.Event) -> None:
        """Sleep until the op's emulated completion (at once if the real work already outran it)."""
        with self._cond:
            while True:
                if abort.is_set():
                    self._acts.pop(key, None)
                    raise BudgetAborted("run stopping")
                now = self.clock()
                self._advance(now)
                act = self._acts[key]
                if act.finish is not None:
                    late = now - act.finish
                    if late > 1e-3:
                        self.overruns += 1
                        self.overrun_s += late
                        self.max_overrun_s = max(self.max_overrun_s, late)
                    else:
                        self.padded_ops += 1
                    del self._acts[key]
                    self._cond.notify_all()
                    return
                eta = self._eta(act)
                self._cond.wait(max(1e-4, min(0.5, eta * self.time_scale)))

    def stats(self) -> dict[str, float]:
        return {"padded_ops": self.padded_ops, "overruns": self.overruns,
                "overrun_s": round(self.overrun_s, 6), "max_overrun_s": round(self.max_overrun_s, 6)}

    # ---------------------------------------------------------------------------------------- model

    def _speeds(self) -> list[tuple[_Job, float]]:
        """Each unfinished job's speed now (the simulator's ``Fluid._plan``)."""
        live = [j for j in self._acts.values() if j.finish is None]
        loads = sum(j.is_load for j in live)
        execs = len(live) - loads
        c = self.profile.contention
        cap = self.profile.loading.max_total_bytes_per_s / loads if loads else 0.0
        load_div = c.load_slowdown if execs else 1.0
        exec_speed = 1.0 / c.compute_slowdown if loads else 1.0
        return [(j, min(j.rate, cap) / j.rate / load_div if j.is_load else exec_speed) for j in live]

    def _eta(self, job: _Job) -> float:
        speed = dict((id(j), v) for j, v in self._speeds()).get(id(job), 1.0)
        return job.left / speed

    def _advance(self, now: float) -> None:
        """Integrate progress from the last change to ``now``, stepping at every completion."""
        t = self._last
        while t < now:
            speeds = self._speeds()
            if not speeds:
                break
            dt = min(min(j.left / v for j, v in speeds), now - t)
            for j, v in speeds:
                j.left -= v * dt
            t += dt
            for j, v in speeds:
                if j.left <= _EPS * v:
                    j.left, j.finish = 0.0, t
        self._last = max(self._last, now)
