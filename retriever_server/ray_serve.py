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

Without an address (and without ``RAY_ADDRESS``) the server starts a Ray instance of its own
(:class:`RayConnection`), never joining a cluster by the address file that ``ray start`` leaves in
``/tmp/ray``. Ray ties the processes it starts (GCS, raylet, ...) to the *thread* that started them
(``prctl(PR_SET_PDEATHSIG, SIGKILL)``, which fires when that thread ends): started from the loading thread,
they were killed as soon as the index had loaded, and the server died 60 s later on its first search. A
thread that lives as long as the instance starts it now, and the server stops the instance on exit. A
watchdog probes the GCS (and the processes of an instance of its own) every second: while the connection
is lost, ``/health`` and every ``/retrieve`` say why (503), and the server exits non-zero once it cannot
come back (at once for its own instance, after ``reconnect_timeout_s`` for a cluster it joined).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from retriever_server.cpus import usable_cpus
from retriever_server.encoders import EncoderSpec
from retriever_server.manifest import Manifest
from retriever_server.metrics import ServerMetrics
from retriever_server.plan import available_memory, leave_free, plan_index, require_placement
from retriever_server.searchers import LoadOptions, load_searcher
from retriever_server.sharded import Hit, LocalShard, ShardDeployment, ShardUnavailable
from retriever_server.sharding import ShardInfo, read_shards

logger = logging.getLogger(__name__)

APP_NAME = "ragr1-retriever"
ENCODER_DEPLOYMENT = "encoder"
_UNCHECKED_GPU_GIB = float(2 ** 30)  # stands for "any size" when only GPU counts can be checked
_HEALTHY = "HEALTHY"
_NAMESPACE = "ragr1-retriever"
_PROBE_KEY, _PROBE_NAMESPACE = b"ragr1-retriever-probe", b"ragr1"
_ENDS_AFTER_SERVING = False  # set for the CLI's serving process, which ends once it stops serving
_WAIT_SLICE_S = 0.5  # a shard call checks the deployment's status and the connection this often


@dataclass(frozen=True)
class RayPlacement:
    """Where the shards run (CLI: ``--ray``, ``--ray-address``, ``--shard-device``, ``--shard-replicas``,
    ``--shard-cpus``, ``--encoder-replicas``, ``--encoder-device``, ``--shard-timeout``, ``--gpu-memory-gib``)."""

    address: str | None = None  # None: $RAY_ADDRESS, else a Ray instance of the server's own; "auto": this node's
    shard_device: str = "cpu"  # "cpu", or "cuda": one GPU per shard replica
    shard_replicas: int = 1
    shard_cpus: float = 1.0
    encoder_replicas: int = 0  # 0: queries are encoded in the serving process
    encoder_device: str = "cpu"
    call_timeout_s: float = 30.0
    status_interval_s: float = 0.5
    gpu_memory_gib: float | None = None  # free memory of each GPU (Ray reports GPU counts, not memory)
    reconnect_timeout_s: float = 30.0  # a joined cluster's GCS may be away this long before the server exits
    probe_interval_s: float = 1.0  # how often the watchdog probes the GCS
    probe_timeout_s: float = 3.0

    def __post_init__(self):
        if self.shard_device not in ("cpu", "cuda"):
            raise ValueError(f"--shard-device must be cpu or cuda, got {self.shard_device!r}")
        if self.shard_replicas < 1 or self.encoder_replicas < 0 or self.shard_cpus <= 0:
            raise ValueError("--shard-replicas must be at least 1, --encoder-replicas at least 0, --shard-cpus > 0")
        if not 0 < self.reconnect_timeout_s < 60:
            raise ValueError("--ray-reconnect-timeout must be above 0 and below 60 s (after 60 s without its GCS, "
                             "Ray itself ends the process)")


def shard_deployment_name(number: int) -> str:
    return f"shard-{number}"


class ShardReplica:
    """One replica of one index shard (the Ray Serve deployment class)."""

    def __init__(self, shard_dir: str, info: dict, options: dict):
        load = LoadOptions(**options)
        self.shard = LocalShard(Path(shard_dir), ShardInfo(**info),
                                lambda folder, manifest: load_searcher(folder, manifest, load))
        logger.info("shard %d loaded: %d passages from %s", info["number"], info["count"], shard_dir)

    def search(self, payload, k: int) -> list[list[Hit]]:
        return self.shard.search(payload, k)

    def describe(self) -> dict:
        """Which shard this replica serves (the front checks it once, which also opens the route to it)."""
        return asdict(self.shard.info)


class EncoderReplica:
    """One query-encoder replica (the Ray Serve deployment class)."""

    def __init__(self, spec: dict, device: str, batch_size: int, backend: str = "torch"):
        from retriever_server.encoders import TextEncoder

        self.encoder = TextEncoder(EncoderSpec.from_dict(spec), device=device, batch_size=batch_size,
                                   backend=backend)

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
    """The status of every deployment of the application, refreshed in the background; a lost connection
    to Ray (``connection.problem()``) comes first, as the statuses are stale then."""

    def __init__(self, interval_s: float, connection: RayConnection | None = None):
        self._connection = connection
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

        if self._connection is not None and self._connection.problem() is not None:
            return  # Serve cannot answer; asking it could even start a new Ray instance (auto-init)
        try:
            application = serve.status().applications.get(APP_NAME)
        except Exception as err:  # noqa: BLE001 - the controller itself may be restarting
            self._statuses = {name: "UNKNOWN" for name in self._statuses}
            self._messages = {name: f"Ray Serve status unavailable: {err}" for name in self._statuses}
            return
        deployments = application.deployments if application else {}
        self._statuses = {name: str(getattr(d.status, "value", d.status)) for name, d in deployments.items()}
        self._messages = {name: d.message for name, d in deployments.items()}

    def connection_problem(self) -> str | None:
        return self._connection.problem() if self._connection is not None else None

    def problem(self, name: str) -> str | None:
        lost = self.connection_problem()
        if lost is not None:
            return lost
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

    def stop(self, wait_s: float = 0.0) -> None:
        """Stop refreshing; ``wait_s``: how long to wait for a refresh under way (none may run while Ray shuts
        down)."""
        self._stop.set()
        if wait_s and self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=wait_s)


class RayShard:
    """The front's view of one shard deployment: a call with a deadline, refused at once when unhealthy."""

    def __init__(self, info: ShardInfo, handle, status: DeploymentStatus, timeout_s: float):
        self.info, self._handle, self._status, self._timeout_s = info, handle, status, timeout_s
        self._name = shard_deployment_name(info.number)

    def search(self, payload, k: int) -> list[list[Hit]]:
        problem = self._status.problem(self._name)
        if problem is not None:
            raise ShardUnavailable(self.info.number, problem)
        deadline = time.monotonic() + self._timeout_s
        try:
            response = self._handle.search.remote(payload, k)
            while True:  # waited for in slices: the connection to Ray lost meanwhile ends the wait at once
                try:
                    return response.result(timeout_s=max(0.01, min(_WAIT_SLICE_S, deadline - time.monotonic())))
                except TimeoutError:
                    problem = self._status.connection_problem()
                    if problem is None and time.monotonic() < deadline:
                        continue
                    raise ShardUnavailable(self.info.number, problem or f"no answer within {self._timeout_s:g}s") \
                        from None
        except ShardUnavailable:
            raise
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
    load = {**asdict(options), "deployer": None, "search_devices": (),
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
                   .bind(manifest.encoder["spec"], placement.encoder_device, options.encoder_batch_size,
                         options.encoder_backend)]
    return serve.deployment(Directory, name="directory", ray_actor_options={"num_cpus": 0}).bind(*shards, *encoder)


def prepare_serving_process() -> None:
    """For a process that serves until SIGTERM (the CLI), before Ray is imported. Ray reads these settings
    once, on import; they are set for this process only, the processes Ray starts keep Ray's defaults:

    - Ray's driver installs absl's failure signal handler on SIGTERM too, which prints a stack trace for a
      plain SIGTERM and, 3 s later, aborts the process (its alarm against a hanging handler) while the
      server is still stopping: turned off, Python's faulthandler (enabled by ``serve``) reports real
      crashes instead;
    - a Ray call made after the server left Ray must fail, not start a new Ray instance (auto-init)."""
    import sys

    global _ENDS_AFTER_SERVING
    _ENDS_AFTER_SERVING = True
    if "ray" in sys.modules:
        return
    settings = {"RAY_DISABLE_FAILURE_SIGNAL_HANDLER": "1", "RAY_ENABLE_AUTO_CONNECT": "0"}
    previous = {name: os.environ.get(name) for name in settings}
    os.environ.update({name: os.environ.get(name, value) for name, value in settings.items()})
    try:
        import ray._private.auto_init_hook  # noqa: F401
        import ray._private.ray_constants  # noqa: F401
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def ray_address(placement: RayPlacement) -> str:
    """The cluster to join, or ``"local"``: ``--ray-address``, else ``$RAY_ADDRESS``, else a Ray instance of the
    server's own. Unlike ``ray.init()``, never the address file a ``ray start`` (maybe long dead) left behind."""
    return placement.address or os.environ.get("RAY_ADDRESS") or "local"


def _exit_reason(returncode: int | None) -> str:
    if returncode is None or returncode >= 0:
        return "exited" if returncode is None else f"exited with status {returncode}"
    try:
        return f"was killed by {signal.Signals(-returncode).name}"
    except ValueError:
        return f"was killed by signal {-returncode}"


class RayConnection:
    """This process's connection to Ray: a cluster it joined, or an instance it started and owns.

    An instance of its own is started from a thread that outlives it: Ray has the kernel kill the GCS and the
    raylet when the *thread* that started them ends (``PR_SET_PDEATHSIG``), so starting it from a thread that
    finishes (the index loader) killed the whole instance moments later. A watchdog thread probes the GCS
    (``probe_interval_s``) and the processes of an own instance; :meth:`problem` says what is lost, and
    ``on_lost`` is called once the connection cannot come back: at once when a process of the own instance
    died, after ``reconnect_timeout_s`` without an answer from a joined cluster's GCS.
    """

    def __init__(self, placement: RayPlacement, cpus_needed: float = 0.0):
        self.placement = placement
        self.address = ray_address(placement)
        self.owned = self.address == "local"
        self.gcs_address: str | None = None
        self.logs_dir: str | None = None
        self.on_lost: Callable[[str], None] | None = None
        self._cpus_needed = cpus_needed
        self._problem: str | None = None
        self._adopted = False  # Ray was initialised before us (by the caller): left connected at close
        self._released = threading.Event()  # lets the owner thread end, once the instance is stopped
        self._stop = threading.Event()
        self._watchdog: threading.Thread | None = None
        self._family: dict[int, object] = {}  # an own instance's processes (psutil), to stop any Ray leaves
        self.status_watchers: list[DeploymentStatus] = []  # stopped before Ray is: they call Serve

    # --- starting ---

    def open(self) -> RayConnection:
        import ray

        if ray.is_initialized():
            self._adopted, self.owned = True, False
        elif self.owned:
            self._start_own_instance()
        else:
            logger.info("joining the Ray cluster at %s", self.address)
            try:
                ray.init(address=self.address, namespace=_NAMESPACE, log_to_driver=False)
            except ConnectionError as err:
                if self.address == "auto" or os.environ.get("RAY_AUTH_MODE"):
                    raise
                raise ConnectionError(f"{err}. Is it running? If it uses token authentication (the default of "
                                      "`ray start` since Ray 2.5x), Ray sends the token to an explicit address "
                                      "only with RAY_AUTH_MODE=token set (or use --ray-address auto on a node of "
                                      "the cluster)") from err
        self.gcs_address = ray.get_runtime_context().gcs_address
        try:  # where Ray's log of this driver is (the supervisor quotes it when Ray ends the process)
            self.logs_dir = ray._private.worker._global_node.get_logs_dir_path()
        except Exception:  # noqa: BLE001 - private API: only a diagnostic
            self.logs_dir = None
        self._watchdog = threading.Thread(target=self._watch, name="ragr1-ray-watchdog", daemon=True)
        self._watchdog.start()
        return self

    def _start_own_instance(self) -> None:
        import ray

        cpus = max(float(usable_cpus()), self._cpus_needed)
        if cpus > usable_cpus():
            logger.warning("the shard replicas reserve %g CPUs; this machine has %d: Ray is told it has %g",
                           self._cpus_needed, usable_cpus(), cpus)
        started = threading.Event()
        outcome: dict[str, BaseException] = {}

        def own() -> None:
            try:
                ray.init(address="local", namespace=_NAMESPACE, log_to_driver=False, include_dashboard=False,
                         num_cpus=math.ceil(cpus))
            except BaseException as err:  # noqa: BLE001 - handed to the starting thread
                outcome["error"] = err
                return
            finally:
                started.set()
            self._released.wait()  # Ray's processes die with this thread: it ends only after they are stopped

        logger.info("starting a Ray instance of this server's own (no --ray-address, no RAY_ADDRESS)")
        threading.Thread(target=own, name="ragr1-ray-owner", daemon=True).start()
        started.wait()
        if "error" in outcome:
            self._released.set()
            raise outcome["error"]

    # --- watching ---

    def problem(self) -> str | None:
        """What is lost, while the connection to Ray is (None when it is fine)."""
        return self._problem

    def describe(self) -> dict:
        return {"address": self.gcs_address, "started_here": self.owned, "connected": self._problem is None,
                "problem": self._problem}

    def _watch(self) -> None:
        try:
            self._watch_until_lost()
        except Exception:  # noqa: BLE001 - a watchdog that stops must say so
            logger.exception("the Ray connection watchdog failed; the connection is no longer watched")

    def _watch_until_lost(self) -> None:
        failures, lost_since = 0, None
        while not self._stop.wait(self.placement.probe_interval_s):
            self._remember_family()
            dead = self._dead_processes()
            if dead:
                self._lose(f"lost the connection to Ray: {dead}, started by this server", fatal=True)
                return
            error = self._probe_gcs()
            if self._stop.is_set():
                return
            if error is None:
                if self._problem is not None:
                    logger.warning("Ray's GCS at %s answers again: serving", self.gcs_address)
                failures, lost_since, self._problem = 0, None, None
                continue
            failures += 1
            if failures < 2:  # one slow answer on a busy machine is not a lost connection
                continue
            lost_since = lost_since or time.monotonic()
            problem = f"lost the connection to Ray: its GCS at {self.gcs_address} does not answer ({error})"
            if self.owned or time.monotonic() - lost_since >= self.placement.reconnect_timeout_s:
                waited = "" if self.owned else f" for {self.placement.reconnect_timeout_s:g} s"
                self._lose(problem + waited, fatal=True)
                return
            if self._problem is None:
                logger.warning("%s; /retrieve answers 503 until it does, for at most %g s", problem,
                               self.placement.reconnect_timeout_s)
            self._problem = problem

    def _lose(self, problem: str, fatal: bool) -> None:
        self._problem = problem
        if fatal and self.on_lost is not None:
            self.on_lost(problem)

    def _remember_family(self) -> None:
        """Remember every process of an own instance (this process's descendants: GCS, raylet, workers...)."""
        if not self.owned:
            return
        import psutil  # a dependency of Ray

        try:
            for child in psutil.Process().children(recursive=True):
                self._family.setdefault(child.pid, child)
        except psutil.Error:
            pass

    def _stop_family(self, grace_s: float = 5.0) -> None:
        """After ``ray.shutdown``: wait for the own instance's processes to end, then stop those left (Ray
        leaves its agents running when the GCS or the raylet died first)."""
        import psutil

        def alive() -> list:
            running = []
            for process in self._family.values():
                try:
                    if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                        running.append(process)
                except psutil.Error:
                    pass
            return running

        deadline = time.monotonic() + grace_s
        while alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        for stop, wait_s in (("terminate", 2.0), ("kill", 2.0)):
            left = alive()
            if not left:
                return
            logger.info("stopping %d process(es) left by this server's Ray instance: %s", len(left),
                        ", ".join(f"{process.name()} (pid {process.pid})" for process in left))
            for process in left:
                try:
                    getattr(process, stop)()
                except psutil.Error:
                    pass
            psutil.wait_procs(left, timeout=wait_s)

    def _probe_gcs(self) -> str | None:
        """None when the GCS answers a key lookup within ``probe_timeout_s``, else what went wrong."""
        import ray

        try:
            gcs = ray._private.worker.global_worker.gcs_client
            gcs.internal_kv_exists(_PROBE_KEY, _PROBE_NAMESPACE, timeout=self.placement.probe_timeout_s)
        except Exception as err:  # noqa: BLE001 - RpcError, or no client at all
            return f"{type(err).__name__}: {err}"
        return None

    def _dead_processes(self) -> str | None:
        """For an instance of its own: which of its processes (GCS, raylet, ...) ended, and how."""
        if not self.owned:
            return None
        import ray

        node = getattr(ray._private.worker, "_global_node", None)
        if node is None:
            return None
        try:
            dead = node.dead_processes()
        except Exception:  # noqa: BLE001 - only while Ray shuts down
            return None
        return ", ".join(f"Ray's {kind} (pid {process.pid}) {_exit_reason(process.poll())}"
                         for kind, process in dead) or None

    # --- stopping ---

    def close(self, before_disconnect: Callable[[], None] | None = None) -> None:
        """Stop watching, run ``before_disconnect`` (when connected), then leave the cluster; an instance of
        our own is stopped with all its processes. Bounded in time even with the GCS gone."""
        import ray

        self._stop.set()
        for watcher in self.status_watchers:
            watcher.stop()
        connected = self._problem is None
        self._problem = self._problem or "the server is leaving Ray (stopping)"
        if not connected and _ENDS_AFTER_SERVING:
            # Ray's shutdown would wait on a GCS that is gone (10 s and more), and stopping the raylet under a
            # connected driver makes Ray end the process at once. The process ends right after serving: the
            # kernel then kills what it started (PR_SET_PDEATHSIG), and the supervisor stops the rest.
            return
        # Nothing may call Ray while it shuts down: a probe or a status refresh under way is waited for.
        if self._watchdog is not None and self._watchdog is not threading.current_thread():
            self._watchdog.join(timeout=self.placement.probe_timeout_s + 5.0)
        for watcher in self.status_watchers:
            watcher.stop(wait_s=10.0)
        if self._adopted:
            if before_disconnect is not None and connected:
                _bounded(before_disconnect, 30.0, "removing the application from Ray Serve")
            return
        if before_disconnect is not None and connected and not self.owned:
            _bounded(before_disconnect, 30.0, "removing the application from Ray Serve")
        if self.owned:
            logger.info("stopping this server's Ray instance")
            self._remember_family()
        if ray.is_initialized():
            _bounded(ray.shutdown, 30.0, "leaving Ray")
        if self.owned:
            self._stop_family()
        self._released.set()


def _bounded(function: Callable[[], None], timeout_s: float, what: str) -> None:
    """Run ``function`` in a thread, waiting at most ``timeout_s`` (Ray calls can hang when Ray is gone)."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            function()
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    thread = threading.Thread(target=run, name="ragr1-ray-close", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        logger.warning("%s took more than %g s: given up", what, timeout_s)
    elif errors:
        logger.warning("%s failed: %s", what, errors[0])


_connection: RayConnection | None = None
_connection_lock = threading.Lock()


def cpus_needed(index_dir: Path, placement: RayPlacement) -> float:
    """The CPUs Ray must reserve for every shard and encoder replica (none for an unsharded index)."""
    if Manifest.read(index_dir).kind != "sharded":
        return 0.0
    shards = len(read_shards(index_dir))
    return shards * placement.shard_replicas * placement.shard_cpus + placement.encoder_replicas


def connect(placement: RayPlacement, index_dir: Path | None = None) -> RayConnection:
    """Join (or start) the Ray cluster the placement names, once per process (until :func:`disconnect`)."""
    global _connection
    with _connection_lock:
        if _connection is None:
            needed = cpus_needed(index_dir, placement) if index_dir is not None else 0.0
            _connection = RayConnection(placement, needed).open()
        return _connection


def current_connection() -> RayConnection | None:
    return _connection


def disconnect(before_disconnect: Callable[[], None] | None = None) -> None:
    """Leave Ray (stopping the instance of our own); a no-op when not connected."""
    global _connection
    with _connection_lock:
        connection, _connection = _connection, None
    if connection is not None:
        connection.close(before_disconnect)


def check_memory(index_dir: Path, placement: RayPlacement, batch_queries: int, reserve_bytes: int = 0) -> None:
    """Raise PlacementError, before any deployment, when the shard replicas do not fit on the cluster's nodes
    (CPU: Ray's schedulable memory per node; GPU: one GPU per replica, ``gpu_memory_gib`` each)."""
    import ray

    connect(placement, index_dir)
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


def deploy_shards(index_dir: Path, manifest: Manifest, infos: list[ShardInfo], options, placement: RayPlacement,
                  metrics: ServerMetrics, on_status=None) -> tuple[list[RayShard], RemoteEncoder | None,
                                                                    DeploymentStatus, str]:
    """Start (or replace) the application on Ray; returns the shards, the remote encoder (or None), the
    deployments' status, and a description of where they run. ``on_status`` gets the status snapshot
    function as soon as it exists."""
    import ray
    from ray import serve

    connection = connect(placement, index_dir)
    # The front is waitress: Ray Serve's own HTTP proxies are not started.
    serve.start(proxy_location="Disabled")
    logger.info("deploying %d shards on Ray (%s, %d replica(s) each)", len(infos), placement.shard_device,
                placement.shard_replicas)
    # Watched from before the deployment, so that /health shows each shard's state while they load.
    status = DeploymentStatus(placement.status_interval_s, connection).start()
    connection.status_watchers.append(status)
    if on_status is not None:
        on_status(status.snapshot)
    serve.run(_application(index_dir, manifest, infos, options, placement), name=APP_NAME, route_prefix=None)
    status.refresh()
    handles = [serve.get_deployment_handle(shard_deployment_name(info.number), APP_NAME) for info in infos]
    for info, handle in zip(infos, handles):  # every shard answers before the server says ready
        served = handle.describe.remote().result(timeout_s=max(placement.call_timeout_s, 60.0))
        if served["number"] != info.number or served["start"] != info.start:
            raise RuntimeError(f"deployment {shard_deployment_name(info.number)} serves {served}, not {info}")
    shards = [RayShard(info, handle, status, placement.call_timeout_s) for info, handle in zip(infos, handles)]
    encoder = None
    if placement.encoder_replicas and manifest.index["kind"] == "dense":
        encoder = RemoteEncoder(serve.get_deployment_handle(ENCODER_DEPLOYMENT, APP_NAME),
                                EncoderSpec.from_dict(manifest.encoder["spec"]), status, placement.call_timeout_s)
    where = (f"Ray Serve ({len(ray.nodes())} node(s), shards on {placement.shard_device}, "
             f"{'a Ray instance of its own' if connection.owned else 'cluster ' + str(connection.gcs_address)})")
    return shards, encoder, status, where


def shutdown(status: DeploymentStatus | None = None) -> None:
    """Remove the application and leave the Ray cluster (a joined cluster keeps running; an instance of our
    own is stopped with all its processes)."""
    from ray import serve

    if status is not None:
        status.stop()
    disconnect(before_disconnect=lambda: serve.delete(APP_NAME))


@dataclass(frozen=True)
class RayDeployer:
    """The shards of a sharded index as Ray Serve deployments (a :class:`~retriever_server.sharded.ShardDeployer`
    for ``LoadOptions.deployer``). It holds only the placement: the connection is this process's."""

    placement: RayPlacement

    def connection(self) -> RayConnection | None:
        return current_connection()

    def check_memory(self, index_dir: Path, batch_queries: int, reserve_bytes: int) -> None:
        check_memory(index_dir, self.placement, batch_queries, reserve_bytes)

    def deploy(self, index_dir: Path, manifest: Manifest, infos: list[ShardInfo], options, metrics: ServerMetrics,
               on_status, on_lost) -> ShardDeployment:
        connect(self.placement, index_dir).on_lost = on_lost
        shards, encoder, status, where = deploy_shards(index_dir, manifest, infos, options, self.placement, metrics,
                                                       on_status)
        return ShardDeployment(shards, encoder, status.snapshot, functools.partial(shutdown, status), where)

    def leave(self) -> None:
        disconnect()
