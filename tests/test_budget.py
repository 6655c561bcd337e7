"""MemoryBudget: the hard limit, waiting reservations, budget drops, counters."""

from __future__ import annotations

import threading
import time

import pytest

from cidl.runtime.budget import BudgetAborted, BudgetExceeded, MemoryBudget


def _budget(n: int = 1000) -> MemoryBudget:
    return MemoryBudget(n, rss_interval_s=None)


def test_reserve_release_and_counters() -> None:
    b = _budget()
    b.reserve("resident", 400, "a")
    b.reserve("working", 100, "a")
    b.reserve("persistent", 50)
    assert (b.total, b.available, b.held("resident"), b.held_by("a")) == (550, 450, 400, 500)
    b.move("resident", "inflight", 400, "a")
    assert b.held("inflight") == 400 and b.held("resident") == 0 and b.total == 550
    assert b.release_all("a") == 500
    assert b.total == 50 and b.peak == 550
    totals = [s.value for s in b.samples() if s.name == "total"]
    assert totals == [0, 400, 500, 550, 550, 50]
    assert [s.value for s in b.samples() if s.name == "budget"] == [1000]


def test_never_exceeds() -> None:
    b = _budget()
    b.reserve("resident", 900, "a")
    with pytest.raises(BudgetExceeded, match="over by 200 bytes"):
        b.reserve("working", 300, "b", wait=False)
    with pytest.raises(BudgetExceeded, match="can never fit"):
        b.reserve("resident", 1001, "c")
    with pytest.raises(BudgetExceeded, match="still not fitting"):
        b.reserve("resident", 200, "c", timeout=0.05)
    with pytest.raises(ValueError, match="only 900 held"):
        b.release("resident", 901, "a")
    with pytest.raises(ValueError, match="kind"):
        b.reserve("weights", 1)  # type: ignore[arg-type]
    assert b.total == 900 and b.peak == 900


def test_waiting_reservation_wakes_on_release() -> None:
    b = _budget()
    b.reserve("resident", 800, "a")
    got: list[int] = []

    def waiter() -> None:
        b.reserve("inflight", 500, "b")
        got.append(b.total)

    t = threading.Thread(target=waiter)
    t.start()
    time.sleep(0.05)
    assert not got  # still waiting: 800 + 500 > 1000
    b.release("resident", 800, "a")
    t.join(5)
    assert got == [500]


def test_abort_wakes_waiter() -> None:
    b = _budget()
    b.reserve("resident", 1000, "a")
    stop = threading.Event()
    errors: list[BaseException] = []

    def waiter() -> None:
        try:
            b.reserve("resident", 10, "b", abort=stop)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=waiter)
    t.start()
    stop.set()
    t.join(5)
    assert not t.is_alive() and isinstance(errors[0], BudgetAborted)


def test_drop_is_pending_until_it_fits() -> None:
    b = _budget()
    b.reserve("resident", 700, "a")
    assert b.set_budget(500) is True  # a drop: the old budget holds
    assert (b.budget, b.pending) == (1000, 500)
    with pytest.raises(BudgetExceeded, match="200 bytes still accounted"):
        b.commit_pending()
    b.release("resident", 300, "a")
    assert b.commit_pending() == 500
    assert (b.budget, b.pending) == (500, None)
    assert b.set_budget(2000) is False  # a rise applies at once
    assert b.budget == 2000
    assert [s.value for s in b.samples() if s.name == "budget"] == [1000, 500, 2000]


def test_rss_sampler_records_growth() -> None:
    b = MemoryBudget(10**9, rss_interval_s=0.005)
    b.mark_rss_baseline()
    b.start_rss_sampler()
    blob = bytearray(32 * 2**20)  # touch 32 MiB
    for i in range(0, len(blob), 4096):
        blob[i] = 1
    time.sleep(0.05)
    b.stop()
    rss = [s.value for s in b.samples() if s.name == "rss"]
    assert len(rss) >= 2
    assert b.rss_peak_growth >= 16 * 2**20
    del blob
