"""Every thread's stack on demand (``kill -USR1 <pid>``), for a server that seems stuck.

faulthandler's own dump stops after 100 threads, newest first, so with waitress's 128 worker threads it never
reaches the main thread or the batcher. This one names each thread and prints threads with the same stack
(idle workers) once, with their count.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import traceback
from collections import defaultdict


def format_stacks() -> str:
    """Each distinct stack once, headed by the names of the threads that are in it (main thread first)."""
    names = {thread.ident: thread.name for thread in threading.enumerate()}
    threads_by_stack: dict[str, list[str]] = defaultdict(list)
    for ident, frame in sys._current_frames().items():
        threads_by_stack["".join(traceback.format_stack(frame))].append(names.get(ident, f"thread {ident}"))
    main = threading.main_thread().name
    ordered = sorted(threads_by_stack.items(), key=lambda item: (main not in item[1], item[1][0]))
    parts = [f"--- {len(threads)} thread(s): {', '.join(sorted(threads)[:8])}"
             f"{' ...' if len(threads) > 8 else ''}\n{stack}" for stack, threads in ordered]
    return "=== stacks of every thread (SIGUSR1) ===\n" + "".join(parts) + "=== end of stacks ===\n"


def install(signum: int = signal.SIGUSR1) -> None:
    """Print :func:`format_stacks` to stderr on ``signum``. Written to the descriptor, not through logging or
    sys.stderr, whose locks a stuck thread may hold."""

    def dump(*_) -> None:
        os.write(2, format_stacks().encode("utf-8", "replace"))

    signal.signal(signum, dump)
