"""The dynamic batcher around the real dense retriever of the demo index."""

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from retriever_server.backends import EmbeddingCache
from retriever_server.batcher import BatcherStopped, BatchingConfig, DynamicBatcher
from retriever_server.corpus import CORPUS_NAME, Corpus
from retriever_server.responses import DocumentJson
from retriever_server.service import LoadOptions, RetrievalService


class RecordingRetriever:
    """Wraps the real retriever and records every batch it is asked to search."""

    def __init__(self, inner, fail: bool = False):
        self.inner, self.fail = inner, fail
        self.calls: list[tuple[list[str], int]] = []
        self.ntotal, self.description = inner.ntotal, inner.description

    def search(self, queries, k):
        self.calls.append((list(queries), k))
        if self.fail:
            raise RuntimeError("index unavailable")
        return self.inner.search(queries, k)


@pytest.fixture(scope="module")
def dense_retriever(demo_index):
    service = RetrievalService(demo_index, LoadOptions(), BatchingConfig())
    service.load()
    yield service.batcher.retriever
    service.close()


def _batcher(retriever, **config):
    batcher = DynamicBatcher(retriever, BatchingConfig(**config), retriever.inner.metrics)
    batcher.start()
    return batcher


def _concurrently(batcher, requests):
    barrier = threading.Barrier(len(requests))

    def run(request):
        barrier.wait()
        return batcher.search(*request)

    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        return list(pool.map(run, requests))


def test_requests_queued_together_share_one_batch_and_identical_queries_are_searched_once(dense_retriever):
    # The batcher starts once all 16 wait in its queue: with threads released by a barrier instead, the first
    # could arrive alone and go without waiting (the lone-client rule), which made the batch count vary.
    recorder = RecordingRetriever(dense_retriever)
    batcher = DynamicBatcher(recorder, BatchingConfig(max_wait_ms=50), dense_retriever.metrics)
    requests = [(["Who designed the Eiffel Tower?", f"river number {i}"], 3) for i in range(16)]
    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        answers = [pool.submit(batcher.search, *request) for request in requests]
        deadline = time.monotonic() + 30
        while batcher._queue.qsize() < len(requests) and time.monotonic() < deadline:
            time.sleep(0.01)
        batcher.start()
        results = [answer.result(timeout=60) for answer in answers]
    batcher.stop()
    assert len(recorder.calls) == 1
    searched = recorder.calls[0][0]
    assert sorted(searched) == sorted({query for queries, _ in requests for query in queries})
    alone = dense_retriever.search(["Who designed the Eiffel Tower?"], 3)
    for answer in results:
        assert answer.scores.shape == answer.positions.shape == (2, 3)
        np.testing.assert_array_equal(answer.positions[0], alone[1][0])


def test_a_lone_client_is_not_made_to_wait_for_a_batch_to_fill(dense_retriever):
    """With nobody else in flight, the wait window is skipped; once several clients are active it is used."""
    recorder = RecordingRetriever(dense_retriever)
    batcher = _batcher(recorder, max_wait_ms=400)
    batcher.search(["warm-up"], 3)
    started = time.perf_counter()
    for number in range(5):
        batcher.search([f"lone query {number}"], 3)
    assert (time.perf_counter() - started) / 5 < 0.2  # each well under the 400 ms window
    results = _concurrently(batcher, [([f"busy query {number}"], 3) for number in range(8)])
    batcher.stop()
    assert len(results) == 8 and len(recorder.calls) < 6 + 8  # the concurrent ones still shared batches


class SlowRetriever(RecordingRetriever):
    """Searches take ``delay_s`` at least, like a big index on a busy core; records when each began."""

    def __init__(self, inner, delay_s: float):
        super().__init__(inner)
        self.delay_s = delay_s
        self.began: list[float] = []

    def search(self, queries, k):
        self.began.append(time.perf_counter())
        time.sleep(self.delay_s)
        return super().search(queries, k)


def _closed_loop_clients(batcher, clients: int, rounds: int, think_s: tuple[float, float]) -> None:
    """Each client keeps one request outstanding and sends the next after ``think_s`` (its HTTP round trip)."""
    def client(number: int) -> None:
        pause = think_s[0] + (think_s[1] - think_s[0]) * number / clients
        for round_ in range(rounds):
            batcher.search([f"client {number} round {round_}"], 3)
            time.sleep(pause)

    with ThreadPoolExecutor(max_workers=clients) as pool:
        list(pool.map(client, range(clients)))


@pytest.mark.parametrize("return_wait_ms", [30.0, 0.0])
def test_clients_that_each_keep_one_request_share_one_batch(dense_retriever, return_wait_ms):
    """Answered clients come back 4-12 ms later, well after the 1 ms window: the batch waits for them (here up
    to 20 ms, a tenth of the last search) instead of splitting them into two alternating groups."""
    recorder = SlowRetriever(dense_retriever, delay_s=0.2)
    batcher = _batcher(recorder, max_wait_ms=1, max_return_wait_ms=return_wait_ms)
    _closed_loop_clients(batcher, clients=8, rounds=6, think_s=(0.004, 0.012))
    batcher.stop()
    sizes = [len(queries) for queries, _ in recorder.calls]
    assert sum(sizes) == 48
    later = sizes[1:]  # the first batch forms before any return
    if return_wait_ms:
        assert sum(later) / len(later) >= 6, sizes
    else:
        assert sum(later) / len(later) < 6, sizes  # the behaviour the wait exists to fix


def test_a_lone_request_after_a_burst_is_not_held_for_clients_that_left(dense_retriever):
    """The burst's clients had their time to return; the lone request that comes later is searched at once,
    not held for the 50 ms return wait the burst's size would allow."""
    recorder = SlowRetriever(dense_retriever, delay_s=0.5)
    batcher = _batcher(recorder, max_wait_ms=1, max_return_wait_ms=100)
    _concurrently(batcher, [([f"burst query {number}"], 3) for number in range(8)])
    time.sleep(0.2)
    sent = time.perf_counter()
    batcher.search(["a lone query"], 3)
    batcher.stop()
    assert recorder.began[-1] - sent < 0.025


def test_each_request_gets_its_own_topk_from_a_shared_search(dense_retriever):
    recorder = RecordingRetriever(dense_retriever)
    batcher = _batcher(recorder, max_wait_ms=50)
    small, large = _concurrently(batcher, [(["the Nile"], 1), (["the Nile"], 5)])
    batcher.stop()
    assert small.positions.shape == (1, 1) and large.positions.shape == (1, 5)
    assert small.positions[0, 0] == large.positions[0, 0]
    assert max(k for _, k in recorder.calls) == 5


def test_a_failing_search_fails_every_waiting_request_and_the_batcher_goes_on(dense_retriever):
    recorder = RecordingRetriever(dense_retriever, fail=True)
    batcher = _batcher(recorder, max_wait_ms=20)
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = [pool.submit(batcher.search, [f"q{i}"], 3) for i in range(4)]
        errors = [f.exception(timeout=30) for f in futures]
    assert all(isinstance(e, RuntimeError) and "index unavailable" in str(e) for e in errors)
    recorder.fail = False
    assert batcher.search(["the Nile"], 2).positions.shape == (1, 2)
    batcher.stop()
    with pytest.raises(BatcherStopped):
        batcher.search(["late"], 3)


def test_large_batches_are_capped(dense_retriever):
    recorder = RecordingRetriever(dense_retriever)
    batcher = _batcher(recorder, max_wait_ms=100, max_batch_queries=8)
    _concurrently(batcher, [([f"topic {i}-{j}" for j in range(4)], 3) for i in range(6)])
    batcher.stop()
    assert all(len(queries) <= 8 for queries, _ in recorder.calls)
    assert sum(len(queries) for queries, _ in recorder.calls) == 24


def test_embedding_cache_is_least_recently_used():
    cache = EmbeddingCache(capacity=2)
    cache.put("a", np.ones(2))
    cache.put("b", np.zeros(2))
    assert cache.get("a") is not None
    cache.put("c", np.ones(2))
    assert cache.get("b") is None and cache.get("a") is not None and len(cache) == 2
    disabled = EmbeddingCache(capacity=0)
    disabled.put("a", np.ones(2))
    assert disabled.get("a") is None


class CountingCorpus:
    """The demo corpus, counting the lookups made of it and the positions asked for."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def documents(self, positions):
        self.calls.append(list(positions))
        return self.inner.documents(positions)


def test_a_batch_makes_one_document_lookup_for_all_its_requests(demo_index, dense_retriever):
    corpus = CountingCorpus(Corpus(demo_index / CORPUS_NAME))
    documents = DocumentJson(corpus)
    recorder = RecordingRetriever(dense_retriever)
    batcher = DynamicBatcher(recorder, BatchingConfig(max_wait_ms=200), recorder.inner.metrics, documents.fragments)
    batcher.start()
    requests = [([f"river number {i}", "the Eiffel Tower", f"a painter {i}"], 3) for i in range(12)]
    answers = _concurrently(batcher, requests)
    batcher.stop()
    assert len(corpus.calls) == len(recorder.calls) < len(requests)  # one lookup per batch, not per request
    assert all(len(call) == len(set(call)) for call in corpus.calls)  # each document fetched once a batch
    for answer in answers:
        for position in answer.positions.ravel().tolist():
            assert json.loads(answer.fragments[position]) == corpus.inner.documents([position])[0]


def test_a_failing_document_lookup_fails_its_batch_only(demo_index, dense_retriever):
    class Flaky(CountingCorpus):
        fail = True

        def documents(self, positions):
            if self.fail:
                raise IndexError("documents unavailable")
            return super().documents(positions)

    corpus = Flaky(Corpus(demo_index / CORPUS_NAME))
    batcher = DynamicBatcher(dense_retriever, BatchingConfig(), dense_retriever.metrics, DocumentJson(corpus).fragments)
    batcher.start()
    with pytest.raises(IndexError, match="documents unavailable"):
        batcher.search(["the Nile"], 2)
    corpus.fail = False
    assert len(batcher.search(["the Nile"], 2).fragments) == 2
    batcher.stop()
