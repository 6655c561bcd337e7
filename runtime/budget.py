"""MemoryBudget: the one object that accounts the runtime's bytes against a hard limit (DESIGN.md).

Accounted bytes = resident weights (in the form the kernel uses them) + in-flight load buffers + working
bytes of running execs + persistent tensors. Every byte the executor holds goes through ``reserve`` and
``release``; nothing else decides what fits. A reservation that can never fit, or one made without waiting
that does not fit now, raises :class:`BudgetExceeded` -- the total never exceeds the budget in force.

A budget *drop* (memory pressure) is pending until the evictions it forces have completed: the executor
evicts, then calls :meth:`MemoryBudget.commit_pending`; until then the old budget holds. A rise applies at
once. Every change is recorded as a counter sample (``resident``, ``inflight``, ``working``,
``persistent``, ``total``, ``budget``) with its time, and a background thread samples the process RSS
beside them (``rss``: growth over the baseline marked just before the first load).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal

import psutil

from cidl.device_profiles.units import format_size
from cidl.traces.model import CounterSample

Kind = Literal["resident", "inflight", "working", "persistent"]
KINDS: tuple[Kind, ...] = ("resident", "inflight", "working", "persistent")


class BudgetExceeded(MemoryError):
    """A reservation that does not fit the budget in force (and will not, or may not wait)."""


class BudgetAborted(RuntimeError):
    """A waiting reservation was abandoned because the run is stopping."""


class MemoryBudget:
    """Thread-safe byte accounting under a hard limit.

    ``cond`` lets an executor share one condition variable with the budget, so a thread that waits for
    "memory or anything else" wakes on every change. ``clock`` gives seconds since the start of the run.
    """

    def __init__(
        self,
        budget_bytes: int,
        *,
        cond: threading.Condition | None = None,
        clock: Callable[[], float] | None = None,
        rss_interval_s: float | None = 0.01,
    ) -> None:
        if budget_bytes <= 0:
            raise ValueError(f"budget_bytes: expected > 0, got {budget_bytes}")
        self.cond = cond or threading.Condition(threading.RLock())
        t0 = time.perf_counter()
        self._clock = clock or (lambda: time.perf_counter() - t0)
        self._budget = int(budget_bytes)
        self._pending: int | None = None
        self._held: dict[Kind, int] = dict.fromkeys(KINDS, 0)
        self._ledger: dict[tuple[Kind, str | None], int] = {}
        self._samples: list[CounterSample] = []
        self._peak = 0
        self._rss_interval = rss_interval_s
        self._rss_thread: threading.Thread | None = None
        self._rss_stop = threading.Event()
        self._proc = psutil.Process()
        self._rss_baseline: int | None = None
        self._rss_peak = 0
        with self.cond:
            self._record(("budget",), force_total=True)

    # ------------------------------------------------------------------------------------------ state

    @property
    def budget(self) -> int:
        """The budget in force (a pending drop is not yet in force)."""
        return self._budget

    @property
    def pending(self) -> int | None:
        """A budget drop waiting for its evictions, or None."""
        return self._pending

    @property
    def total(self) -> int:
        return sum(self._held.values())

    def held(self, kind: Kind) -> int:
        return self._held[kind]

    def held_by(self, block: str) -> int:
        """Bytes of every kind held for ``block``."""
        with self.cond:
            return sum(v for (_, b), v in self._ledger.items() if b == block)

    @property
    def available(self) -> int:
        return self._budget - self.total

    @property
    def peak(self) -> int:
        """Highest accounted total so far."""
        return self._peak

    def fits(self, nbytes: int) -> bool:
        return self.total + nbytes <= self._budget

    # --------------------------------------------------------------------------------- reserve/release

    def reserve(
        self,
        kind: Kind,
        nbytes: int,
        block: str | None = None,
        *,
        wait: bool = True,
        timeout: float | None = None,
        abort: threading.Event | None = None,
    ) -> None:
        """Account ``nbytes`` of ``kind`` for ``block``; wait (if allowed) while they do not fit.

        Raises BudgetExceeded when the bytes exceed the whole budget, when ``wait`` is False and they do
        not fit now, or when ``timeout`` passes; BudgetAborted when ``abort`` is set while waiting.
        """
        self._check_kind(kind, nbytes)
        with self.cond:
            if nbytes > self._budget:
                raise BudgetExceeded(self._msg(kind, nbytes, block, "can never fit"))
            deadline = None if timeout is None else time.monotonic() + timeout
            while not self.fits(nbytes):
                if not wait:
                    raise BudgetExceeded(self._msg(kind, nbytes, block, "does not fit now"))
                if abort is not None and abort.is_set():
                    raise BudgetAborted(f"reservation of {kind} bytes for {block} abandoned: run stopping")
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    why = f"still not fitting after {timeout} s"
                    raise BudgetExceeded(self._msg(kind, nbytes, block, why))
                self.cond.wait(0.05 if left is None else min(0.05, left))
            self._add(kind, block, nbytes)
            self._record((kind,))

    def release(self, kind: Kind, nbytes: int, block: str | None = None) -> None:
        """Give back bytes reserved earlier for the same ``(kind, block)``."""
        self._check_kind(kind, nbytes)
        with self.cond:
            have = self._ledger.get((kind, block), 0)
            if nbytes > have:
                raise ValueError(f"release of {nbytes} {kind} bytes for {block}: only {have} held")
            self._add(kind, block, -nbytes)
            self._record((kind,))

    def release_all(self, block: str) -> int:
        """Release every kind held for ``block``; returns the bytes freed."""
        with self.cond:
            freed = 0
            kinds: list[Kind] = []
            for (kind, b), v in list(self._ledger.items()):
                if b == block and v:
                    self._add(kind, b, -v)
                    freed += v
                    kinds.append(kind)
            if kinds:
                self._record(tuple(kinds))
            return freed

    def move(self, src: Kind, dst: Kind, nbytes: int, block: str | None = None) -> None:
        """Re-label held bytes (a finished load's buffer becomes resident weights) without a gap."""
        self._check_kind(src, nbytes)
        self._check_kind(dst, nbytes)
        with self.cond:
            have = self._ledger.get((src, block), 0)
            if nbytes > have:
                raise ValueError(f"move of {nbytes} {src} bytes for {block}: only {have} held")
            self._add(src, block, -nbytes)
            self._add(dst, block, nbytes)
            self._record((src, dst))

    @contextmanager
    def hold(self, kind: Kind, nbytes: int, block: str | None = None, **kw: object) -> Iterator[None]:
        """``reserve`` for the duration of a ``with`` block."""
        self.reserve(kind, nbytes, block, **kw)  # type: ignore[arg-type]
        try:
            yield
        finally:
            self.release(kind, nbytes, block)

    # ----------------------------------------------------------------------------------- budget changes

    def set_budget(self, new_bytes: int) -> bool:
        """Change the budget. A rise applies at once (returns False); a drop is pending (returns True)
        until :meth:`commit_pending`, because it takes effect only once its evictions have completed."""
        if new_bytes <= 0:
            raise ValueError(f"budget: expected > 0 bytes, got {new_bytes}")
        with self.cond:
            if new_bytes >= self._budget:
                self._budget, self._pending = int(new_bytes), None
                self._record(("budget",))
                self.cond.notify_all()
                return False
            self._pending = int(new_bytes)
            self.cond.notify_all()
            return True

    def commit_pending(self) -> int:
        """Put a pending drop in force once the total fits it; raises BudgetExceeded naming the excess."""
        with self.cond:
            if self._pending is None:
                return self._budget
            if self.total > self._pending:
                raise BudgetExceeded(
                    f"budget drop to {format_size(self._pending)} cannot take effect: "
                    f"{self.total - self._pending} bytes still accounted over it"
                )
            self._budget, self._pending = self._pending, None
            self._record(("budget",))
            self.cond.notify_all()
            return self._budget

    # -------------------------------------------------------------------------------------------- RSS

    def rss(self) -> int:
        return int(self._proc.memory_info().rss)

    def mark_rss_baseline(self) -> int:
        """The RSS just before the first load; the ``rss`` counter is growth over it."""
        self._rss_baseline = self.rss()
        self._rss_peak = self._rss_baseline
        return self._rss_baseline

    @property
    def rss_baseline(self) -> int | None:
        return self._rss_baseline

    @property
    def rss_peak_growth(self) -> int:
        """Highest sampled RSS minus the baseline (0 before a baseline is marked)."""
        if self._rss_baseline is None:
            return 0
        return max(0, self._rss_peak - self._rss_baseline)

    def start_rss_sampler(self) -> None:
        if self._rss_interval is None or self._rss_thread is not None:
            return
        if self._rss_baseline is None:
            self.mark_rss_baseline()
        self._rss_stop.clear()
        self._rss_thread = threading.Thread(target=self._sample_rss, name="cidl-rss", daemon=True)
        self._rss_thread.start()

    def stop(self) -> None:
        """Stop the RSS sampler (and take one last sample)."""
        if self._rss_thread is not None:
            self._rss_stop.set()
            self._rss_thread.join()
            self._rss_thread = None
        if self._rss_baseline is not None:
            self._sample_rss_once()

    def _sample_rss(self) -> None:
        assert self._rss_interval is not None
        while not self._rss_stop.wait(self._rss_interval):
            self._sample_rss_once()

    def _sample_rss_once(self) -> None:
        value = self.rss()
        with self.cond:
            self._rss_peak = max(self._rss_peak, value)
            base = self._rss_baseline or 0
            self._samples.append(CounterSample(name="rss", ts=max(0.0, self._clock()), value=value - base))

    # ---------------------------------------------------------------------------------------- records

    def restart_samples(self) -> None:
        """Forget the samples so far and record the current state anew (the run's clock restarted)."""
        with self.cond:
            self._samples.clear()
            self._record(("budget",), force_total=True)

    def samples(self) -> list[CounterSample]:
        """Every counter sample so far, in recording order (ties in time keep that order)."""
        with self.cond:
            return list(self._samples)

    def _add(self, kind: Kind, block: str | None, delta: int) -> None:
        key = (kind, block)
        value = self._ledger.get(key, 0) + delta
        if value:
            self._ledger[key] = value
        else:
            self._ledger.pop(key, None)
        self._held[kind] += delta
        total = self.total
        if total > self._budget:  # unreachable through reserve(); a guard against accounting bugs
            raise BudgetExceeded(f"accounted {total} bytes over the budget of {self._budget}")
        self._peak = max(self._peak, total)
        if delta < 0:
            self.cond.notify_all()

    def _record(self, names: tuple[str, ...], force_total: bool = False) -> None:
        ts = max(0.0, self._clock())
        for name in dict.fromkeys(names):
            value = self._budget if name == "budget" else self._held[name]  # type: ignore[index]
            self._samples.append(CounterSample(name=name, ts=ts, value=value))  # type: ignore[arg-type]
        if force_total or any(n != "budget" for n in names):
            if force_total:
                for kind in KINDS:
                    self._samples.append(CounterSample(name=kind, ts=ts, value=self._held[kind]))
            self._samples.append(CounterSample(name="total", ts=ts, value=self.total))

    def _msg(self, kind: Kind, nbytes: int, block: str | None, why: str) -> str:
        over = self.total + nbytes - self._budget
        return (
            f"{kind} reservation of {nbytes} bytes for {block or 'the run'} {why}: budget "
            f"{self._budget} ({format_size(self._budget)}), {self.total} accounted, over by {over} bytes"
        )

    @staticmethod
    def _check_kind(kind: str, nbytes: int) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind: expected one of {', '.join(KINDS)}, got {kind!r}")
        if nbytes < 0:
            raise ValueError(f"nbytes: expected >= 0, got {nbytes}")
