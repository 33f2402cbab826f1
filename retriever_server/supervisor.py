"""``ragr1-retriever serve --ray`` runs the server in a child process and watches it.

A Ray driver is ended by Ray itself when the raylet of its node dies (``_exit``: no Python code runs, no
log line but in Ray's own log file): a cluster whose head goes down takes the server with it, silently.
The parent, which never touches Ray, turns that into one clear log line and the child's exit status, and
stops whatever the child's processes leave behind:

- the child runs in its own session; SIGTERM or SIGINT to the parent is passed on as one SIGTERM (the
  child drains and stops its Ray instance), a second one kills it;
- the child is killed if the parent dies (``PR_SET_PDEATHSIG``, set by the parent's only thread);
- the parent is the "subreaper" of the child's descendants (``PR_SET_CHILD_SUBREAPER``): Ray processes
  orphaned by a child that died are re-parented to it, and stopped once the child has ended;
- the child tells the parent through a pipe where Ray logs, what went wrong (``problem``) and that it
  stopped on its own (``done``); a child that ends without ``done`` is reported with its exit status, its
  last problem and the line where Ray says why it ended the process.

The parent's own exit status is the child's (128 + the signal when it was killed).
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from retriever_server.environment import SUPERVISED  # in the child: the pipe to the parent

logger = logging.getLogger("ragr1-retriever")

_PR_SET_PDEATHSIG, _PR_SET_CHILD_SUBREAPER = 1, 36
_RAY_LAST_WORDS = ("Exiting because", "will terminate", "Check failed", " F ")  # Ray ending the process


def _prctl(option: int, value: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _die_with_parent() -> None:  # in the child, between fork and exec
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class Report:
    """The child's side of the pipe (a no-op when not supervised)."""

    def __init__(self) -> None:
        fd = os.environ.pop(SUPERVISED, None)
        self._pipe = os.fdopen(int(fd), "w", buffering=1) if fd else None

    def send(self, kind: str, text: str = "") -> None:
        if self._pipe is not None:
            with contextlib.suppress(OSError, ValueError):
                self._pipe.write(f"{kind} {text}".strip() + "\n")


def supervise(argv: list[str], command: list[str] | None = None) -> int:
    """Run ``ragr1-retriever <argv>`` (or ``command``) as a supervised child; returns its exit status."""
    subreaper = _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    read_fd, write_fd = os.pipe()
    env = dict(os.environ, **{SUPERVISED: str(write_fd)})
    command = command or [sys.executable, "-m", "retriever_server.cli", *argv]
    child = subprocess.Popen(command, env=env, pass_fds=(write_fd,), start_new_session=True,
                             preexec_fn=_die_with_parent)
    os.close(write_fd)
    messages: dict[str, str] = {}
    reader = threading.Thread(target=_read_messages, args=(read_fd, messages), name="ragr1-supervisor", daemon=True)
    reader.start()
    signals = []

    def forward(signum, _frame) -> None:
        signals.append(signum)
        with contextlib.suppress(ProcessLookupError):
            if len(signals) == 1:
                child.send_signal(signal.SIGTERM)
            else:
                logger.warning("stopping again: killing the serving process (pid %d)", child.pid)
                child.kill()

    previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = child.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    reader.join(timeout=2)
    if "done" not in messages:
        how = f"was killed by {_signal_name(-code)}" if code < 0 else f"exited with status {code}"
        words = _ray_last_words(messages.get("ray-logs"), child.pid)
        logger.error("stopped: the serving process (pid %d) %s without stopping on its own%s%s", child.pid, how,
                     f", after: {messages['problem']}" if messages.get("problem") else "",
                     f"; Ray's last words: {words}" if words else "")
    if subreaper:
        _stop_orphans()
        _prctl(_PR_SET_CHILD_SUBREAPER, 0)
    if "done" in messages and messages["done"].isdigit():
        return int(messages["done"])
    return 128 - code if code < 0 else code or 1


def _read_messages(fd: int, messages: dict[str, str]) -> None:
    with os.fdopen(fd, "r") as pipe:
        for line in pipe:
            kind, _, text = line.strip().partition(" ")
            messages[kind] = text


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _ray_last_words(logs_dir: str | None, pid: int) -> str | None:
    """The last error line of the child's Ray driver log (where Ray says why it ended the process)."""
    patterns = [os.path.join(logs_dir, f"python-core-driver-*_{pid}.log")] if logs_dir else []
    base = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    patterns.append(os.path.join(base, "ray", "session_*", "logs", f"python-core-driver-*_{pid}.log"))
    for pattern in patterns:
        for path in sorted(glob.glob(pattern), key=os.path.getmtime, reverse=True):
            with contextlib.suppress(OSError):
                lines = Path(path).read_text(errors="replace").splitlines()[-200:]
                for line in reversed(lines):
                    if any(mark in line for mark in _RAY_LAST_WORDS):
                        return line.strip()
    return None


def _stop_orphans(grace_s: float = 3.0) -> None:
    """Stop the processes the child left (re-parented to us as their subreaper), then reap them."""
    try:
        import psutil
    except ImportError:
        return
    deadline = time.monotonic() + grace_s
    while True:
        _reap()
        left = [p for p in psutil.Process().children(recursive=True) if _running(p)]
        if not left or time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    for stop in ("terminate", "kill"):
        if not left:
            break
        logger.info("stopping %d process(es) the serving process left: %s", len(left),
                    ", ".join(f"{_name(p)} (pid {p.pid})" for p in left))
        for process in left:
            with contextlib.suppress(psutil.Error):
                getattr(process, stop)()
        _, left = psutil.wait_procs(left, timeout=2)
    _reap()


def _running(process) -> bool:
    import psutil

    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _name(process) -> str:
    try:
        return process.name()
    except Exception:  # noqa: BLE001
        return "?"


def _reap() -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
