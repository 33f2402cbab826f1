"""Sharded indexes on a real two-node Ray cluster (``ray.cluster_utils.Cluster`` on this machine): the merged
top-k equals the single-process server's for every demo question, existing clients work unchanged, and a
killed shard replica gives 503s naming it or complete answers, then is replaced, with nothing hanging and
nothing partial."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from retriever_server.batcher import BatchingConfig
from retriever_server.demo import load_demo_questions
from retriever_server.http_server import serving
from retriever_server.service import LoadOptions, RetrievalService
from retriever_server.sharding import shard_index
from tests.ray_cluster import free_port
from tests.retriever_server.shard_kill import assert_served_through_the_kill, search_through_a_kill

ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve")
from ray.util.state import list_actors  # noqa: E402

pytestmark = pytest.mark.slow

QUESTIONS = [question["question"] for question in load_demo_questions()]
TOPK = 3


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    # A dashboard port of its own: another Ray on this machine (a training run, `ray start`) may hold 8265, and
    # the state API (list_actors) needs this cluster's dashboard.
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "dashboard_port": free_port()})
    nodes.add_node(num_cpus=2)
    nodes.wait_for_nodes()
    yield nodes
    if ray.is_initialized():
        ray.shutdown()
    nodes.shutdown()


def _alive_actors(cluster) -> list:
    """This cluster's live actors (by its address: with several Ray instances on the machine, Ray would
    otherwise pick the latest)."""
    return list_actors(address=cluster.address, filters=[("state", "=", "ALIVE")])


def _placement(cluster, **overrides):
    """The shards on this cluster, as ``ragr1-retriever serve --ray`` deploys them."""
    from retriever_server.ray_serve import RayDeployer, RayPlacement

    return RayDeployer(RayPlacement(address=cluster.address,
                                    **{"shard_cpus": 1.0, "call_timeout_s": 10.0, **overrides}))


def _ranking(service: RetrievalService) -> tuple[list[list[str]], list[list[float]]]:
    documents, scores = service.search(QUESTIONS, TOPK)
    return [[document["id"] for document in row] for row in documents], scores


@pytest.fixture(scope="module")
def reference(demo_index, demo_bm25_index):
    """The single-process server's ranking of every demo question, per index kind."""
    rankings = {}
    for kind, index in (("dense", demo_index), ("bm25", demo_bm25_index)):
        service = RetrievalService(index, LoadOptions(), BatchingConfig())
        service.load()
        rankings[kind] = _ranking(service)
        service.close()
    return rankings


def _assert_same_ranking(got: tuple, expected: tuple) -> None:
    for ids, scores, want_ids, want_scores in zip(*got, *expected):
        assert np.allclose(scores, want_scores, atol=1e-4), (ids, scores, want_ids, want_scores)
        # Equal scores may come in any order, and a tie at the cut-off may keep either passage.
        groups = {}
        for identifier, score in zip(want_ids, want_scores):
            groups.setdefault(round(score, 4), set()).add(identifier)
        last = round(want_scores[-1], 4) if want_scores else None
        for score, members in groups.items():
            if score != last:
                assert members == {i for i, s in zip(ids, scores) if round(s, 4) == score}, (ids, want_ids)


@pytest.mark.parametrize("kind, num_shards", [("dense", 2), ("dense", 3), ("bm25", 2), ("bm25", 3)])
def test_sharded_results_equal_the_single_process_server(cluster, reference, demo_index, demo_bm25_index,
                                                         tmp_path, kind, num_shards):
    sharded = shard_index(demo_index if kind == "dense" else demo_bm25_index, tmp_path / "sharded", num_shards)
    assert len(sharded.shards) == num_shards
    service = RetrievalService(tmp_path / "sharded", LoadOptions(deployer=_placement(cluster)), BatchingConfig())
    service.load()
    try:
        assert set(service.health()["shards"]) >= {f"shard-{n}" for n in range(num_shards)}
        nodes = {actor.node_id for actor in _alive_actors(cluster)
                 if "shard-" in actor.class_name}
        assert len(nodes) == 2, "the shards should spread over both nodes"
        _assert_same_ranking(_ranking(service), reference[kind])
    finally:
        service.close()


@pytest.fixture(scope="module")
def ray_server(cluster, demo_bm25_index, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ray-index") / "sharded"
    shard_index(demo_bm25_index, folder, 2)
    with serving(folder, options=LoadOptions(deployer=_placement(cluster, call_timeout_s=5.0))) as (url, service):
        yield url, service


def test_existing_clients_work_unchanged(ray_server, reference):
    from ragr1_verl.retrieval_client import RetrievalClient, RetrieverSettings

    url, service = ray_server
    baseline = _ranking(service)[0]
    # verl 0.7's Search-R1-style tool posts queries and reads result[i][j]["document"]["contents"].
    body = requests.post(f"{url}/retrieve", json={"queries": QUESTIONS[:4], "topk": TOPK, "return_scores": True},
                         timeout=30).json()
    got = ([[hit["document"]["id"] for hit in row] for row in body["result"]],
           [[hit["score"] for hit in row] for row in body["result"]])
    _assert_same_ranking(got, tuple(part[:4] for part in reference["bm25"]))
    assert all(hit["document"]["contents"] for row in body["result"] for hit in row)

    async def rollout_client():
        client = RetrievalClient(RetrieverSettings(f"{url}/retrieve"))
        try:
            return await asyncio.gather(*(client.search([question], TOPK) for question in QUESTIONS[4:12]))
        finally:
            await client.close()

    results = asyncio.run(rollout_client())
    assert [[d["id"] for d in result.documents[0]] for result in results] == baseline[4:12]


def _shard_actor_state(cluster, number: int):
    [actor] = [a for a in _alive_actors(cluster) if a.class_name.endswith(f":shard-{number}")]
    return actor


def _query(url: str, question: str) -> tuple[int, dict, float]:
    started = time.monotonic()
    response = requests.post(f"{url}/retrieve", json={"queries": [question], "topk": TOPK}, timeout=60)
    return response.status_code, response.json(), time.monotonic() - started


def test_a_killed_shard_gives_503s_naming_it_or_complete_answers_then_recovers(cluster, ray_server):
    url, service = ray_server
    expected = dict(zip(QUESTIONS, _ranking(service)[0]))
    killed = _shard_actor_state(cluster, 1)

    def replaced() -> bool:
        return any(a.class_name.endswith(":shard-1") and (a.actor_id, a.pid) != (killed.actor_id, killed.pid)
                   for a in _alive_actors(cluster))

    def kill() -> None:
        ray.kill(ray.get_actor(killed.name, namespace=killed.ray_namespace), no_restart=False)

    def complete(question: str, body: dict) -> None:
        assert [hit["id"] for hit in body["result"][0]] == expected[question]

    outcomes = search_through_a_kill(kill, replaced, lambda question: _query(url, question), QUESTIONS[:16])
    # the shard call timeout, plus the front's own work on a busy machine
    assert_served_through_the_kill(outcomes, 1, 5.0 + 10.0, complete)


def test_sharding_refuses_bad_requests(demo_bm25_index, tmp_path):
    from retriever_server.manifest import ManifestError

    with pytest.raises(ValueError, match="cannot cut"):
        shard_index(demo_bm25_index, tmp_path / "too-many", 10_000)
    shard_index(demo_bm25_index, tmp_path / "once", 2)
    with pytest.raises(ManifestError, match="already holds"):
        shard_index(demo_bm25_index, tmp_path / "once", 2)
    with pytest.raises(ManifestError, match="sharded already"):
        shard_index(tmp_path / "once", tmp_path / "twice", 2)
    assert Path(tmp_path / "once" / "shard-00001" / "manifest.json").is_file()


def test_a_placement_that_does_not_fit_is_refused_before_any_deployment(cluster, demo_index, demo_bm25_index,
                                                                         tmp_path):
    from retriever_server.plan import PlacementError

    shard_index(demo_index, tmp_path / "dense", 2)
    shard_index(demo_bm25_index, tmp_path / "bm25", 2)
    cases = [("dense", LoadOptions(deployer=_placement(cluster, shard_device="cuda", gpu_memory_gib=80.0)),
              "no cuda device to place 2 shard"),  # this cluster has no GPU
             ("bm25", LoadOptions(deployer=_placement(cluster, shard_replicas=2), reserve_memory_gib=1e6),
              r"shard \d needs .* on cpu but the most free on any device is 0 B")]
    for folder, options, reason in cases:
        before = {actor.actor_id for actor in _alive_actors(cluster)}
        service = RetrievalService(tmp_path / folder, options, BatchingConfig())
        with pytest.raises(PlacementError, match=reason):
            service.load()
        assert service.state == "failed"
        after = {actor.actor_id for actor in _alive_actors(cluster)}
        assert after <= before, "nothing may be deployed for a placement that does not fit"
