"""The budget in the simulator: one ``simpy.Container`` of free bytes (get = reserve, put = free).

Gets are served strictly in order (simpy's Container stops at the first get that does not fit), which
gives DESIGN.md's drop semantics for free: a budget drop is a get of ``old - new`` bytes armed at the
re-plan; it completes -- the drop is then in force -- once the evictions it forces have freed enough, and
every reservation of the new Schedule queues behind it. A rise is a put. Beside the container, a ledger
per kind (``resident``, ``inflight``, ``working``, ``persistent``) feeds the trace counters and checks
that the accounted total never exceeds the budget in force.
"""

from __future__ import annotations

from collections.abc import Callable

import simpy

Kind = str  # "resident" | "inflight" | "working" | "persistent"
KINDS = ("resident", "inflight", "working", "persistent")


class FreeBytes(simpy.Container):
    """The Container, with a fast path for the common case: a get that fits while none waits is granted
    without an event, and a put adds its bytes at once (the capacity is unbounded, so puts never wait)."""

    def grab(self, amount: int) -> simpy.Event | None:
        if not self.get_queue and self._level >= amount:
            self._level -= amount
            return None
        return self.get(amount)

    def give(self, amount: int) -> None:
        self._level += amount
        if self.get_queue:
            self._trigger_get(None)


class Memory:
    def __init__(self, env: simpy.Environment, budget_bytes: int, persistent_bytes: int,
                 record: bool) -> None:
        self.env = env
        self.free = FreeBytes(env, init=budget_bytes - persistent_bytes)
        self.budget = budget_bytes  # in force
        self.held: dict[Kind, int] = dict.fromkeys(KINDS, 0)
        self.held["persistent"] = persistent_bytes
        self.total = persistent_bytes
        self.peak = persistent_bytes
        self.record = record
        self.samples: list[tuple[str, float, int]] = []
        if record:
            for k in (*KINDS, "total", "budget"):
                self.samples.append((k, 0.0, self.budget if k == "budget" else self.held.get(k, self.total)))

    # -- reservations: the caller yields the event (None: nothing to wait for), then calls took() --------

    def get(self, nbytes: int) -> simpy.Event | None:
        """None when granted at once; else an event to yield."""
        return self.free.grab(nbytes) if nbytes > 0 else None

    def took(self, kind: Kind, nbytes: int) -> None:
        self._change(kind, nbytes)

    def release(self, kind: Kind, nbytes: int) -> None:
        if nbytes > 0:
            self.free.give(nbytes)
        self._change(kind, -nbytes)

    def move(self, src: Kind, dst: Kind, nbytes: int) -> None:
        self.held[src] -= nbytes
        self.held[dst] += nbytes
        if self.record:
            now = self.env.now
            self.samples.append((src, now, self.held[src]))
            self.samples.append((dst, now, self.held[dst]))

    # -- budget changes ----------------------------------------------------------------------------------

    def arm_drop(self, delta: int, on_commit: Callable[[], None]) -> simpy.Event:
        """A drop by ``delta`` bytes, in force once that many bytes are free."""
        ev = self.free.get(delta)

        def commit(_: simpy.Event) -> None:
            self.budget -= delta
            self._sample_budget()
            on_commit()

        ev.callbacks.append(commit)
        return ev

    def rise(self, delta: int) -> None:
        self.free.give(delta)
        self.budget += delta
        self._sample_budget()

    # -- internals -----------------------------------------------------------------------------------------

    def _sample_budget(self) -> None:
        if self.record:
            self.samples.append(("budget", self.env.now, self.budget))

    def _change(self, kind: Kind, delta: int) -> None:
        if delta == 0:
            return
        self.held[kind] += delta
        self.total += delta
        if self.total > self.budget:
            raise AssertionError(f"accounted {self.total} bytes > budget in force {self.budget} at "
                                 f"t={self.env.now}")  # a simulator bug, never a policy's
        self.peak = max(self.peak, self.total)
        if self.record:
            now = self.env.now
            self.samples.append((kind, now, self.held[kind]))
            self.samples.append(("total", now, self.total))
