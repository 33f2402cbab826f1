"""``ragr1-retriever serve --ray`` started as a user starts it, as a subprocess, in both modes: with a Ray
instance of its own (no address) and on a cluster started by ``ray start``. Both run beside that cluster,
whose address file the first must ignore. For each: the demo index in 2 shards answers 200 requests from 16
concurrent clients exactly as the single-process server does; a shard replica killed under load gives 503s
naming it or complete answers, never anything else, and is replaced; SIGTERM stops the server and every Ray process it started, and nothing else.
A cluster's GCS that stops answering for a while gives 503s naming it, then the server serves again; a
server whose own Ray instance loses its GCS exits with status 1 and one log line, leaving no process behind
(issue 24: Ray started by the serving process died with the thread that started it, and took the server
down 60 s later, silently)."""

from __future__ import annotations

import concurrent.futures
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from retriever_server.demo import load_demo_questions
from retriever_server.sharding import shard_index
from tests.ray_cluster import alive, descendants, free_port, ray_start_cluster, stop_processes, wait_gone
from tests.retriever_server.shard_kill import assert_served_through_the_kill, search_through_a_kill

pytest.importorskip("ray.serve")
psutil = pytest.importorskip("psutil")

pytestmark = pytest.mark.slow

QUESTIONS = [question["question"] for question in load_demo_questions()]
TOPK = 3
REPLICA = "ray::ServeReplica:ragr1-retriever:shard-{}"


@pytest.fixture(scope="module")
def cluster():
    with ray_start_cluster(num_cpus=3) as started:
        yield started


@pytest.fixture(scope="module")
def sharded_demo(demo_index, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ray-cli") / "sharded-demo"
    shard_index(demo_index, folder, 2)
    return folder


@pytest.fixture(scope="module")
def reference(demo_server) -> dict[str, tuple[list[str], list[float]]]:
    """The single-process server's answer to every demo question."""
    url, _ = demo_server
    body = requests.post(f"{url}/retrieve", json={"queries": QUESTIONS, "topk": TOPK, "return_scores": True},
                         timeout=60).json()
    return {question: ([hit["document"]["id"] for hit in row], [hit["score"] for hit in row])
            for question, row in zip(QUESTIONS, body["result"])}


class Server:
    """``ragr1-retriever serve --ray`` in a subprocess, its output in a log file."""

    def __init__(self, index: Path, env: dict[str, str], log: Path, *options: str):
        script = Path(sys.executable).with_name("ragr1-retriever")
        command = [str(script)] if script.exists() else [sys.executable, "-m", "retriever_server.cli"]
        self.port, self.log = free_port(), log
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen([*command, "serve", "--ray", "--index", str(index), "--port", str(self.port),
                                         "--shard-timeout", "10", *options], env=env, stdout=self._log,
                                        stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float = 300.0) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"the server exited ({self.process.returncode}):\n{self.output()}"
            try:
                health = requests.get(f"{self.url}/health", timeout=5).json()
                if health["ready"]:
                    return health
            except requests.RequestException:
                pass
            time.sleep(1.0)
        raise AssertionError(f"not ready within {timeout_s:g} s:\n{self.output()}")

    def output(self) -> str:
        self._log.flush()
        return self.log.read_text(errors="replace")[-6000:]

    def family(self) -> list:
        return descendants(self.process.pid)

    def stop(self) -> None:
        family = self.family()
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        stop_processes(family)
        self._log.close()


def _query(url: str, queries: list[str], session: requests.Session | None = None) -> tuple[int, dict, float]:
    started = time.monotonic()
    response = (session or requests).post(f"{url}/retrieve", json={"queries": queries, "topk": TOPK,
                                                                     "return_scores": True}, timeout=60)
    return response.status_code, response.json(), time.monotonic() - started


def _assert_like_reference(queries: list[str], body: dict, reference: dict) -> None:
    from tests.retriever_server.test_ray_serve import _assert_same_ranking

    got = ([[hit["document"]["id"] for hit in row] for row in body["result"]],
           [[hit["score"] for hit in row] for row in body["result"]])
    expected = ([reference[q][0] for q in queries], [reference[q][1] for q in queries])
    _assert_same_ranking(got, expected)


def _load(url: str, reference: dict, requests_count: int = 200, clients: int = 16) -> None:
    rng = random.Random(24)
    batches = [rng.sample(QUESTIONS, rng.randint(1, 3)) for _ in range(requests_count)]
    sessions: dict[int, requests.Session] = {}

    def send(queries: list[str]) -> tuple[list[str], int, dict]:
        import threading

        session = sessions.setdefault(threading.get_ident(), requests.Session())
        status, body, _ = _query(url, queries, session)
        return queries, status, body

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        answers = list(pool.map(send, batches))
    assert [status for _, status, _ in answers] == [200] * requests_count, [b for _, s, b in answers if s != 200][:3]
    for queries, _, body in answers:
        _assert_like_reference(queries, body, reference)


def _core(processes) -> list:
    """The processes of a cluster that live as long as it does (its workers come and go), and Serve's
    controller (it outlives the applications)."""
    core = [p for p in alive(processes) if not p.name().startswith("ray::") or p.name() == "ray::ServeController"]
    assert {"gcs_server", "raylet"} <= {p.name() for p in core}, core
    return core


def _replica(processes, shard: int):
    [replica] = [p for p in alive(processes) if p.name() == REPLICA.format(shard)]
    return replica


def _kill_a_replica_under_load(url: str, reference: dict, processes) -> None:
    """``processes()``: the processes that hold the shard replicas (they change as the replica is replaced)."""
    killed = _replica(processes(), 1)

    def replaced() -> bool:
        return any(p.name() == REPLICA.format(1) and p.pid != killed.pid for p in alive(processes()))

    outcomes = search_through_a_kill(killed.kill, replaced, lambda q: _query(url, [q]), QUESTIONS[:16])
    # the shard call timeout, plus the front's own work on a busy machine
    assert_served_through_the_kill(outcomes, 1, 10.0 + 10.0,
                                   lambda question, body: _assert_like_reference([question], body, reference))


def _gcs_away_then_back(url: str, cluster) -> None:
    """The cluster's GCS stops answering (frozen) for a while: 503s naming it, /health says so, then the
    server serves again once it answers."""
    [gcs] = [p for p in alive(cluster.processes()) if p.name() == "gcs_server"]
    gcs.suspend()
    try:
        deadline, refused = time.monotonic() + 20, None
        while time.monotonic() < deadline and refused is None:
            status, body, seconds = _query(url, [QUESTIONS[0]])
            assert status in (200, 503) and seconds < 5.0, (status, body, seconds)
            refused = body if status == 503 else None
            time.sleep(0.2)
        health = requests.get(f"{url}/health", timeout=5)
    finally:
        gcs.resume()
    assert refused is not None, "still answering 200 twenty seconds after the GCS stopped answering"
    assert f"GCS at {cluster.address} does not answer" in refused["error"], refused
    assert health.status_code == 503 and health.json()["ray"]["connected"] is False, health.text
    assert "does not answer" in health.json()["error"], health.text
    deadline = time.monotonic() + 30
    while requests.get(f"{url}/health", timeout=5).status_code != 200:
        assert time.monotonic() < deadline, "the server did not serve again once the GCS answered"
        time.sleep(0.5)
    assert _query(url, [QUESTIONS[0]])[0] == 200


@pytest.mark.parametrize("mode", ["own", "cluster"])
def test_serve_ray_as_a_user_starts_it(mode, cluster, sharded_demo, reference, tmp_path):
    cluster_before = cluster.processes()
    options = ("--ray-address", "auto") if mode == "cluster" else ()  # own: the cluster's address file is there
    server = Server(sharded_demo, cluster.env(), tmp_path / "serve.log", *options)
    try:
        health = server.wait_ready()
        assert health["ray"]["started_here"] is (mode == "own"), health
        assert (health["ray"]["address"] == cluster.address) is (mode == "cluster"), (health, cluster.address)
        assert health["shards"]["shard-0"] == health["shards"]["shard-1"] == "HEALTHY", health

        _load(server.url, reference)

        _kill_a_replica_under_load(server.url, reference, server.family if mode == "own" else cluster.processes)
        _load(server.url, reference, requests_count=32)
        if mode == "cluster":
            _gcs_away_then_back(server.url, cluster)

        started_here = [p for p in server.family() if p.pid != server.process.pid]
        if mode == "cluster":  # only the serving process: the shard replicas are the cluster's processes
            assert {p.name() for p in started_here} <= {"python3", "python", "ragr1-retriever"}, started_here
        app = [p for p in alive(cluster.processes()) if p.name().startswith("ray::ServeReplica:ragr1-retriever")]
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=90) == 0, server.output()
        assert not wait_gone(started_here, 20.0), (wait_gone(started_here, 0), server.output())
        assert not wait_gone(app, 30.0), "the application's replicas outlived the server"
        assert alive(_core(cluster_before)) == _core(cluster_before), "the server stopped processes it did not start"
        assert "Failed to connect to GCS" not in server.output()
    finally:
        server.stop()


def test_a_lost_ray_instance_ends_the_server_with_one_line(cluster, demo_bm25_index, tmp_path):
    """Its own Ray instance loses its GCS: the server cannot get it back, so it exits at once, with status 1
    and one log line naming the cause, leaving no Ray process behind; until then every answer is a 200 or a
    503 naming the cause (never a hang, never an empty reply)."""
    folder = tmp_path / "sharded-bm25"
    shard_index(demo_bm25_index, folder, 2)
    cluster_before = cluster.processes()
    server = Server(folder, cluster.env(), tmp_path / "serve.log")
    try:
        server.wait_ready()
        family = server.family()
        [gcs] = [p for p in family if p.name() == "gcs_server"]
        gcs.kill()
        deadline = time.monotonic() + 30
        while server.process.poll() is None and time.monotonic() < deadline:
            try:
                status, body, seconds = _query(server.url, [QUESTIONS[0]])
            except requests.ConnectionError:  # the server has closed its socket: it is exiting
                break
            assert seconds < 5.0 and status in (200, 503), (status, body, seconds)
            if status == 503:
                assert "lost the connection to Ray" in body["error"] and "gcs_server" in body["error"], body
            time.sleep(0.1)
        assert server.process.wait(timeout=60) == 1, server.output()
        stopped = [line for line in server.output().splitlines() if "ERROR ragr1-retriever: stopped:" in line]
        assert len(stopped) == 1, server.output()
        assert "lost the connection to Ray: Ray's gcs_server" in stopped[0] and "SIGKILL" in stopped[0], stopped
        assert not wait_gone(family, 20.0), wait_gone(family, 0)
        assert alive(_core(cluster_before)) == _core(cluster_before), "the server stopped processes it did not start"
    finally:
        server.stop()
