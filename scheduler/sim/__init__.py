"""The discrete-event simulator (simpy): Schedules on a DeviceProfile, with contention and a hard budget.

Never imports torch: ``cidl simulate`` starts in about a second.
"""

from __future__ import annotations

from .processes import DeadlockError, SimRun, SimulationError
from .simulator import SimResult, evaluate, make_policy, simulate

__all__ = ["DeadlockError", "SimResult", "SimRun", "SimulationError", "evaluate", "make_policy", "simulate"]
