"""Make freed block memory go back to the OS, so process RSS follows the accounted bytes.

glibc serves large allocations with mmap and returns them on free, but its mmap threshold is *dynamic*:
after the first free of an mmapped chunk, allocations up to that size (32 MiB at most) come from the
heap arenas instead — per thread, so every loader thread has its own — and freed arena memory stays in the
process. Loading and evicting blocks whose tensors are a few MiB to tens of MiB (STDiT's weights) then
strands gigabytes (measured: +1.9 GB of RSS after loading and evicting 14 full-size STDiT blocks twice;
0 with a fixed threshold). Setting the threshold explicitly turns the dynamic adjustment off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading

M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
MMAP_THRESHOLD_BYTES = 1 << 20  # tensors of 1 MiB and more are mmapped and returned to the OS on free

_lock = threading.Lock()
_configured: bool | None = None


def configure_allocator() -> bool:
    """Fix glibc's mmap threshold (idempotent; a no-op returning False off glibc)."""
    global _configured
    with _lock:
        if _configured is None:
            _configured = False
            name = ctypes.util.find_library("c")
            if name:
                try:
                    libc = ctypes.CDLL(name)
                    _configured = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
                except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to fix there
                    _configured = False
        return _configured
