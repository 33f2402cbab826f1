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


@contextlib.contextmanager
def ray_start_cluster(num_cpus: int = 3, timeout_s: float = 120.0) -> Iterator[RayStartCluster]:
    # Short: Ray's unix socket paths under RAY_TMPDIR must stay below 108 characters.
    tmp = Path(tempfile.mkdtemp(prefix="ragr1-ray-", dir="/tmp"))
    ray_cli = Path(sys.executable).with_name("ray")
    log = open(tmp / "ray-start.log", "w")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [str(ray_cli), "start", "--head", "--block", f"--port={free_port()}", f"--num-cpus={num_cpus}",
         "--include-dashboard=false", "--disable-usage-stats"],
        env=ray_env(tmp), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    tree: list = []
    try:
        address_file = tmp / "ray" / "ray_current_cluster"
        deadline = time.monotonic() + timeout_s
        while not (address_file.is_file() and {"gcs_server", "raylet"} <= {p.name() for p in alive(descendants(
                process.pid))}):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start failed: {(tmp / 'ray-start.log').read_text()[-3000:]}")
            time.sleep(0.5)
        time.sleep(2.0)  # the raylet registers with the GCS
        tree = descendants(process.pid)
        yield RayStartCluster(tmp, address_file.read_text().strip(), process)
    finally:  # as `ray stop` does, but for this cluster's processes only: SIGTERM to all, then SIGKILL
        tree += descendants(process.pid)
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
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)
