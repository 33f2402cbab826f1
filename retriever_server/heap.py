"""Giving freed heap memory back to the operating system between batches.

The encoder's batches vary in size from one query to hundreds. glibc's allocator serves each size from
fresh heap pages and keeps the freed pages, spread over its per-thread arenas, for later: measured on the
demo index, 320 batches of 1-96 queries grew the resident set from 560 MB to 840 MB, and ``malloc_trim(0)``
after each batch kept it at 585 MB for about 2 ms a call. :class:`HeapTrimmer` trims when the server goes
idle, and at most once per interval while it is busy. Elsewhere than on glibc it does nothing.
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
    """Calls ``malloc_trim(0)`` after a batch when nothing is queued, or once ``interval_s`` has passed."""

    def __init__(self, interval_s: float = 1.0, enabled: bool = True):
        self.interval_s = interval_s
        self._trim = _load_malloc_trim() if enabled else None
        self._last = time.monotonic()
        self.trims = 0

    @property
    def available(self) -> bool:
        return self._trim is not None

    def after_batch(self, idle: bool) -> None:
        if self._trim is None:
            return
        now = time.monotonic()
        if idle or now - self._last >= self.interval_s:
            self._trim(0)
            self._last = time.monotonic()
            self.trims += 1
