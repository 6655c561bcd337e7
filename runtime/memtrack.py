"""Measure a block's real working memory: the peak of live tensor bytes it allocates while it runs.

A ``TorchDispatchMode`` sees every op's outputs on the thread that runs it (the mode stack is thread-local,
so execution queues measure independently). A storage counts from the op that creates it until the last
tensor viewing it is freed. Storages that come in (weights, the input carry) are not counted: this is the
same quantity the cost model's ``working_bytes`` estimates on the meta device, measured on real data.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _storage_key(t: torch.Tensor) -> int:
    # The StorageImpl's address: shared by views, unique among live storages (as cidl.runtime.measure keys).
    return t.untyped_storage()._cdata


class LiveBytes(TorchDispatchMode):
    """``with LiveBytes() as m: ...`` then ``m.peak`` (bytes) and ``m.current`` (still alive at exit)."""

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, list[int]] = {}  # key -> [nbytes, tensors alive]
        self._lock = threading.Lock()
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self._account(out, args, kwargs)
        return out

    def _account(self, out: Any, args: Any, kwargs: Any) -> None:
        """Count the storages ``out`` allocates; a view of, or in-place op on, an input storage is not new."""
        inputs: set[int] | None = None  # built lazily: most outputs are new storages
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            key = _storage_key(t)
            with self._lock:
                entry = self._live.get(key)
                if entry is None:
                    if inputs is None:
                        flat = tree_flatten((args, kwargs))[0]
                        inputs = {_storage_key(a) for a in flat if isinstance(a, torch.Tensor)}
                    if key in inputs:
                        continue
                    nbytes = t.untyped_storage().nbytes()
                    self._live[key] = [nbytes, 1]
                    self.current += nbytes
                    self.peak = max(self.peak, self.current)
                else:
                    entry[1] += 1
            weakref.finalize(t, self._drop, key)

    def _drop(self, key: int) -> None:
        with self._lock:
            entry = self._live.get(key)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] == 0:
                self.current -= entry[0]
                del self._live[key]
