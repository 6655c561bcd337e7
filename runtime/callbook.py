"""The data of each stage call while the executor runs it: the caller's input, its batch parts, its output.

A call's carry passes from exec group to exec group. An exec split into ``part_count`` batch parts (STDiT's
CFG halves on two queues) works on its own part's carry; when the next group is split differently the parts
are merged and split again (groups run one after another, so this happens between them). Not thread-safe by
itself: the executor calls it under its lock.
"""

from __future__ import annotations

from dataclasses import dataclass

from cidl.runtime.executor_api import Carry, ExecutorError, Splitter

Key = tuple[int, int]  # (stage index, call)


@dataclass
class _Call:
    parts: list[Carry] | None = None  # None: no input yet, or the output was taken
    result: Carry | None = None
    taken: bool = False


class CallBook:
    def __init__(self, splitters: dict[str, Splitter], stage_models: dict[str, str]) -> None:
        self.splitters = splitters
        self.stage_models = stage_models
        self._calls: dict[Key, _Call] = {}

    def give(self, key: Key, carry: Carry, name: str) -> None:
        """The caller's input for call ``key`` (``name`` for messages)."""
        st = self._calls.setdefault(key, _Call())
        if st.parts is not None or st.result is not None or st.taken:
            raise ExecutorError(f"{name} given twice")
        st.parts = [carry]

    def has_input(self, key: Key) -> bool:
        st = self._calls.get(key)
        return st is not None and st.parts is not None

    def done(self, key: Key) -> bool:
        """Whether the call's last exec group finished (its output may already have been taken)."""
        st = self._calls.get(key)
        return st is not None and (st.result is not None or st.taken)

    def part(self, key: Key, stage: str, part: int, part_count: int) -> Carry:
        """Part ``part`` of ``part_count`` of the call's carry, re-splitting it if the previous group was
        split differently."""
        st = self._calls[key]
        assert st.parts is not None
        if len(st.parts) != part_count:
            sp = self._splitter(stage) if part_count > 1 or len(st.parts) > 1 else None
            whole = st.parts[0] if len(st.parts) == 1 else sp.merge(st.parts)  # type: ignore[union-attr]
            st.parts = [whole] if part_count == 1 else sp.split(whole, part_count)  # type: ignore[union-attr]
        return st.parts[part]

    def put(self, key: Key, part: int, carry: Carry) -> None:
        st = self._calls[key]
        assert st.parts is not None
        st.parts[part] = carry

    def finish(self, key: Key, stage: str) -> None:
        """The call's last group finished: its output is the (merged) carry."""
        st = self._calls[key]
        assert st.parts is not None
        st.result = st.parts[0] if len(st.parts) == 1 else self._splitter(stage).merge(st.parts)

    def take(self, key: Key) -> Carry | None:
        """The output once the call is done (and forget the call's carries), else None."""
        st = self._calls.get(key)
        if st is None or st.result is None:
            return None
        result, st.parts, st.result, st.taken = st.result, None, None, True
        return result

    def _splitter(self, stage: str) -> Splitter:
        model = self.stage_models[stage]
        sp = self.splitters.get(stage) or self.splitters.get(model)
        if sp is None:
            raise ExecutorError(f"stage {stage}: a split call needs a splitter for model {model}")
        return sp
