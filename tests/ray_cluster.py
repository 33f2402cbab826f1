"""A Ray cluster started by ``ray start --head --block``, as a user starts one, in a temp folder of its own.

Its ``RAY_TMPDIR`` holds the ``ray_current_cluster`` address file that ``ray start`` writes, so a process
given that ``RAY_TMPDIR`` sees the cluster as it would see one started by a user on the machine, and nothing
else on the machine is touched: the cluster is stopped through its own ``ray start`` process (SIGTERM), and
whatever of its process tree survives is stopped by pid.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def descendants(pid: int) -> list:
    """psutil processes under ``pid`` (empty when it is gone)."""
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def alive(processes) -> list:
    """The processes still running (a zombie has ended: only its parent has not collected it yet)."""
    import psutil

    running = []
    for process in processes:
        with contextlib.suppress(psutil.Error):
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                running.append(process)
    return running


def wait_gone(processes, timeout_s: float) -> list:
    deadline = time.monotonic() + timeout_s
    while (left := alive(processes)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def stop_processes(processes) -> None:
    import psutil

    for process in alive(processes):
        with contextlib.suppress(psutil.Error):
            process.kill()
    wait_gone(processes, 5.0)


def ray_env(tmp: str | os.PathLike, **extra: str) -> dict[str, str]:
    """The environment of a process that should see only what lives in ``tmp`` (and no RAY_ADDRESS)."""
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    return {**env, "RAY_TMPDIR": str(tmp), **extra}


@dataclass
class RayStartCluster:
    tmp: Path  # its RAY_TMPDIR: <tmp>/ray/ray_current_cluster names it
    address: str
    process: subprocess.Popen  # ``ray start --block``

    def processes(self) -> list:
        return descendants(self.process.pid)

    def env(self, **extra: str) -> dict[str, str]:
        return ray_env(self.tmp, **extra)


READY_LINE = "will now block forever"  # `ray start --block`, once its node has registered with the GCS


def _start(tmp: Path, num_cpus: int, timeout_s: float) -> tuple[subprocess.Popen | None, list]:
    """One `ray start --block` in ``tmp``: (the process, or None when it failed; its process tree)."""
    ray_cli = Path(sys.executable).with_name("ray")
    with open(tmp / "ray-start.log", "w") as log:
        process = subprocess.Popen(
            [str(ray_cli), "start", "--head", "--block", f"--port={free_port()}", f"--num-cpus={num_cpus}",
             "--include-dashboard=false", "--disable-usage-stats"],
            env=ray_env(tmp), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    tree, deadline = [], time.monotonic() + timeout_s
    while READY_LINE not in (tmp / "ray-start.log").read_text(errors="replace"):
        tree += [p for p in descendants(process.pid) if p not in tree]
        if process.poll() is not None or time.monotonic() > deadline:
            _stop(process, tree)
            return None, []
        time.sleep(0.5)
    return process, descendants(process.pid)


def _stop(process: subprocess.Popen, tree: list) -> None:
    """As `ray stop` does, but for this cluster's processes only: SIGTERM to all, then SIGKILL."""
    tree = tree + [p for p in descendants(process.pid) if p not in tree]
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    for member in alive(tree):
        with contextlib.suppress(Exception):
            member.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=5)
    if process.poll() is None:
        process.kill()
        process.wait()
    wait_gone(tree, 5.0)
    stop_processes(tree)


@contextlib.contextmanager
def ray_start_cluster(num_cpus: int = 3, timeout_s: float = 120.0, attempts: int = 2) -> Iterator[RayStartCluster]:
    """A started cluster for the block. `ray start` gives its node 30 s to register with the GCS, which a
    machine busy with other tests can miss: it is tried ``attempts`` times."""
    # Short: Ray's unix socket paths under RAY_TMPDIR must stay below 108 characters.
    tmp = Path(tempfile.mkdtemp(prefix="ragr1-ray-", dir="/tmp"))
    process, tree = None, []
    try:
        for _ in range(attempts):
            process, tree = _start(tmp, num_cpus, timeout_s)
            if process is not None:
                break
        if process is None:
            raise RuntimeError(f"ray start failed: {(tmp / 'ray-start.log').read_text()[-3000:]}")
        address = (tmp / "ray" / "ray_current_cluster").read_text().strip()
        yield RayStartCluster(tmp, address, process)
    finally:
        if process is not None:
            _stop(process, tree)
        shutil.rmtree(tmp, ignore_errors=True)
