"""The Schedule semantics as bookkeeping: what each op waits for, and what starting and finishing it changes.

No threads and no clock: the executor calls this under its lock and turns "waits for X" into waiting on a
condition variable. The rules are ``cidl.scheduler.schedule``'s, as the simulator applies them:

* ``load``: its lane free, then its resident bytes fit;
* ``exec``: its block's load done, every exec of the previous exec group (the block before it in the
  pipeline -- across call and stage boundaries) done, its queue free, its working bytes fit (the runtime
  also waits for the call's input from the pipeline glue);
* ``evict``: its block's load done and every exec of the block issued before it done.
"""

from __future__ import annotations

from collections.abc import Callable

from cidl.runtime.executor_api import ExecutorError
from cidl.scheduler.schedule import EvictOp, ExecOp, LoadOp, Op
from cidl.scheduler.workload import Workload

GroupKey = tuple[int, int, int]  # (stage index, call, block index in the stage)


class OpState:
    def __init__(self, workload: Workload) -> None:
        self.workload = workload
        self.stage_index = {s.name: i for i, s in enumerate(workload.stages)}
        self._index = [{b.id: i for i, b in enumerate(s.blocks)} for s in workload.stages]
        self.blocks: dict[str, str] = {}  # block -> "loading" | "resident"
        self.lanes_busy: set[int] = set()
        self.queues_busy: set[str] = set()
        self.running_execs = 0
        self.evicting = 0
        self._open_execs: dict[str, int] = {}  # block -> issued, unfinished execs
        self._parts_done: dict[GroupKey, set[int]] = {}
        self._parts: dict[GroupKey, int] = {}

    # ------------------------------------------------------------------------------------------ waits

    def blocker(self, op: Op, *, fits: Callable[[int], bool], load_bytes: int, exec_bytes: int,
                has_input: Callable[[int, int], bool]) -> str | None:
        """What ``op`` still waits for, or None when it can start now. Raises ExecutorError for an op that
        contradicts the state (a Schedule bug), naming it."""
        if isinstance(op, LoadOp):
            if op.block in self.blocks:
                raise ExecutorError(f"load({op.block}): block is already {self.blocks[op.block]}")
            if op.lane in self.lanes_busy:
                return f"lane loader-{op.lane}"
            return None if fits(load_bytes) else f"{load_bytes} bytes of memory for {op.block}"
        if isinstance(op, ExecOp):
            s = self.stage_index[op.stage]
            state = self.blocks.get(op.block)
            if state is None:
                raise ExecutorError(f"exec({op.block}, {op.stage} call {op.call}): block is neither resident "
                                    "nor being loaded")
            if state != "resident":
                return f"the load of {op.block}"
            prev = self.prev_group(s, op.call, op.block)
            if prev is not None and not self.group_done(prev):
                return f"the previous exec group {self.group_name(prev)}"
            if op.queue in self.queues_busy:
                return f"queue {op.queue}"
            if not has_input(s, op.call):
                return f"the input of call {op.call} of {op.stage}"
            return None if fits(exec_bytes) else f"{exec_bytes} working bytes for {op.block}"
        assert isinstance(op, EvictOp)
        state = self.blocks.get(op.block)
        if state is None:
            raise ExecutorError(f"evict({op.block}): block is not resident")
        if state == "loading":
            return f"the load of {op.block}"
        if self._open_execs.get(op.block, 0):
            return f"{self._open_execs[op.block]} exec(s) of {op.block} listed before it"
        return None

    # ------------------------------------------------------------------------------------ transitions

    def start_load(self, op: LoadOp) -> None:
        self.blocks[op.block] = "loading"
        self.lanes_busy.add(op.lane)

    def end_load(self, op: LoadOp) -> None:
        self.blocks[op.block] = "resident"
        self.lanes_busy.discard(op.lane)

    def start_exec(self, op: ExecOp) -> GroupKey:
        key = self.group_of(op)
        self.queues_busy.add(op.queue)
        self.running_execs += 1
        self._open_execs[op.block] = self._open_execs.get(op.block, 0) + 1
        self._parts[key] = op.part_count
        return key

    def end_exec(self, op: ExecOp) -> bool:
        """Returns whether this exec completed the last exec group of its call."""
        key = self.group_of(op)
        self.queues_busy.discard(op.queue)
        self.running_execs -= 1
        self._open_execs[op.block] -= 1
        self._parts_done.setdefault(key, set()).add(op.part)
        return key[2] == len(self.workload.stages[key[0]].blocks) - 1 and self.group_done(key)

    def start_evict(self) -> None:
        self.evicting += 1

    def end_evict(self, block: str) -> None:
        self.blocks.pop(block, None)
        self.evicting -= 1

    def busy(self) -> bool:
        """Whether a load, an exec or an eviction is in progress."""
        return bool(self.lanes_busy or self.running_execs or self.evicting)

    # ---------------------------------------------------------------------------------------- groups

    def group_of(self, op: ExecOp) -> GroupKey:
        s = self.stage_index[op.stage]
        return (s, op.call, self.block_index(s, op.block))

    def prev_group(self, s: int, c: int, block_id: str) -> GroupKey | None:
        i = self.block_index(s, block_id)
        if i > 0:
            return (s, c, i - 1)
        if c > 0:
            return (s, c - 1, len(self.workload.stages[s].blocks) - 1)
        if s > 0:
            prev = self.workload.stages[s - 1]
            return (s - 1, prev.calls - 1, len(prev.blocks) - 1)
        return None

    def group_done(self, key: GroupKey) -> bool:
        total = self._parts.get(key)
        return total is not None and len(self._parts_done.get(key, ())) >= total

    def block_index(self, s: int, block_id: str) -> int:
        i = self._index[s].get(block_id)
        if i is None:
            raise ExecutorError(f"block {block_id} is not in stage {self.workload.stages[s].name}")
        return i

    def group_name(self, key: GroupKey) -> str:
        s, c, i = key
        return f"{self.workload.stages[s].blocks[i].id} ({self.workload.stages[s].name} call {c})"
