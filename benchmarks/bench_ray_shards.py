"""The sharded retriever on Ray Serve against the single-process server, in one run on one machine.

For each entry of ``--shards`` (default ``0,1,2,4``; 0 is the single-process server, N > 0 the index cut
into N shards served as Ray Serve deployments on a local Ray instance, or ``--ray-address``), the same
HTTP front is loaded with the cells of ``bench_retriever.py`` (``--concurrency``, default 32,64, and
``--queries-per-request``, default 1,3). Reported per configuration: index load time, resident memory of
each shard replica, and per cell queries/s, p50/p99 and the overhead against the single-process server.

Every other option is ``bench_retriever.py``'s (the synthetic index, its size, the load generator). On a
2-core machine the shards, the front and the load generator share the cores, so sharding can only cost:
the numbers measure that overhead (scatter, Ray calls, merge), not a speed-up.

Run from the repository root: ``python benchmarks/bench_ray_shards.py`` (about 6 minutes on 2 cores, the
index build included the first time).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_retriever as base  # noqa: E402
from bench_common import HelpFormatter, cpu_model  # noqa: E402


def shard_folder(whole: Path, workdir: Path, shards: int) -> Path:
    from retriever_server.manifest import MANIFEST_NAME
    from retriever_server.sharding import shard_index

    folder = workdir / f"{whole.name}-shards-{shards}"
    if not (folder / MANIFEST_NAME).exists():
        shard_index(whole, folder, shards, overwrite=True)
    return folder


def replica_rss_mib() -> list[float]:
    """Resident memory of every shard replica (its process title names it): this process's own Ray
    instance's, else those of the cluster on this machine."""
    import psutil

    def replicas(processes) -> list:
        return [p for p in processes if p.name().startswith("ray::ServeReplica:") and ":shard-" in p.name()]

    found = replicas(psutil.Process().children(recursive=True)) or replicas(psutil.process_iter())
    return [process.memory_info().rss / 2**20 for process in found]


def measure(args, bench_args, whole: Path, shards: int, raw_limit: float | None) -> dict:
    from retriever_server.app import create_app
    from retriever_server.batcher import BatchingConfig
    from retriever_server.http_server import ServingLimits, WaitressServer
    from retriever_server.ray_serve import RayDeployer, RayPlacement
    from retriever_server.service import LoadOptions, RetrievalService

    folder = whole if shards == 0 else shard_folder(whole, Path(bench_args.workdir), shards)
    deployer = None if shards == 0 else RayDeployer(RayPlacement(address=args.ray_address, shard_cpus=args.shard_cpus))
    service = RetrievalService(folder, LoadOptions(deployer=deployer, omp_threads=bench_args.omp_threads,
                                                   torch_threads=bench_args.torch_threads),
                               BatchingConfig(max_wait_ms=bench_args.max_wait_ms))
    started = time.perf_counter()
    service.load()
    load_s = time.perf_counter() - started
    server = None
    try:
        if raw_limit is None:
            stream = base.QueryStream(0, 0, 0.0, bench_args.seed)
            raw_limit = base.measure_raw_limit(service.batcher.retriever, stream, bench_args.raw_batches,
                                               bench_args.raw_seconds, bench_args.topk)["best_queries_per_s"]
        rss = replica_rss_mib() if shards else []
        server = WaitressServer(create_app(service), port=0, limits=ServingLimits(threads=bench_args.http_threads))
        server.start_in_thread()
        print(f"{shards or 'no'} shards: loaded in {load_s:.1f} s; serving on {server.url}", flush=True)
        rows = base.run_cells(bench_args, server.url, raw_limit, 0)
    finally:
        if server is not None:
            server.stop()
        service.close()
    return {"shards": shards, "load_s": load_s, "rss_mib": rss, "rows": rows, "raw_limit": raw_limit}


def print_results(results: list[dict]) -> None:
    single = {(r["concurrency"], r["queries_per_request"]): r for r in results[0]["rows"]} \
        if results and results[0]["shards"] == 0 else {}
    print("\n| shards | load s | RSS per shard MiB | conc | q/req | q/s | p50 ms | p99 ms | errors | vs single |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for result in results:
        rss = ", ".join(f"{size:.0f}" for size in result["rss_mib"]) or "-"
        for row in result["rows"]:
            reference = single.get((row["concurrency"], row["queries_per_request"]))
            ratio = f"{row['queries_per_s'] / reference['queries_per_s'] - 1:+.0%}" if reference and \
                result["shards"] else "-"
            print(f"| {result['shards'] or 'single process'} | {result['load_s']:.1f} | {rss} | "
                  f"{row['concurrency']} | {row['queries_per_request']} | {row['queries_per_s']:.0f} | "
                  f"{row['p50_ms']:.0f} | {row['p99_ms']:.0f} | {row['errors']} | {ratio} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter, add_help=False)
    parser.add_argument("--shards", type=lambda text: [int(x) for x in text.split(",")], default=[0, 1, 2, 4])
    parser.add_argument("--ray-address", default=None, help="Ray cluster (default: a local Ray instance)")
    parser.add_argument("--shard-cpus", type=float, default=0.25, help="CPUs Ray reserves per shard replica")
    args, rest = parser.parse_known_args(argv)
    defaults = ["--concurrency", "32,64", "--queries-per-request", "1,3"]
    bench_args = base.parse_args(defaults + rest)
    whole = base.ensure_index(bench_args)
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores; index {whole}", flush=True)
    results, raw_limit = [], None
    for shards in args.shards:
        results.append(measure(args, bench_args, whole, shards, raw_limit))
        raw_limit = results[-1]["raw_limit"]
    print_results(results)
    return 1 if any(row["errors"] for result in results for row in result["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
