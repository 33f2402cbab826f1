"""Thread counts from the CPUs a process may use: affinity mask and cgroup quotas (v1 and v2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from retriever_server.cpus import cgroup_cpu_quota, cpu_flags, thread_pools, usable_cpus


def _cgroup(tmp_path: Path, proc: str, files: dict[str, str]) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (tmp_path / "proc-cgroup").write_text(proc)
    return root, tmp_path / "proc-cgroup"


def test_cgroup_v2_quota_of_the_process_cgroup_and_its_ancestors(tmp_path):
    root, proc = _cgroup(tmp_path, "0::/kubepods/pod1/c1\n", {
        "kubepods/pod1/c1/cpu.max": "max 100000\n", "kubepods/pod1/cpu.max": "150000 100000\n",
        "cpu.max": "max 100000\n"})
    assert cgroup_cpu_quota(root, proc) == 1.5
    assert usable_cpus(root, proc) == 1  # 1.5 CPUs of time: one thread per whole CPU
    unlimited, proc = _cgroup(tmp_path / "u", "0::/\n", {"cpu.max": "max 100000\n"})
    assert cgroup_cpu_quota(unlimited, proc) is None


def test_cgroup_v1_cfs_quota(tmp_path):
    root, proc = _cgroup(tmp_path, "4:memory:/x\n3:cpu,cpuacct:/slurm/job7\n", {
        "cpu,cpuacct/slurm/job7/cpu.cfs_quota_us": "50000\n", "cpu,cpuacct/slurm/job7/cpu.cfs_period_us": "100000\n",
        "cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"})
    assert cgroup_cpu_quota(root, proc) == 0.5
    assert usable_cpus(root, proc) == 1  # never below one


def test_unreadable_or_garbled_cgroup_files_mean_no_quota(tmp_path):
    root, proc = _cgroup(tmp_path, "garbage without colons\n0::/a\n", {"a/cpu.max": "lots of cpu\n"})
    assert cgroup_cpu_quota(root, proc) is None
    assert cgroup_cpu_quota(tmp_path / "missing", tmp_path / "missing-proc") is None
    assert usable_cpus(tmp_path / "missing", tmp_path / "missing-proc") == len(os.sched_getaffinity(0))


def test_native_thread_pools_are_reported():
    pytest.importorskip("threadpoolctl")
    import numpy  # noqa: F401 - loads a BLAS

    assert any(pool["threads"] >= 1 and pool["library"] for pool in thread_pools())


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to pin to one")
def test_a_service_pinned_to_one_core_runs_one_thread_each(demo_index):
    script = (
        "import json, logging, os, sys\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})\n"
        "from retriever_server.batcher import BatchingConfig\n"
        "from retriever_server.service import LoadOptions, RetrievalService\n"
        "service = RetrievalService(sys.argv[1], LoadOptions(), BatchingConfig())\n"
        "service.load()\n"
        "print(json.dumps({**service.health()['threads'], 'searcher': service.batcher.retriever.searcher.omp_threads}))\n"
        "service.close()\n")
    result = subprocess.run([sys.executable, "-c", script, str(demo_index)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    counts = json.loads(result.stdout.strip().splitlines()[-1])
    assert counts == {"usable_cpus": 1, "torch": 1, "faiss": 1, "searcher": 1}
    assert "threads: 1 usable CPU(s) of" in result.stderr


def test_cpu_flags_are_read_from_the_first_flags_line_and_missing_file_means_unknown(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu avx2 avx512_bf16 amx_bf16\n"
                       "processor\t: 1\nflags\t\t: fpu\n")
    assert cpu_flags(cpuinfo) == {"fpu", "avx2", "avx512_bf16", "amx_bf16"}
    assert cpu_flags(tmp_path / "absent") is None
