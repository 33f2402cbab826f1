"""How many CPUs this process may really use, what its thread pools run with, and the CPU's feature flags.

``os.cpu_count()`` counts the machine's cores. A server pinned by Slurm, Kubernetes or ``taskset`` may run
on fewer (its affinity mask), or get a CPU quota from its cgroup; OpenMP and torch threads beyond that
spin against each other on the same cores. :func:`usable_cpus` takes the smallest of the three.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

logger = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
CPUINFO = Path("/proc/cpuinfo")


def cpu_flags(cpuinfo: Path = CPUINFO) -> frozenset[str] | None:
    """The CPU's feature flags as Linux lists them (``avx512_bf16``, ``amx_bf16``, ...); None off Linux."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def usable_cpus(cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int:
    """min(affinity mask, cgroup CPU quota rounded down), at least 1."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        count = os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup_root, proc_cgroup)
    if quota is not None:
        count = min(count, max(1, math.floor(quota)))
    return max(1, count)


def cgroup_cpu_quota(cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> float | None:
    """CPUs' worth of time the process's cgroup allows (cgroup v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``);
    None when unlimited or unknown. The tightest limit between the process's cgroup and the root wins."""
    limits = [limit for folder in _cgroup_folders(cgroup_root, proc_cgroup)
              if (limit := _read_quota(folder)) is not None]
    return min(limits) if limits else None


def _cgroup_folders(cgroup_root: Path, proc_cgroup: Path) -> list[Path]:
    """The process's own cgroup folders and their ancestors up to the root, for v2 and v1 (``cpu``)."""
    try:
        lines = proc_cgroup.read_text(encoding="utf-8").splitlines()
    except OSError:
        lines = []
    folders = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and not controllers:
            base = cgroup_root
        elif "cpu" in controllers.split(","):
            base = cgroup_root / controllers
        else:
            continue
        relative = Path(path.lstrip("/"))
        folders += [base / ancestor for ancestor in (relative, *relative.parents)]
    return folders or [cgroup_root, cgroup_root / "cpu"]


def _read_quota(folder: Path) -> float | None:
    try:
        text = (folder / "cpu.max").read_text(encoding="ascii").split()
        if text and text[0] != "max":
            return int(text[0]) / int(text[1])
        return None
    except (OSError, ValueError, IndexError):
        pass
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text(encoding="ascii"))
        period = int((folder / "cpu.cfs_period_us").read_text(encoding="ascii"))
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def thread_pools() -> list[dict]:
    """What the native thread pools (OpenMP, BLAS) really run with, through threadpoolctl if installed."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    return [{"library": pool.get("internal_api"), "threads": pool.get("num_threads"),
             "file": os.path.basename(pool.get("filepath") or "")} for pool in threadpool_info()]


def log_thread_counts(cpus: int, torch_threads: int, faiss_threads: int) -> None:
    pools = ", ".join(f"{pool['library']} {pool['threads']} ({pool['file']})" for pool in thread_pools())
    logger.info("threads: %d usable CPU(s) of %d; torch %d, faiss %d for large batches (1 below 16 queries); "
                "native pools: %s", cpus, os.cpu_count() or 1, torch_threads, faiss_threads, pools or "unknown")
