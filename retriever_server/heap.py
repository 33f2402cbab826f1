"""Giving freed heap memory back to the operating system when the server goes idle.

The encoder's batches vary in size from one query to hundreds. glibc's allocator serves each size from
fresh heap pages and keeps the freed pages, spread over its per-thread arenas, for later: measured on the
demo index, 1,000 requests of 1-24 queries grew the resident set by 111 MB. ``malloc_trim(0)`` gives them
back, but not for free: the next batch page-faults its working memory in again, and trimming after every
batch under load cost 10-30% of the throughput of a one-core server (benchmarks/bench_retriever.py). So
:class:`HeapTrimmer` trims once the batcher has had no request for ``idle_s``, and while it stays busy at
most once every ``busy_interval_s``, which bounds the growth at a negligible cost. Elsewhere than on glibc it
does nothing.
"""

from __future__ import annotations

import ctypes
import logging
import time

logger = logging.getLogger(__name__)


def _load_malloc_trim():
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):  # musl, macOS, Windows: no malloc_trim
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


class HeapTrimmer:
    """``malloc_trim(0)`` when idle after work, or after a batch once ``busy_interval_s`` has passed."""

    def __init__(self, idle_s: float = 0.2, busy_interval_s: float = 60.0, enabled: bool = True):
        self.idle_s = idle_s
        self.busy_interval_s = busy_interval_s
        self._trim = _load_malloc_trim() if enabled else None
        self._last = time.monotonic()
        self._dirty = False  # batches ran since the last trim
        self.trims = 0

    @property
    def available(self) -> bool:
        return self._trim is not None

    def after_batch(self) -> None:
        self._dirty = True
        if time.monotonic() - self._last >= self.busy_interval_s:
            self._run()

    def idle(self) -> None:
        """The batcher waited ``idle_s`` without a request."""
        if self._dirty:
            self._run()

    def _run(self) -> None:
        if self._trim is not None:
            self._trim(0)
            self.trims += 1
        self._last, self._dirty = time.monotonic(), False
