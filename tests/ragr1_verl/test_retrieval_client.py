"""The retrieval client against scriptable aiohttp servers on loopback, and once against the real server."""

from __future__ import annotations

import asyncio
import json
import socket

import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestServer

from ragr1_verl.retrieval_client import RetrievalClient, RetrieverSettings, SearchResult, shared_client


def _documents(query: str, topk: int) -> list[dict]:
    return [{"id": f"{query}/{rank}", "contents": f'"{query}"\nrank {rank}'} for rank in range(topk)]


def _ids(result: SearchResult) -> list[list[str]]:
    return [[document["id"] for document in documents] for documents in result.documents]


class FakeRetriever:
    """A ``/retrieve`` that records every request and misbehaves when told to."""

    def __init__(self):
        self.url = ""
        self.bodies: list[dict] = []
        self.headers: list[dict] = []
        self.statuses: list[int] = []  # answer these statuses, one per request, before answering normally
        self.bad_query: str | None = None  # a request holding it gets a 400, as the real server's limits do
        self.delay_s = 0.0
        self.drops = 0  # close the connection without an answer this many times
        self.raw_body: bytes | None = None  # answer 200 with exactly this body
        self.wrap_scores = False

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        self.headers.append(dict(request.headers))
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.drops:
            self.drops -= 1
            request.transport.close()
            return web.Response()
        if self.statuses:
            status = self.statuses.pop(0)
            return web.json_response({"error": f"scripted {status}"}, status=status)
        if self.bad_query in body["queries"]:
            number = body["queries"].index(self.bad_query)
            return web.json_response({"error": f"queries[{number}] has 9999 characters; the limit is 2048"},
                                     status=400)
        if self.raw_body is not None:
            return web.Response(body=self.raw_body, content_type="application/json")
        return web.json_response({"result": [self._hits(query, body["topk"]) for query in body["queries"]]})

    def _hits(self, query: str, topk: int) -> list[dict]:
        documents = _documents(query, topk)
        if self.wrap_scores:
            return [{"document": document, "score": 1.0 / (rank + 1)}
                    for rank, document in enumerate(documents)]
        return documents

    @property
    def queries_sent(self) -> list[list[str]]:
        return [body["queries"] for body in self.bodies]


@pytest_asyncio.fixture
async def start_fake():
    servers = []

    async def start() -> FakeRetriever:
        fake = FakeRetriever()
        app = web.Application()
        app.router.add_post("/retrieve", fake.handle)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        fake.url = str(server.make_url("/retrieve"))
        return fake

    yield start
    for server in servers:
        await server.close()


@pytest_asyncio.fixture
async def fake(start_fake) -> FakeRetriever:
    return await start_fake()


@pytest_asyncio.fixture
async def make_client():
    clients = []

    def make(urls, **overrides) -> RetrievalClient:
        # Tiny backoff keeps the retry tests fast; the window is wide enough for gather() to land in it.
        options = {"backoff_base_s": 0.001, "backoff_max_s": 0.004, "timeout_s": 5.0,
                   "coalesce_window_ms": 20.0}
        clients.append(RetrievalClient(RetrieverSettings(urls, **{**options, **overrides})))
        return clients[-1]

    yield make
    for client in clients:
        await client.close()


def _closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/retrieve"


@pytest.mark.asyncio
async def test_one_search_is_one_request_and_keeps_query_order(fake, make_client):
    client = make_client(fake.url)
    result = await client.search(["c", "a", "b"], 2)
    assert fake.bodies == [{"queries": ["c", "a", "b"], "topk": 2, "return_scores": False}]
    assert result.ok and result.error is None and result.attempts == 1 and result.elapsed_ms > 0
    assert _ids(result) == [["c/0", "c/1"], ["a/0", "a/1"], ["b/0", "b/1"]]
    assert result.documents[0][0]["contents"] == '"c"\nrank 0'
    assert (client.stats.http_requests, client.stats.coalesced_searches, client.stats.retries) == (1, 1, 0)


@pytest.mark.asyncio
async def test_concurrent_searches_share_one_request_with_duplicates_sent_once(fake, make_client):
    client = make_client(fake.url)
    searches = [[f"own {n}", "shared", f"own {(n + 1) % 10}"] for n in range(10)]
    results = await asyncio.gather(*(client.search(queries, 3) for queries in searches))
    assert len(fake.bodies) == 1
    sent = fake.queries_sent[0]
    assert sorted(sent) == sorted({query for queries in searches for query in queries}) and len(sent) == 11
    for queries, result in zip(searches, results, strict=True):
        assert result.ok and _ids(result) == [[f"{query}/{rank}" for rank in range(3)] for query in queries]
    assert client.stats.as_dict() == {"http_requests": 1, "coalesced_searches": 10, "retries": 0,
                                      "failovers": 0, "failed_searches": 0, "deduplicated_queries": 19}


@pytest.mark.asyncio
async def test_a_zero_window_coalesces_one_loop_iteration(fake, make_client):
    client = make_client(fake.url, coalesce_window_ms=0)
    results = await asyncio.gather(*(client.search([f"q{n}"], 1) for n in range(5)))
    assert len(fake.bodies) == 1 and all(result.ok for result in results)
    await client.search(["later"], 1)
    assert fake.queries_sent[1] == ["later"]


@pytest.mark.asyncio
async def test_a_caller_repeating_a_query_gets_it_twice(fake, make_client):
    result = await make_client(fake.url).search(["x", "y", "x"], 1)
    assert fake.queries_sent == [["x", "y"]] and _ids(result) == [["x/0"], ["y/0"], ["x/0"]]


@pytest.mark.asyncio
async def test_different_topk_values_go_in_separate_requests(fake, make_client):
    client = make_client(fake.url)
    small, large, small_again = await asyncio.gather(client.search(["a", "b"], 1), client.search(["a"], 4),
                                                     client.search(["b", "c"], 1))
    assert sorted((body["topk"], sorted(body["queries"])) for body in fake.bodies) == [(1, ["a", "b", "c"]),
                                                                                       (4, ["a"])]
    assert _ids(small) == [["a/0"], ["b/0"]] and _ids(small_again) == [["b/0"], ["c/0"]]
    assert _ids(large) == [["a/0", "a/1", "a/2", "a/3"]]


@pytest.mark.asyncio
async def test_requests_are_cut_at_the_query_cap_without_splitting_a_caller(fake, make_client):
    client = make_client(fake.url, max_queries_per_request=4)
    searches = [["a", "b"], ["c", "d"], ["e", "f", "g"], ["h"], ["a", "h"]]
    results = await asyncio.gather(*(client.search(queries, 1) for queries in searches))
    # The last caller's queries were all asked before, but in batches already full, so it gets its own.
    assert sorted(fake.queries_sent) == [["a", "b", "c", "d"], ["a", "h"], ["e", "f", "g", "h"]]
    assert [_ids(result) for result in results] == [[[f"{q}/0"] for q in queries] for queries in searches]


@pytest.mark.asyncio
async def test_a_caller_over_the_query_cap_is_split_and_reassembled(fake, make_client):
    client = make_client(fake.url, max_queries_per_request=4)
    queries = [f"q{n}" for n in range(10)]
    result = await client.search(queries, 1)
    assert sorted(len(sent) for sent in fake.queries_sent) == [2, 4, 4]
    assert result.ok and _ids(result) == [[f"{query}/0"] for query in queries]


@pytest.mark.asyncio
async def test_5xx_and_429_are_retried(fake, make_client):
    fake.statuses = [503, 429]
    client = make_client(fake.url)
    result = await client.search(["a"], 1)
    assert result.ok and result.attempts == 3 and len(fake.bodies) == 3
    assert (client.stats.retries, client.stats.http_requests, client.stats.failovers) == (2, 3, 0)


@pytest.mark.asyncio
async def test_all_attempts_failing_is_an_error_result(fake, make_client):
    fake.statuses = [500] * 10
    client = make_client(fake.url, max_retries=2)
    results = await asyncio.gather(client.search(["a"], 1), client.search(["b"], 1))
    for result in results:
        assert not result.ok and result.documents is None and result.attempts == 3
        assert result.error == "retriever unreachable after 3 attempts: retriever answered 500: scripted 500"
    assert len(fake.bodies) == 3 and client.stats.failed_searches == 2


@pytest.mark.asyncio
async def test_failover_from_a_closed_port_sticks_to_the_working_url(fake, make_client):
    client = make_client((_closed_port_url(), fake.url))
    first = await client.search(["a"], 1)
    assert first.ok and first.attempts == 2 and client.stats.failovers == 1
    second = await client.search(["b"], 1)
    assert second.ok and second.attempts == 1
    assert fake.queries_sent == [["a"], ["b"]]
    assert (client.stats.http_requests, client.stats.failovers, client.stats.retries) == (3, 1, 1)


@pytest.mark.asyncio
async def test_failover_on_5xx_moves_to_the_next_server(start_fake, make_client):
    loading, ready = await start_fake(), await start_fake()
    loading.statuses = [503] * 10
    client = make_client((loading.url, ready.url))
    assert (await client.search(["a"], 1)).ok
    assert (await client.search(["b"], 1)).ok
    assert len(loading.bodies) == 1 and ready.queries_sent == [["a"], ["b"]] and client.stats.failovers == 1


@pytest.mark.asyncio
async def test_the_bearer_token_is_sent(fake, make_client):
    assert (await make_client(fake.url, token="s3cret").search(["a"], 1)).ok
    assert (await make_client(fake.url).search(["a"], 1)).ok
    assert fake.headers[0]["Authorization"] == "Bearer s3cret" and "Authorization" not in fake.headers[1]


@pytest.mark.asyncio
async def test_a_refused_query_fails_only_its_own_search(fake, make_client):
    fake.bad_query = "too long"
    client = make_client(fake.url)
    before, bad, after = await asyncio.gather(client.search(["x", "y"], 1), client.search(["too long"], 1),
                                              client.search(["y", "z"], 1))
    assert _ids(before) == [["x/0"], ["y/0"]] and _ids(after) == [["y/0"], ["z/0"]]
    assert not bad.ok and bad.attempts == 1
    assert bad.error == "retriever answered 400: queries[0] has 9999 characters; the limit is 2048"
    assert sorted(fake.queries_sent[0]) == ["too long", "x", "y", "z"]
    assert sorted(fake.queries_sent[1:]) == [["too long"], ["x", "y"], ["y", "z"]]
    assert client.stats.failed_searches == 1 and client.stats.coalesced_searches == 3


@pytest.mark.asyncio
async def test_an_auth_error_is_not_resent_per_caller(fake, make_client):
    fake.statuses = [401]
    client = make_client(fake.url)
    results = await asyncio.gather(*(client.search([f"q{n}"], 1) for n in range(3)))
    assert len(fake.bodies) == 1
    assert all(result.error == "retriever answered 401: scripted 401" for result in results)


@pytest.mark.asyncio
@pytest.mark.parametrize("body, problem", [
    (b"<html>not json</html>", "the body is not JSON"),
    (json.dumps({"result": [[]]}).encode(), "1 result lists for 2 queries"),
    (json.dumps({"results": [[], []]}).encode(), "no 'result' list"),
    (json.dumps({"result": [[], {"id": "1"}]}).encode(), "result[1] is not a list"),
    (json.dumps({"result": [[], [{"id": "1", "text": "no contents"}]]}).encode(), "not a document"),
])
async def test_a_malformed_answer_is_an_error_and_not_retried(fake, make_client, body, problem):
    fake.raw_body = body
    client = make_client(fake.url)
    result = await client.search(["a", "b"], 1)
    assert not result.ok and result.attempts == 1 and len(fake.bodies) == 1
    assert result.error.startswith("retriever sent a bad answer: ") and problem in result.error


@pytest.mark.asyncio
async def test_search_r1_hits_with_scores_are_unwrapped(fake, make_client):
    fake.wrap_scores = True
    result = await make_client(fake.url).search(["a"], 2)
    assert result.documents == (tuple(_documents("a", 2)),)


@pytest.mark.asyncio
async def test_a_slow_server_times_out_after_the_retries(fake, make_client):
    fake.delay_s = 1.0
    client = make_client(fake.url, timeout_s=0.1, max_retries=1)
    result = await client.search(["a"], 1)
    assert not result.ok and result.attempts == 2 and len(fake.bodies) == 2
    assert result.error == "retriever unreachable after 2 attempts: timed out after 0.1s"
    assert 200 <= result.elapsed_ms < 900


@pytest.mark.asyncio
async def test_a_dropped_connection_is_retried(fake, make_client):
    fake.drops = 1
    client = make_client(fake.url)
    result = await client.search(["a"], 1)
    assert result.ok and result.attempts == 2 and client.stats.retries == 1


@pytest.mark.asyncio
async def test_cancelling_a_caller_in_flight_leaves_its_batch_alone(fake, make_client):
    fake.delay_s = 0.2
    client = make_client(fake.url)
    doomed = asyncio.create_task(client.search(["a"], 1))
    survivor = asyncio.create_task(client.search(["b"], 1))
    await asyncio.sleep(0.1)
    assert fake.queries_sent == [["a", "b"]]
    doomed.cancel()
    result = await survivor
    assert doomed.cancelled() and result.ok and _ids(result) == [["b/0"]]
    assert client.stats.coalesced_searches == 1


@pytest.mark.asyncio
async def test_a_caller_cancelled_before_the_flush_is_not_sent(fake, make_client):
    client = make_client(fake.url, coalesce_window_ms=50)
    doomed = asyncio.create_task(client.search(["a"], 1))
    survivor = asyncio.create_task(client.search(["b"], 1))
    await asyncio.sleep(0.01)
    doomed.cancel()
    assert (await survivor).ok and fake.queries_sent == [["b"]]


@pytest.mark.asyncio
async def test_close_answers_waiting_searches_and_the_client_reopens(fake, make_client):
    client = make_client(fake.url)
    assert (await client.search(["a"], 1)).ok
    waiting = asyncio.create_task(client.search(["b"], 1))
    await asyncio.sleep(0)
    await client.close()
    assert (await waiting).error == "retrieval client closed" and fake.queries_sent == [["a"]]
    assert (await client.search(["c"], 1)).ok and fake.queries_sent == [["a"], ["c"]]


@pytest.mark.asyncio
@pytest.mark.parametrize("queries, topk, problem", [
    ("one string", 1, "sequence of strings"),
    (["a", 3], 1, "must be a string"),
    (["a"], 0, "positive integer"),
    (["a"], True, "positive integer"),
])
async def test_bad_input_is_an_error_result_and_sends_nothing(fake, make_client, queries, topk, problem):
    result = await make_client(fake.url).search(queries, topk)
    assert not result.ok and problem in result.error and fake.bodies == []


@pytest.mark.asyncio
async def test_no_queries_need_no_request(fake, make_client):
    result = await make_client(fake.url).search([], 3)
    assert result.ok and result.documents == () and fake.bodies == []


def test_settings_are_validated_and_hashable():
    settings = RetrieverSettings(["http://127.0.0.1:1/retrieve"])
    assert settings.urls == ("http://127.0.0.1:1/retrieve",) and hash(settings)
    assert RetrieverSettings("http://h/retrieve").urls == ("http://h/retrieve",)
    for bad in [{"urls": ()}, {"urls": ("127.0.0.1:8000",)}, {"timeout_s": 0}, {"max_retries": -1},
                {"max_queries_per_request": 0}, {"coalesce_window_ms": -1}]:
        with pytest.raises(ValueError):
            RetrieverSettings(**{"urls": ("http://h",), **bad})


@pytest.mark.asyncio
async def test_shared_client_is_one_per_settings_within_a_loop():
    settings = RetrieverSettings(("http://127.0.0.1:1/retrieve",))
    client = shared_client(settings)
    assert shared_client(RetrieverSettings(("http://127.0.0.1:1/retrieve",))) is client
    assert shared_client(RetrieverSettings(("http://127.0.0.1:2/retrieve",))) is not client
    assert shared_client(RetrieverSettings(("http://127.0.0.1:1/retrieve",), timeout_s=5)) is not client


def test_shared_client_is_not_reused_on_another_loop():
    settings = RetrieverSettings(("http://127.0.0.1:1/retrieve",))

    async def get() -> RetrievalClient:
        return shared_client(settings)

    assert asyncio.run(get()) is not asyncio.run(get())


@pytest.fixture(scope="module")
def real_server(tmp_path_factory):
    """The project's retriever (BM25 demo index: no encoder to load) on a loopback port."""
    helpers = pytest.importorskip("tests.retriever_server.helpers")
    demo = pytest.importorskip("retriever_server.demo")
    index = demo.ensure_demo_index("bm25", root=tmp_path_factory.mktemp("ragr1-cache"))
    with helpers.serving(index) as (url, _):
        yield f"{url}/retrieve"


@pytest.mark.asyncio
async def test_against_the_real_retriever_server(real_server, make_client):
    client = make_client(real_server)
    opera, too_long, architect = await asyncio.gather(
        client.search(["Sydney Opera House", "Jørn Utzon"], 2), client.search(["x" * 3000], 2),
        client.search(["Jørn Utzon"], 2))
    assert opera.ok and [len(documents) for documents in opera.documents] == [2, 2]
    assert opera.documents[0][0]["contents"].startswith('"Sydney Opera House"')
    assert architect.documents[0] == opera.documents[1]
    assert too_long.error == "retriever answered 400: queries[0] has 3000 characters; the limit is 2048"
    assert client.stats.http_requests == 4


@pytest.fixture
def blackhole_url():
    """A port that accepts connections (the kernel completes the handshake) and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/retrieve"


_QUICK_PROBE = {"timeout_s": 60.0, "probe_after_s": 0.3, "probe_timeout_s": 0.3}


@pytest.mark.asyncio
async def test_a_blackholed_url_is_left_after_its_health_probe(blackhole_url, fake, make_client):
    client = make_client((blackhole_url, fake.url), breaker_cooldown_s=30.0, **_QUICK_PROBE)
    first = await client.search(["a"], 1)
    # Without the probe, the attempt would have waited for the 60 s timeout.
    assert first.ok and first.attempts == 2 and first.elapsed_ms < 10_000
    health = client.url_health()
    assert health[blackhole_url]["open"] and health[blackhole_url]["failures"] == 1
    assert "not answering" in health[blackhole_url]["last_error"]
    assert health[fake.url] == {"attempts": 1, "failures": 0, "open": False, "last_error": ""}
    for query in ("b", "c"):
        assert (await client.search([query], 1)).attempts == 1
    assert client.url_health()[blackhole_url]["attempts"] == 1


@pytest.mark.asyncio
async def test_a_blackholed_only_url_fails_in_seconds(blackhole_url, make_client):
    client = make_client(blackhole_url, max_retries=1, **_QUICK_PROBE)
    result = await client.search(["a"], 1)
    assert not result.ok and result.attempts == 2 and "not answering" in result.error
    assert result.elapsed_ms < 10_000


@pytest.mark.asyncio
async def test_an_open_breaker_keeps_failover_off_a_url_that_keeps_failing(start_fake, make_client):
    down, flaky = await start_fake(), await start_fake()
    down.statuses, flaky.statuses = [503] * 10, [503]
    client = make_client((down.url, flaky.url), breaker_cooldown_s=30.0)
    # down, flaky, down again (both breakers open: down had failed first), then flaky, which recovered.
    first = await client.search(["a"], 1)
    assert first.ok and first.attempts == 4 and len(down.bodies) == 2
    flaky.statuses = [503]
    # flaky fails once more: failover points at down, whose breaker is open after more failures, so flaky
    # is retried at once.
    second = await client.search(["b"], 1)
    assert second.ok and second.attempts == 2 and len(down.bodies) == 2
    assert flaky.queries_sent == [["a"], ["a"], ["b"], ["b"]]
    assert client.url_health()[down.url]["open"] and not client.url_health()[flaky.url]["open"]
