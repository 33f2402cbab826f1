"""The real server (waitress + Flask + faiss + MiniLM) on a loopback port, over HTTP."""

import re
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from retriever_server.batcher import BatchingConfig
from retriever_server.demo import DEMO_CORPUS
from retriever_server.service import LoadOptions
from retriever_server.wire import RequestLimits
from tests.retriever_server.helpers import post_retrieve, serving

DEMO_SIZE = sum(1 for line in DEMO_CORPUS.read_text(encoding="utf-8").splitlines() if line.strip())


def _metric(url: str, name: str) -> float:
    text = requests.get(f"{url}/metrics", timeout=10).text
    values = [float(v) for v in re.findall(rf"^{name} ([0-9.e+]+)$", text, flags=re.MULTILINE)]
    return sum(values)


def test_health_reports_a_ready_demo_index(demo_server):
    url, _ = demo_server
    health = requests.get(f"{url}/health", timeout=10).json()
    assert health["ready"] is True and health["status"] == "ready"
    assert health["corpus_size"] == DEMO_SIZE and health["index_type"] == "Flat" and health["encoder"] == "minilm"
    assert health["uptime_s"] >= 0


def test_single_hop_demo_questions_find_their_passage(demo_server, demo_questions):
    url, _ = demo_server
    single = [q for q in demo_questions if q["type"] == "single-hop"]
    result = post_retrieve(url, {"queries": [q["question"] for q in single], "topk": 3}).json()["result"]
    found = [q["id"] for q, docs in zip(single, result) if q["supporting_ids"][0] in {d["id"] for d in docs}]
    assert len(found) >= 0.95 * len(single)


def test_each_hop_of_a_comparison_question_is_found_by_its_own_query(demo_server, demo_questions):
    url, service = demo_server
    comparisons = [q for q in demo_questions if q.get("hops") == "comparison"]
    for question in comparisons[:6]:
        titles = [service.corpus.documents([int(i)])[0]["contents"].split("\n")[0].strip('"')
                  for i in question["supporting_ids"]]
        result = post_retrieve(url, {"queries": titles, "topk": 1}).json()["result"]
        assert [docs[0]["id"] for docs in result] == question["supporting_ids"]


def test_response_shape_with_scores(demo_server):
    url, _ = demo_server
    response = post_retrieve(url, {"queries": ["Eiffel Tower", "Who discovered penicillin?"], "topk": 4,
                                   "return_scores": True})
    assert response.status_code == 200 and response.headers["Content-Type"] == "application/json"
    result = response.json()["result"]
    assert len(result) == 2
    for hits in result:
        assert len(hits) == 4
        assert all(set(hit) == {"document", "score"} and set(hit["document"]) == {"id", "contents"} for hit in hits)
        scores = [hit["score"] for hit in hits]
        assert all(isinstance(s, float) for s in scores) and scores == sorted(scores, reverse=True)
        assert all(hit["document"]["contents"].startswith('"') for hit in hits)


def test_response_shape_without_scores_and_default_topk(demo_server):
    url, _ = demo_server
    result = post_retrieve(url, {"queries": ["Eiffel Tower"]}).json()["result"]
    assert len(result) == 1 and len(result[0]) == 3
    assert all(set(doc) == {"id", "contents"} for doc in result[0])
    with_scores = post_retrieve(url, {"queries": ["Eiffel Tower"], "return_scores": True}).json()["result"]
    assert [hit["document"] for hit in with_scores[0]] == result[0]


def test_topk_larger_than_the_corpus_returns_every_passage_once(tmp_path, demo_index):
    url_result = None
    with serving(demo_index, limits=RequestLimits(max_topk=1000)) as (url, _):
        url_result = post_retrieve(url, {"queries": ["rivers"], "topk": 1000}).json()["result"][0]
    assert len(url_result) == DEMO_SIZE and len({d["id"] for d in url_result}) == DEMO_SIZE


def test_32_concurrent_clients_get_correct_answers_and_requests_are_coalesced(demo_index, demo_questions):
    questions = [q["question"] for q in demo_questions]
    with serving(demo_index, batching=BatchingConfig(max_wait_ms=5)) as (url, _):
        expected = post_retrieve(url, {"queries": questions, "topk": 3}).json()["result"]
        batches_before = _metric(url, "ragr1_retriever_batches_total")

        def client(number: int):
            picked = [number % len(questions), (number * 7 + 3) % len(questions), (number * 13) % len(questions)]
            response = post_retrieve(url, {"queries": [questions[i] for i in picked], "topk": 3})
            return picked, response

        with ThreadPoolExecutor(max_workers=32) as pool:
            outcomes = list(pool.map(client, range(256)))
        batches = _metric(url, "ragr1_retriever_batches_total") - batches_before
        deduplicated = _metric(url, "ragr1_retriever_deduplicated_queries_total")
        cache_hits = _metric(url, "ragr1_retriever_cache_hits_total")
    assert all(response.status_code == 200 for _, response in outcomes)
    for picked, response in outcomes:
        got = [[d["id"] for d in docs] for docs in response.json()["result"]]
        assert got == [[d["id"] for d in expected[i]] for i in picked]
    assert batches < 256 / 2, f"{batches} batches for 256 requests: requests were not coalesced"
    assert deduplicated > 0 and cache_hits > 0


BAD_REQUESTS = [
    ("not json", {"data": b"{oops", "headers": {"Content-Type": "application/json"}}, 400, "not valid JSON"),
    ("json list", {"json": ["q"]}, 400, "JSON object"),
    ("missing queries", {"json": {"topk": 3}}, 400, "'queries' is missing"),
    ("empty queries", {"json": {"queries": []}}, 400, "'queries' is empty"),
    ("queries not a list", {"json": {"queries": "what"}}, 400, "must be a list of strings"),
    ("non-string item", {"json": {"queries": ["ok", 5]}}, 400, "queries[1] must be a string"),
    ("too many queries", {"json": {"queries": ["q"] * 513}}, 400, "too many queries"),
    ("query too long", {"json": {"queries": ["x" * 2049]}}, 400, "queries[0] has 2049 characters"),
    ("topk zero", {"json": {"queries": ["q"], "topk": 0}}, 400, "between 1 and 100"),
    ("topk too big", {"json": {"queries": ["q"], "topk": 101}}, 400, "between 1 and 100"),
    ("topk float", {"json": {"queries": ["q"], "topk": 2.5}}, 400, "must be an integer"),
    ("topk string", {"json": {"queries": ["q"], "topk": "3"}}, 400, "must be an integer"),
    ("return_scores string", {"json": {"queries": ["q"], "return_scores": "yes"}}, 400, "true or false"),
    ("wrong content type", {"data": b'{"queries": ["q"]}', "headers": {"Content-Type": "text/plain"}}, 415,
     "application/json"),
    ("oversized body", {"data": b'{"queries": ["' + b"a" * (5 * 1024 * 1024) + b'"]}',
                        "headers": {"Content-Type": "application/json"}}, 413, "Too Large"),
    ("nesting bomb", {"data": b"[" * 1000 + b"]" * 1000, "headers": {"Content-Type": "application/json"}}, 400,
     "nested too deeply"),
    ("nesting bomb in a field", {"data": b'{"queries": ["q"], "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                                 "headers": {"Content-Type": "application/json"}}, 400, "nested too deeply"),
    ("huge integer", {"data": b'{"queries": ["q"], "topk": ' + b"1" * 4301 + b"}",
                      "headers": {"Content-Type": "application/json"}}, 400, "not valid JSON"),
    ("amplification", {"json": {"queries": [f"q{i}" for i in range(512)], "topk": 100}}, 413,
     "512 queries x topk 100"),
]


@pytest.mark.parametrize("name, request_kwargs, status, message", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_input_gets_a_json_error_and_the_server_keeps_serving(demo_server, name, request_kwargs, status,
                                                                  message):
    url, _ = demo_server
    response = requests.post(f"{url}/retrieve", timeout=30, **request_kwargs)
    assert response.status_code == status
    assert message in response.json()["error"]
    assert "Traceback" not in response.text
    assert post_retrieve(url, {"queries": ["Eiffel Tower"]}).status_code == 200


def test_wrong_method_and_unknown_path_are_json(demo_server):
    url, _ = demo_server
    assert requests.get(f"{url}/retrieve", timeout=10).status_code == 405
    missing = requests.get(f"{url}/search", timeout=10)
    assert missing.status_code == 404 and "error" in missing.json()


def test_bearer_token(demo_index):
    with serving(demo_index, auth_token="s3cret") as (url, _):
        payload = {"queries": ["Eiffel Tower"]}
        anonymous = post_retrieve(url, payload)
        assert anonymous.status_code == 401 and anonymous.headers["WWW-Authenticate"] == "Bearer"
        assert "bearer token" in anonymous.json()["error"]
        assert post_retrieve(url, payload, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert post_retrieve(url, payload, headers={"Authorization": "s3cret"}).status_code == 401
        assert post_retrieve(url, payload, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert requests.get(f"{url}/metrics", timeout=10).status_code == 401
        assert requests.get(f"{url}/metrics", headers={"Authorization": "Bearer s3cret"}, timeout=10).ok
        assert requests.get(f"{url}/health", timeout=10).status_code == 200


def test_not_ready_while_loading(demo_index):
    with serving(demo_index, load=False) as (url, service):
        health = requests.get(f"{url}/health", timeout=10)
        assert health.status_code == 503 and health.json()["ready"] is False
        response = post_retrieve(url, {"queries": ["x"]})
        assert response.status_code == 503 and "not ready" in response.json()["error"]
        service.load()
        assert post_retrieve(url, {"queries": ["x"]}).status_code == 200


def test_metrics_are_prometheus_text(demo_server):
    url, _ = demo_server
    post_retrieve(url, {"queries": ["Eiffel Tower", "Eiffel Tower"]})
    text = requests.get(f"{url}/metrics", timeout=10).text
    for name in ("ragr1_retriever_requests_total", "ragr1_retriever_request_seconds_bucket",
                 "ragr1_retriever_batch_queries_bucket", "ragr1_retriever_cache_hits_total",
                 "ragr1_retriever_queries_total", "ragr1_retriever_encode_seconds_bucket",
                 "ragr1_retriever_search_seconds_bucket", "ragr1_retriever_deduplicated_queries_total"):
        assert name in text
    assert _metric(url, "ragr1_retriever_deduplicated_queries_total") >= 1


def test_bm25_server(demo_bm25_index, demo_questions):
    single = [q for q in demo_questions if q["type"] == "single-hop"]
    with serving(demo_bm25_index) as (url, _):
        assert requests.get(f"{url}/health", timeout=10).json()["encoder"] is None
        result = post_retrieve(url, {"queries": [q["question"] for q in single], "topk": 3,
                                     "return_scores": True}).json()["result"]
        stopwords_only = post_retrieve(url, {"queries": ["the of and"]}).json()["result"]
    found = sum(q["supporting_ids"][0] in {h["document"]["id"] for h in hits} for q, hits in zip(single, result))
    assert found >= 0.85 * len(single)
    assert stopwords_only == [[]]


def test_torch_exact_backend_serves_the_same_results_as_faiss(demo_index, demo_server, demo_questions):
    url, _ = demo_server
    queries = [q["question"] for q in demo_questions[:40]]
    expected = post_retrieve(url, {"queries": queries, "topk": 3}).json()["result"]
    options = LoadOptions(search_backend="torch", search_devices=("cpu", "cpu"))
    with serving(demo_index, options=options) as (torch_url, service):
        assert service.health()["backend"]["searcher"] == "TorchExactSearcher"
        got = post_retrieve(torch_url, {"queries": queries, "topk": 3}).json()["result"]
    assert [[d["id"] for d in docs] for docs in got] == [[d["id"] for d in docs] for docs in expected]
