"""Child processes of the CPU demo: run a trainer with its output in a log, and stop its whole tree after.

verl's trainers start Ray, whose processes (raylet, GCS, workers) may outlive a trainer that dies. Their ids
are remembered while the trainer runs, so that each of them can be stopped at the end, however the run ends.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

logger = logging.getLogger(__name__)


class ProcessTree:
    """A process's descendants (Ray's included), remembered while it runs so that every one of them can be
    stopped by id at the end, even those the trainer leaves behind when it dies."""

    def __init__(self, pid: int):
        self.pid, self.known, self._checked = pid, set(), 0.0

    def refresh(self, force: bool = False) -> None:
        if not force and time.monotonic() - self._checked < 2.0:
            return
        self._checked = time.monotonic()
        with contextlib.suppress(Exception):
            import psutil

            self.known.update(child.pid for child in psutil.Process(self.pid).children(recursive=True))

    def survivors(self, timeout: float = 0.0) -> list[int]:
        """The tree's processes still running after up to ``timeout`` seconds."""
        return _wait_gone(self.known, timeout)

    def stop(self, process: subprocess.Popen) -> None:
        """Stop the trainer (if still running), then whatever of its tree outlives it: Ray's processes get
        a grace period to exit on their own after a normal end, then SIGTERM, then SIGKILL."""
        self.refresh(force=True)
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)  # the trainer's own session, started by us
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=20)
        if process.poll() is None:
            process.kill()
            process.wait()
        leftovers = self.survivors(timeout=10.0)
        for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
            if not leftovers:
                break
            logger.info("stopping %d leftover trainer/Ray process(es): %s", len(leftovers), leftovers)
            for pid in leftovers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            leftovers = _wait_gone(leftovers, timeout=grace)


def _wait_gone(pids: set[int] | list[int], timeout: float) -> list[int]:
    """The pids still running after up to ``timeout`` seconds."""
    import psutil

    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for pid in pids:
            with contextlib.suppress(psutil.Error):
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.2)


def run_logged(command: Sequence[str], *, log: Path, cwd: Path, env: Mapping[str, str],
               on_line: Callable[[str], None] = lambda line: None) -> int:
    """Run ``command`` in its own session with stdout and stderr in ``log``, calling ``on_line`` for each
    line; its process tree is stopped afterwards. Ctrl-C (or SIGTERM turned into it) gives exit code 130."""
    with open(log, "w", encoding="utf-8") as handle:
        process = subprocess.Popen(list(command), cwd=cwd, env=dict(env), stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, start_new_session=True)
        family = ProcessTree(process.pid)
        try:
            for line in process.stdout:
                handle.write(line)
                on_line(line)
                family.refresh()
            return process.wait()
        except KeyboardInterrupt:
            logger.warning("interrupted: stopping %s", Path(command[0]).name if command else "the command")
            return 130
        finally:
            family.stop(process)
