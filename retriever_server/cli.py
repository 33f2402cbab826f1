"""``ragr1-retriever``: serve an index (``serve``), plan its memory (``plan``), try the embedded demo (``demo``),
query a server (``query``)."""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import os
import signal
import sys
import threading
import traceback
from pathlib import Path

import requests

from retriever_server import environment, stack_dump
from retriever_server.app import create_app
from retriever_server.batcher import RETURN_WAIT_FRACTION, BatchingConfig
from retriever_server.encoder_backends import AUTO_BACKEND, ENCODER_BACKENDS, REFERENCE_BACKEND, check_backend
from retriever_server.encoder_choice import AGREEMENT_K, MIN_SET_AGREEMENT
from retriever_server.environment import AUTH_TOKEN
from retriever_server.http_server import ServingLimits, WaitressServer
from retriever_server.searchers import SEARCH_BACKENDS, LoadOptions
from retriever_server.service import RetrievalService
from retriever_server.wire import DEFAULT_TOPK, RequestLimits

logger = logging.getLogger("ragr1-retriever")


def _add_serve_arguments(serve: argparse.ArgumentParser) -> None:
    where = serve.add_mutually_exclusive_group(required=True)
    where.add_argument("--index", type=Path, help="index folder written by `ragr1-index build`")
    where.add_argument("--demo", action="store_true", help="serve the bundled demo corpus (built and cached)")
    serve.add_argument("--demo-kind", choices=("dense", "bm25"), default="dense", help="demo index kind")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 exposes the server")
    serve.add_argument("--port", type=int, default=8000, help="port (0 picks a free one and logs it)")
    serve.add_argument("--topk", type=int, default=DEFAULT_TOPK, help="documents per query when a request gives no topk")
    serve.add_argument("--auth-token", default=None, help=f"require this bearer token (default: ${AUTH_TOKEN})")
    serve.add_argument("--threads", type=int, default=128, help="HTTP worker threads")
    serve.add_argument("--max-concurrent-requests", type=int, default=120,
                       help="/retrieve requests searching at once (below --threads); more are answered 503")
    serve.add_argument("--connection-limit", type=int, default=0,
                       help="open connections at most (0: what the descriptor limit allows, up to 10,000)")
    serve.add_argument("--request-read-timeout", type=float, default=15.0,
                       help="seconds a request may take to arrive whole; slower connections are closed")
    serve.add_argument("--idle-timeout", type=float, default=30.0, help="seconds an idle keep-alive connection is kept")
    serve.add_argument("--shutdown-timeout", type=float, default=10.0,
                       help="on SIGTERM, seconds the requests already received may take to be answered")
    serve.add_argument("--max-batch-queries", type=int, default=BatchingConfig.max_batch_queries,
                       help="most distinct queries per batch")
    serve.add_argument("--max-wait-ms", type=float, default=BatchingConfig.max_wait_ms,
                       help="longest wait for a batch to fill, while other clients are active")
    serve.add_argument("--max-return-wait-ms", type=float, default=BatchingConfig.max_return_wait_ms,
                       help="longest wait of a batch for the clients just answered to send again, so that "
                            f"clients keeping one request each share one batch (also at most "
                            f"{RETURN_WAIT_FRACTION:.0%}% of the previous search; 0: never)")
    serve.add_argument("--request-timeout", type=float, default=BatchingConfig.request_timeout_s,
                       help="seconds before a queued request fails")
    serve.add_argument("--cache-size", type=int, default=100_000, help="query embeddings kept in the LRU cache")
    serve.add_argument("--document-cache-mib", type=float, default=64.0,
                       help="JSON text of recently returned documents kept, in MiB (0 encodes every hit anew)")
    serve.add_argument("--max-queries-per-request", type=int, default=512)
    serve.add_argument("--max-query-chars", type=int, default=2048)
    serve.add_argument("--max-topk", type=int, default=100)
    serve.add_argument("--max-results-per-request", type=int, default=5120, help="queries x topk of one request")
    serve.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024)
    serve.add_argument("--max-response-bytes", type=int, default=8 * 1024 * 1024)
    serve.add_argument("--encoder", default=None, help="encoder override (must match the manifest's)")
    serve.add_argument("--encoder-device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    serve.add_argument("--encoder-batch-size", type=int, default=128)
    serve.add_argument("--encoder-backend", choices=(AUTO_BACKEND, *ENCODER_BACKENDS), default=REFERENCE_BACKEND,
                       help="how queries are encoded: torch (fp32, the reference the index was built with), "
                            "torch-bf16, torch-int8, onnx, onnx-int8 (pip install 'ragr1-verl[onnx]'), or auto: "
                            "each measured at start on this index, and the fastest that gives the reference's "
                            f"top-{AGREEMENT_K} for >= {MIN_SET_AGREEMENT * 100:.0f}%% of probe queries is used")
    serve.add_argument("--search-backend", choices=SEARCH_BACKENDS, default="auto",
                       help="auto: torch fp16 exact search on GPUs for Flat indexes, else faiss-gpu if "
                            "installed, else faiss on CPU")
    serve.add_argument("--search-devices", default="", help="comma-separated devices for --search-backend torch")
    serve.add_argument("--omp-threads", type=int, default=0, help="faiss OpenMP threads for large batches (0: the CPUs this process may use)")
    serve.add_argument("--torch-threads", type=int, default=0, help="torch CPU threads (0: the CPUs this process may use, from affinity and cgroup quota)")
    serve.add_argument("--nprobe", type=int, default=None, help="IVF lists searched per query")
    serve.add_argument("--ef-search", type=int, default=None, help="HNSW search breadth")
    serve.add_argument("--rerank-factor", type=int, default=None,
                       help="an index built with a re-rank stage (e.g. --index-type 'SQ8,RFlat'): candidates per "
                            "result the fp32 copy re-ranks (faiss default 1)")
    serve.add_argument("--corpus", default=None, help="a corpus.arrow to use instead of the index folder's")
    serve.add_argument("--no-mmap", action="store_true",
                       help="read the faiss index into memory instead of memory-mapping its codes")
    serve.add_argument("--verify-checksums", action="store_true", help="sha256 every index file before serving")
    ray = serve.add_argument_group("Ray Serve (a sharded index from `ragr1-index shard` or `build --num-shards`)")
    ray.add_argument("--ray", action="store_true", help="run the index shards as Ray Serve deployments")
    ray.add_argument("--ray-address", default=None, help="Ray cluster to join ('auto': the one this node is in; "
                                                         "default: $RAY_ADDRESS, else a Ray instance of the "
                                                         "server's own, stopped with it)")
    ray.add_argument("--shard-device", choices=("cpu", "cuda"), default="cpu", help="where each shard replica searches")
    ray.add_argument("--shard-replicas", type=int, default=1, help="replicas of every shard")
    ray.add_argument("--shard-cpus", type=float, default=1.0, help="CPUs Ray reserves for each shard replica")
    ray.add_argument("--encoder-replicas", type=int, default=0,
                     help="query-encoder replicas on Ray (0: encode in this process)")
    ray.add_argument("--encoder-replica-device", default="cpu", help="device of each encoder replica")
    ray.add_argument("--shard-timeout", type=float, default=30.0,
                     help="seconds a shard may take to answer before the search is a 503")
    ray.add_argument("--gpu-memory-gib", type=float, default=None,
                     help="free memory of each GPU, for the memory plan (Ray reports GPU counts, not memory; "
                          "without it only the GPU count is checked)")
    ray.add_argument("--ray-reconnect-timeout", type=float, default=30.0,
                     help="seconds a joined cluster's GCS may not answer (503s meanwhile) before the server exits "
                          "with status 1; a Ray instance of its own that dies ends the server at once")
    memory = serve.add_argument_group("memory plan (checked before anything is loaded)")
    memory.add_argument("--reserve-memory-gib", type=float, default=0.0,
                        help="memory to keep free on each device for other processes, e.g. verl's trainer")
    memory.add_argument("--skip-memory-check", action="store_true",
                        help="load even when the plan says the index does not fit")


def _add_plan_arguments(plan: argparse.ArgumentParser) -> None:
    what = plan.add_mutually_exclusive_group(required=True)
    what.add_argument("--index", type=Path, help="an index folder (sharded or not) written by `ragr1-index`")
    what.add_argument("--passages", type=int, help="plan an index not built yet: number of passages")
    plan.add_argument("--dim", type=int, help="with --passages: embedding dimension")
    plan.add_argument("--index-type", default="Flat", help="with --passages: the faiss factory string")
    plan.add_argument("--corpus-bytes-per-passage", type=int, default=700,
                      help="with --passages: corpus.arrow bytes per passage (about 700 for 100-word passages)")
    plan.add_argument("--shards", type=int, default=None,
                      help="number of shards (default: a sharded folder's own, else 1)")
    plan.add_argument("--shard-device", choices=("cpu", "cuda"), default="cpu")
    plan.add_argument("--max-batch-queries", type=int, default=512, help="as `serve --max-batch-queries`")
    devices = plan.add_mutually_exclusive_group()
    devices.add_argument("--ray-address", default=None, help="plan against the nodes of this Ray cluster")
    devices.add_argument("--devices", type=int, default=None,
                         help="plan against this many devices of --free-gib each (another machine)")
    plan.add_argument("--free-gib", type=float, default=None, help="with --devices: free memory of each")
    plan.add_argument("--gpu-memory-gib", type=float, default=None,
                      help="with --ray-address and cuda: free memory of each GPU")
    plan.add_argument("--reserve-memory-gib", type=float, default=0.0, help="memory kept free on each device")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ragr1-retriever", description=__doc__)
    parser.add_argument("--log-level", default="INFO")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve an index over HTTP",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_serve_arguments(serve)
    plan = commands.add_parser("plan", help="print the memory each shard needs against the devices' free memory")
    _add_plan_arguments(plan)
    demo = commands.add_parser("demo", help="build the demo index, serve it on a free port, query it, stop")
    demo.add_argument("--kind", choices=("dense", "bm25"), default="dense")
    query = commands.add_parser("query", help="send queries to a running server and print the results")
    query.add_argument("queries", nargs="+")
    query.add_argument("--url", default="http://127.0.0.1:8000", help="server address")
    query.add_argument("--topk", type=int, default=DEFAULT_TOPK, help="documents per query")
    query.add_argument("--auth-token", default=None, help=f"bearer token (default: ${AUTH_TOKEN})")
    return parser


def build_service(args: argparse.Namespace) -> RetrievalService:
    from retriever_server.demo import ensure_demo_index

    index_dir = ensure_demo_index(args.demo_kind, show_progress=True) if args.demo else args.index
    _check_encoder_backend(args)
    options = LoadOptions(encoder=args.encoder, encoder_device=args.encoder_device,
                          encoder_backend=args.encoder_backend,
                          encoder_batch_size=args.encoder_batch_size, search_backend=args.search_backend,
                          search_devices=tuple(d for d in args.search_devices.split(",") if d),
                          omp_threads=args.omp_threads, torch_threads=args.torch_threads, nprobe=args.nprobe,
                          ef_search=args.ef_search, rerank_factor=args.rerank_factor, corpus=args.corpus,
                          verify_checksums=args.verify_checksums,
                          cache_size=args.cache_size, document_cache_mib=args.document_cache_mib,
                          mmap_index=not args.no_mmap, check_memory=not args.skip_memory_check,
                          reserve_memory_gib=args.reserve_memory_gib, deployer=_ray_deployer(args))
    batching = BatchingConfig(max_batch_queries=args.max_batch_queries, max_wait_ms=args.max_wait_ms,
                              max_return_wait_ms=args.max_return_wait_ms, request_timeout_s=args.request_timeout)
    return RetrievalService(index_dir, options, batching)


def _check_encoder_backend(args: argparse.Namespace) -> None:
    try:
        check_backend(args.encoder_backend)
    except ValueError as err:
        raise SystemExit(f"error: --encoder-backend: {err}") from None
    if args.encoder_backend == AUTO_BACKEND and args.ray and args.encoder_replicas:
        raise SystemExit("error: --encoder-backend auto measures the backends in the serving process; with "
                         "--encoder-replicas, name the backend the replicas run (measure them with "
                         "benchmarks/bench_encoders.py)")


def _ray_deployer(args: argparse.Namespace):
    if not args.ray:
        return None
    from retriever_server.ray_serve import RayDeployer, RayPlacement, prepare_serving_process

    prepare_serving_process()

    try:
        return RayDeployer(RayPlacement(
            address=args.ray_address, shard_device=args.shard_device, shard_replicas=args.shard_replicas,
            shard_cpus=args.shard_cpus, encoder_replicas=args.encoder_replicas,
            encoder_device=args.encoder_replica_device, call_timeout_s=args.shard_timeout,
            gpu_memory_gib=args.gpu_memory_gib, reconnect_timeout_s=args.ray_reconnect_timeout))
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None


def serve(args: argparse.Namespace) -> int:
    from retriever_server.supervisor import SUPERVISED, Report, supervise

    if args.ray and SUPERVISED not in os.environ:  # Ray may end a driver silently: watched from outside
        return supervise(args.argv)
    report = Report()
    if not args.ray:
        return _serve(args, report)
    try:
        code = _serve(args, report)
    except SystemExit as stop:
        if isinstance(stop.code, str):
            print(stop.code, file=sys.stderr)
        code = stop.code if isinstance(stop.code, int) else 1
    except BaseException:  # noqa: BLE001 - reported here: the process ends below without unwinding
        traceback.print_exc()
        code = 1
    # The server ended on its own (the supervisor has nothing to add) and Ray is stopped. Ray's threads may
    # abort the interpreter's own ending (SIGABRT), so the process ends here.
    report.send("done", str(code))
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _enable_stack_dumps() -> None:
    """A crash prints the threads' stacks to stderr, and so does ``kill -USR1 <pid>`` for a server that seems
    stuck (it keeps serving)."""
    faulthandler.enable()
    stack_dump.install(signal.SIGUSR1)


def _serve(args: argparse.Namespace, report) -> int:
    _enable_stack_dumps()
    limits = RequestLimits(max_queries_per_request=args.max_queries_per_request, max_query_chars=args.max_query_chars,
                           max_topk=args.max_topk, max_results_per_request=args.max_results_per_request,
                           max_body_bytes=args.max_body_bytes, max_response_bytes=args.max_response_bytes,
                           max_concurrent_requests=args.max_concurrent_requests)
    if not 1 <= args.topk <= limits.max_topk:
        raise SystemExit(f"error: --topk must be between 1 and --max-topk ({limits.max_topk})")
    if not 1 <= args.max_concurrent_requests < args.threads:
        raise SystemExit("error: --max-concurrent-requests must be at least 1 and below --threads, so that threads "
                         "stay free to answer health checks and 503s")
    serving_limits = ServingLimits(threads=args.threads, connection_limit=args.connection_limit,
                                   request_read_timeout_s=args.request_read_timeout, idle_timeout_s=args.idle_timeout,
                                   shutdown_timeout_s=args.shutdown_timeout)
    service = build_service(args)
    token = args.auth_token or environment.value(AUTH_TOKEN)
    app = create_app(service, limits=limits, default_topk=args.topk, auth_token=token)
    server = WaitressServer(app, host=args.host, port=args.port, max_body_bytes=limits.max_body_bytes,
                            limits=serving_limits)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not token:
        logger.warning("serving on %s without a bearer token: anyone who can reach it can query it", args.host)
    # Loading a large index takes minutes; /health answers (ready: false) meanwhile. A failed load ends serve.
    # SIGINT may be ignored (a background job), so stopping goes through SIGTERM. Its handler only asks the
    # server to stop, once: a second signal must not break the stopping (draining, then stopping Ray) half-way.
    stopping = threading.Event()

    def stop_serving(*_) -> None:
        if stopping.is_set():
            logger.info("already stopping")
            return
        stopping.set()
        server.request_stop()

    signal.signal(signal.SIGTERM, stop_serving)
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, stop_serving)

    def stop_on_failure(error: BaseException) -> None:  # a failed load, or the connection to Ray lost for good
        report.send("problem", " ".join(str(error).split()))
        stop_serving()

    def on_ready() -> None:
        logger.info("ready: serving on %s", server.url)
        if args.ray:
            from retriever_server.ray_serve import current_connection

            connection = current_connection()
            if connection is not None and connection.logs_dir:
                report.send("ray-logs", connection.logs_dir)

    try:
        service.load_in_background(on_failure=stop_on_failure, on_ready=on_ready)
        server.serve_forever()
    finally:
        stopping.set()
        server.stop()
        service.close()
    if service.state == "failed":
        logger.error("stopped: %s", service.error)
        return 1
    return 0


def query(args: argparse.Namespace) -> int:
    token = args.auth_token or environment.value(AUTH_TOKEN)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = requests.post(f"{args.url.rstrip('/')}/retrieve", headers=headers, timeout=60,
                             json={"queries": args.queries, "topk": args.topk, "return_scores": True})
    print(json.dumps(response.json(), indent=2, ensure_ascii=False))
    return 0 if response.ok else 1


def plan(args: argparse.Namespace) -> int:
    """Exit status 1 when the shards do not fit."""
    from retriever_server import plan as planning

    try:
        plans = _plans(args, planning)
        devices = planning.leave_free(_devices(args, planning), int(args.reserve_memory_gib * planning.GIB))
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    max_per_device = 1 if args.shard_device == "cuda" else None  # one GPU per shard replica
    print(planning.format_plan(plans, devices, max_per_device=max_per_device))
    return 1 if planning.check_placement(plans, devices, max_per_device=max_per_device) else 0


def _plans(args: argparse.Namespace, planning) -> list:
    if args.index is not None:
        return planning.plan_index(args.index, args.shards, args.shard_device, batch_queries=args.max_batch_queries)
    if args.dim is None:
        raise ValueError("--passages needs --dim")
    return planning.plan_from_shape(args.passages, args.dim, args.index_type, args.shards or 1, args.shard_device,
                                    args.corpus_bytes_per_passage, batch_queries=args.max_batch_queries)


def _devices(args: argparse.Namespace, planning) -> list:
    if args.devices is not None:
        if args.free_gib is None:
            raise ValueError("--devices needs --free-gib")
        return planning.assumed_devices(args.shard_device, args.devices, args.free_gib)
    if args.ray_address is None:
        return planning.available_memory(args.shard_device)
    import ray

    ray.init(address=args.ray_address, log_to_driver=False)
    try:
        return planning.available_memory(args.shard_device, ray.nodes(), args.gpu_memory_gib)
    finally:
        ray.shutdown()


def demo(args: argparse.Namespace) -> int:
    from retriever_server.demo import run_demo

    for line in run_demo(args.kind):
        print(line)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = make_parser().parse_args(argv)
    args.argv = argv
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    handlers = {"serve": serve, "plan": plan, "demo": demo, "query": query}
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
