"""A sharded index on Ray Serve: one deployment per index shard, optional query-encoder replicas.

``ragr1-retriever serve --ray`` keeps its HTTP front (waitress + Flask, with its limits, token, batching and
embedding cache) in the serving process, and puts the shards of a sharded index folder
(:mod:`retriever_server.sharding`) on a Ray cluster: the one verl runs on (``--ray-address auto``) or a
local one. Each shard is a Serve deployment (``shard-<n>``) whose replicas load the shard folder on their
node, on a GPU (exact fp16 search in torch, ``--shard-device cuda``) or on CPU. Query encoding stays in the
front, or runs on ``--encoder-replicas`` replicas. The front scatters each batch to every shard and merges
the top-k (:mod:`retriever_server.sharded`).

Ray Serve restarts a replica that dies. Meanwhile the front reads each deployment's status twice a
second: a search that needs an unhealthy shard is answered 503 naming it, at once, and a call to a shard
that does not answer within ``call_timeout_s`` is a 503 too, never a hang and never a partial top-k.
Shard folders are read by path on whichever node runs the replica: put the index on storage every node
mounts at the same path.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from retriever_server.encoders import EncoderSpec
from retriever_server.manifest import Manifest
from retriever_server.metrics import ServerMetrics
from retriever_server.plan import available_memory, leave_free, plan_index, require_placement
from retriever_server.sharded import Hit, LocalShard, ShardUnavailable
from retriever_server.sharding import ShardInfo

logger = logging.getLogger(__name__)

APP_NAME = "ragr1-retriever"
ENCODER_DEPLOYMENT = "encoder"
_UNCHECKED_GPU_GIB = float(2 ** 30)  # stands for "any size" when only GPU counts can be checked
_HEALTHY = "HEALTHY"


@dataclass(frozen=True)
class RayPlacement:
    """Where the shards run (CLI: ``--ray``, ``--ray-address``, ``--shard-device``, ``--shard-replicas``,
    ``--shard-cpus``, ``--encoder-replicas``, ``--encoder-device``, ``--shard-timeout``, ``--gpu-memory-gib``)."""

    address: str | None = None  # None: a local Ray instance; "auto": the cluster this node belongs to
    shard_device: str = "cpu"  # "cpu", or "cuda": one GPU per shard replica
    shard_replicas: int = 1
    shard_cpus: float = 1.0
    encoder_replicas: int = 0  # 0: queries are encoded in the serving process
    encoder_device: str = "cpu"
    call_timeout_s: float = 30.0
    status_interval_s: float = 0.5
    gpu_memory_gib: float | None = None  # free memory of each GPU (Ray reports GPU counts, not memory)

    def __post_init__(self):
        if self.shard_device not in ("cpu", "cuda"):
            raise ValueError(f"--shard-device must be cpu or cuda, got {self.shard_device!r}")
        if self.shard_replicas < 1 or self.encoder_replicas < 0 or self.shard_cpus <= 0:
            raise ValueError("--shard-replicas must be at least 1, --encoder-replicas at least 0, --shard-cpus > 0")


def shard_deployment_name(number: int) -> str:
    return f"shard-{number}"


class ShardReplica:
    """One replica of one index shard (the Ray Serve deployment class)."""

    def __init__(self, shard_dir: str, info: dict, options: dict):
        from retriever_server.service import LoadOptions, load_searcher

        load = LoadOptions(**options)
        self.shard = LocalShard(Path(shard_dir), ShardInfo(**info),
                                lambda folder, manifest: load_searcher(folder, manifest, load))
        logger.info("shard %d loaded: %d passages from %s", info["number"], info["count"], shard_dir)

    def search(self, payload, k: int) -> list[list[Hit]]:
        return self.shard.search(payload, k)


class EncoderReplica:
    """One query-encoder replica (the Ray Serve deployment class)."""

    def __init__(self, spec: dict, device: str, batch_size: int):
        from retriever_server.encoders import TextEncoder

        self.encoder = TextEncoder(EncoderSpec.from_dict(spec), device=device, batch_size=batch_size)

    def encode_queries(self, queries: list[str]) -> np.ndarray:
        return self.encoder.encode_queries(queries)

    def fingerprint(self) -> str:
        return self.encoder.fingerprint


class Directory:
    """The application's ingress: it only holds the other deployments, so one ``serve.run`` starts them all."""

    def __init__(self, *deployments):
        self.count = len(deployments)

    def __call__(self) -> int:
        return self.count


class DeploymentStatus:
    """The status of every deployment of the application, refreshed in the background."""

    def __init__(self, interval_s: float):
        self._statuses: dict[str, str] = {}
        self._messages: dict[str, str] = {}
        self._stop = threading.Event()
        self._interval_s = interval_s
        self._thread = threading.Thread(target=self._run, name="ragr1-serve-status", daemon=True)

    def start(self) -> DeploymentStatus:
        self.refresh()
        self._thread.start()
        return self

    def refresh(self) -> None:
        from ray import serve

        try:
            application = serve.status().applications.get(APP_NAME)
        except Exception as err:  # noqa: BLE001 - the controller itself may be restarting
            self._statuses = {name: "UNKNOWN" for name in self._statuses}
            self._messages = {name: f"Ray Serve status unavailable: {err}" for name in self._statuses}
            return
        deployments = application.deployments if application else {}
        self._statuses = {name: str(getattr(d.status, "value", d.status)) for name, d in deployments.items()}
        self._messages = {name: d.message for name, d in deployments.items()}

    def problem(self, name: str) -> str | None:
        status = self._statuses.get(name, "UNKNOWN")
        if status == _HEALTHY:
            return None
        return f"its Ray Serve deployment {name} is {status}" + (f": {self._messages[name]}" if
                                                                   self._messages.get(name) else "")

    def snapshot(self) -> dict[str, str]:
        return dict(self._statuses)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.refresh()

    def stop(self) -> None:
        self._stop.set()


class RayShard:
    """The front's view of one shard deployment: a call with a deadline, refused at once when unhealthy."""

    def __init__(self, info: ShardInfo, handle, status: DeploymentStatus, timeout_s: float):
        self.info, self._handle, self._status, self._timeout_s = info, handle, status, timeout_s
        self._name = shard_deployment_name(info.number)

    def search(self, payload, k: int) -> list[list[Hit]]:
        problem = self._status.problem(self._name)
        if problem is not None:
            raise ShardUnavailable(self.info.number, problem)
        try:
            return self._handle.search.remote(payload, k).result(timeout_s=self._timeout_s)
        except TimeoutError:
            raise ShardUnavailable(self.info.number, f"no answer within {self._timeout_s:g}s") from None
        except Exception as err:  # noqa: BLE001 - a dead replica raises Ray's own errors
            raise ShardUnavailable(self.info.number, f"{type(err).__name__}: {err}") from None


class RemoteEncoder:
    """The query-encoder deployment, with the attributes the front checks against the manifest."""

    def __init__(self, handle, spec: EncoderSpec, status: DeploymentStatus, timeout_s: float):
        self._handle, self.spec, self._status, self._timeout_s = handle, spec, status, timeout_s
        self.device = "ray"
        self.fingerprint = handle.fingerprint.remote().result(timeout_s=timeout_s)

    def encode_queries(self, queries: list[str]) -> np.ndarray:
        problem = self._status.problem(ENCODER_DEPLOYMENT)
        if problem is not None:
            raise ShardUnavailable("encoder", problem)
        try:
            return self._handle.encode_queries.remote(queries).result(timeout_s=self._timeout_s)
        except Exception as err:  # noqa: BLE001
            raise ShardUnavailable("encoder", f"{type(err).__name__}: {err}") from None


def _application(index_dir: Path, manifest: Manifest, infos: list[ShardInfo], options, placement: RayPlacement):
    from ray import serve

    # A replica may run on every core of its node; it is given the CPUs Ray reserved for it.
    load = {**asdict(options), "ray": None, "search_devices": (),
            "omp_threads": options.omp_threads or max(1, int(placement.shard_cpus))}
    if placement.shard_device == "cuda":
        load["search_backend"] = "torch" if manifest.index["type"] in ("Flat", "IDMap,Flat") else "faiss-gpu"
    actor = {"num_cpus": placement.shard_cpus, "num_gpus": 1 if placement.shard_device == "cuda" else 0}
    shards = [serve.deployment(ShardReplica, name=shard_deployment_name(info.number),
                               num_replicas=placement.shard_replicas, ray_actor_options=actor,
                               health_check_period_s=2, health_check_timeout_s=30)
              .bind(str(index_dir / info.dir), asdict(info), load) for info in infos]
    encoder = []
    if placement.encoder_replicas and manifest.index["kind"] == "dense":
        encoder_actor = {"num_cpus": 1, "num_gpus": 1 if placement.encoder_device.startswith("cuda") else 0}
        encoder = [serve.deployment(EncoderReplica, name=ENCODER_DEPLOYMENT, num_replicas=placement.encoder_replicas,
                                    ray_actor_options=encoder_actor)
                   .bind(manifest.encoder["spec"], placement.encoder_device, options.encoder_batch_size)]
    return serve.deployment(Directory, name="directory", ray_actor_options={"num_cpus": 0}).bind(*shards, *encoder)


def connect(placement: RayPlacement) -> None:
    """Join (or start) the Ray cluster the placement names, once per process."""
    import ray

    if not ray.is_initialized():
        ray.init(address=placement.address, namespace="ragr1-retriever", log_to_driver=False)


def check_memory(index_dir: Path, placement: RayPlacement, batch_queries: int, reserve_bytes: int = 0) -> None:
    """Raise PlacementError, before any deployment, when the shard replicas do not fit on the cluster's nodes
    (CPU: Ray's schedulable memory per node; GPU: one GPU per replica, ``gpu_memory_gib`` each)."""
    import ray

    connect(placement)
    plans = plan_index(index_dir, shard_device=placement.shard_device, batch_queries=batch_queries)
    replicas = [plan for plan in plans for _ in range(placement.shard_replicas)]
    gpu_memory_gib = placement.gpu_memory_gib
    if placement.shard_device == "cuda" and gpu_memory_gib is None:
        logger.warning("GPU memory not checked (Ray reports GPU counts, not memory; pass --gpu-memory-gib): "
                       "checking only that every shard replica gets a GPU")
        gpu_memory_gib = _UNCHECKED_GPU_GIB
    devices = leave_free(available_memory(placement.shard_device, ray.nodes(), gpu_memory_gib), reserve_bytes)
    require_placement(replicas, devices, max_per_device=1 if placement.shard_device == "cuda" else None)
    logger.info("memory plan: %d shard replica(s) fit on %d %s device(s) of the Ray cluster", len(replicas),
                len(devices), placement.shard_device)


def deploy_shards(index_dir: Path, manifest: Manifest, infos: list[ShardInfo], options, metrics: ServerMetrics,
                  on_status=None) -> tuple[list[RayShard], RemoteEncoder | None, DeploymentStatus, str]:
    """Start (or replace) the application on Ray; returns the shards, the remote encoder (or None), the
    deployments' status, and a description of where they run. ``on_status`` gets the status snapshot
    function as soon as it exists."""
    import ray
    from ray import serve

    placement: RayPlacement = options.ray
    connect(placement)
    # The front is waitress: Ray Serve's own HTTP proxies are not started.
    serve.start(proxy_location="Disabled")
    logger.info("deploying %d shards on Ray (%s, %d replica(s) each)", len(infos), placement.shard_device,
                placement.shard_replicas)
    # Watched from before the deployment, so that /health shows each shard's state while they load.
    status = DeploymentStatus(placement.status_interval_s).start()
    if on_status is not None:
        on_status(status.snapshot)
    serve.run(_application(index_dir, manifest, infos, options, placement), name=APP_NAME, route_prefix=None)
    status.refresh()
    shards = [RayShard(info, serve.get_deployment_handle(shard_deployment_name(info.number), APP_NAME), status,
                       placement.call_timeout_s) for info in infos]
    encoder = None
    if placement.encoder_replicas and manifest.index["kind"] == "dense":
        encoder = RemoteEncoder(serve.get_deployment_handle(ENCODER_DEPLOYMENT, APP_NAME),
                                EncoderSpec.from_dict(manifest.encoder["spec"]), status, placement.call_timeout_s)
    where = f"Ray Serve ({len(ray.nodes())} node(s), shards on {placement.shard_device})"
    return shards, encoder, status, where


def shutdown(status: DeploymentStatus | None = None) -> None:
    """Remove the application and leave the Ray cluster (the cluster itself keeps running)."""
    import ray
    from ray import serve

    if status is not None:
        status.stop()
    if ray.is_initialized():
        try:
            serve.delete(APP_NAME)
        finally:
            ray.shutdown()
