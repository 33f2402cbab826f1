"""Dynamic batching: concurrent requests become one encoder batch and one index search.

HTTP threads hand their queries to a single search thread. It takes whatever is queued (waiting
``max_wait_ms`` for more once the first request arrives, when other clients are active, and for the
clients just answered, see below; a lone client's request is searched at once), deduplicates identical query strings across the
batch and searches once with the largest ``topk`` asked for. One thread owns the encoder and the index, so
torch and faiss never contend with each other for the cores.

Clients that each keep one request outstanding (rollout workers, an evaluation at concurrency N) would
otherwise split into two groups that alternate: while one group's batch is searched, the other's requests
queue up and become the next batch, so batches hold half the clients. So a batch that starts to collect
right after a search expects as many requests as were in flight at once during the previous batch (the
clients just answered are about to send again), and waits for them at most ``max_return_wait_ms`` and
``RETURN_WAIT_FRACTION`` of the previous search. Answering and reading those requests is work the cores
must do anyway; the batch that follows holds every client, and a bigger batch costs less per query. A wait
that comes up short is not repeated on the next batch, so clients that think between requests lose little.

A second thread finishes each batch while the next one is searched: one document lookup for all of the
batch's hits (the JSON of each document encoded once, see ``responses.py``), then each request gets its own
rows. The HTTP threads are left with parsing a request and joining its body.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from retriever_server.backends import Retriever
from retriever_server.heap import HeapTrimmer
from retriever_server.metrics import ServerMetrics

logger = logging.getLogger(__name__)

BATCH_SIZE_SMOOTHING = 0.2  # weight of the newest batch in the moving average of requests per batch
MIN_REQUESTS_PER_BATCH_TO_WAIT = 1.2  # below: the recent batches were single requests (a lone client)
RETURN_WAIT_FRACTION = 0.1  # of the previous search's time: the longest wait for answered clients to return


@dataclass(frozen=True)
class BatchingConfig:
    """Batching knobs (CLI: ``--max-batch-queries``, ``--max-wait-ms``, ``--max-return-wait-ms``,
    ``--request-timeout``)."""

    max_batch_queries: int = 512
    max_wait_ms: float = 1.0
    max_return_wait_ms: float = 20.0  # 0: never wait for answered clients to send again
    request_timeout_s: float = 120.0
    trim_heap: bool = True  # malloc_trim when idle, so varied batch sizes do not grow RSS (heap.py)


@dataclass
class _Request:
    queries: list[str]
    k: int
    future: Future
    enqueued: float


@dataclass(frozen=True)
class BatchAnswer:
    """One request's rows of a batch: ``positions < 0`` mark missing hits; ``fragments`` maps each hit's
    position to its document's JSON text (``None`` when the batcher was built without documents)."""

    scores: np.ndarray
    positions: np.ndarray
    fragments: dict[int, str] | None


@dataclass
class _Searched:
    requests: list[_Request]
    row_of: dict[str, int]
    scores: np.ndarray
    positions: np.ndarray


class BatcherStopped(RuntimeError):
    """The batcher was stopped before it could answer."""


class DynamicBatcher:
    """Coalesces :meth:`search` calls from many threads into batched calls of one :class:`Retriever`."""

    def __init__(self, retriever: Retriever, config: BatchingConfig, metrics: ServerMetrics,
                 fragments: Callable[[list[int]], dict[int, str]] | None = None):
        self.retriever = retriever
        self.config = config
        self.metrics = metrics
        self.fragments = fragments
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        # Two batches at most wait to be finished: the search thread never runs far ahead of the lookups.
        self._searched: queue.Queue[_Searched | None] = queue.Queue(maxsize=2)
        self._threads = [threading.Thread(target=self._run, name="ragr1-batcher", daemon=True),
                         threading.Thread(target=self._finish_batches, name="ragr1-finisher", daemon=True)]
        self._stopped = threading.Event()
        self._warned: dict[str, float] = {}  # expected failures logged recently, and when
        self._in_flight = 0  # requests between search() and their answer
        self._in_flight_lock = threading.Lock()
        self._peak_in_flight = 0  # since the current batch began to collect
        self._requests_per_batch = 1.0  # moving average: are several clients active?
        self._last_search_s = 0.0  # the previous batch's encode + search: the return wait is a fraction of it
        self._searched_at = float("-inf")  # when it ended
        self._return_wait_missed = False  # the previous batch's return wait timed out short of its count
        self.heap = HeapTrimmer(enabled=config.trim_heap)

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._queue.put(None)
        for thread in self._threads:
            thread.join(timeout=10)

    def search(self, queries: list[str], k: int) -> BatchAnswer:
        """Blocking: this request's rows, searched with whatever else is queued."""
        if self._stopped.is_set():
            raise BatcherStopped("the retriever is shutting down")
        request = _Request(queries, k, Future(), time.perf_counter())
        with self._in_flight_lock:
            self._in_flight += 1
            self._peak_in_flight = max(self._peak_in_flight, self._in_flight)
        try:
            self._queue.put(request)
            return request.future.result(timeout=self.config.request_timeout_s)
        finally:
            with self._in_flight_lock:
                self._in_flight -= 1

    def _run(self) -> None:
        try:
            while not self._stopped.is_set():
                batch = self._collect()
                if batch:
                    self._process(batch)
                    self.heap.after_batch()
        finally:
            self._searched.put(None)
            self._fail_pending()

    def _collect(self) -> list[_Request]:
        first = self._next_request()
        if first is None:
            return []
        started, return_wait = time.perf_counter(), self._return_wait_s()
        expected = self._take_expected_requests(started, return_wait)
        deadline = started + self._wait_s()
        return_deadline = max(deadline, started + return_wait) if expected > 1 else deadline
        batch, size = [first], len(first.queries)
        while size < self.config.max_batch_queries:
            remaining = (return_deadline if len(batch) < expected else deadline) - time.perf_counter()
            try:
                item = self._queue.get_nowait() if remaining <= 0 else self._queue.get(timeout=remaining)
            except queue.Empty:
                break
            if item is None:
                self._stopped.set()
                break
            batch.append(item)
            size += len(item.queries)
        self._return_wait_missed = len(batch) < expected and size < self.config.max_batch_queries
        self._requests_per_batch += BATCH_SIZE_SMOOTHING * (len(batch) - self._requests_per_batch)
        return batch

    def _take_expected_requests(self, now: float, return_wait: float) -> int:
        """How many requests this batch waits for (0: no return wait), restarting the in-flight peak for the
        next batch. As many as were in flight at once during the previous batch, since the clients just
        answered are about to send again; none when those clients already had their time to return (a lone
        client after a burst) or when the previous batch waited for them in vain (clients that think between
        requests: they pay the wait on every other batch at most)."""
        with self._in_flight_lock:
            peak, in_flight = self._peak_in_flight, self._in_flight
            self._peak_in_flight = in_flight
        returning = now - self._searched_at <= return_wait and not self._return_wait_missed
        return max(peak, in_flight) if returning else 0

    def _next_request(self) -> _Request | None:
        """The next request, waiting as long as it takes; while waiting, the heap is trimmed once idle."""
        try:
            return self._queue.get(timeout=self.heap.idle_s)
        except queue.Empty:
            self.heap.idle()
            return self._queue.get()

    def _wait_s(self) -> float:
        """How long a batch waits to fill beyond the return wait: ``max_wait_ms`` while other clients are active
        (another request in flight, or recent batches held several); none for a lone client."""
        others = self._in_flight > 1 or self._requests_per_batch > MIN_REQUESTS_PER_BATCH_TO_WAIT
        return self.config.max_wait_ms / 1000 if others else 0.0

    def _return_wait_s(self) -> float:
        """How long a batch may wait for answered clients to send again: short next to the search it saves."""
        return min(self.config.max_return_wait_ms / 1000, RETURN_WAIT_FRACTION * self._last_search_s)

    def _process(self, batch: list[_Request]) -> None:
        started = time.perf_counter()
        for request in batch:
            self.metrics.queue_seconds.observe(started - request.enqueued)
        row_of: dict[str, int] = {}
        for request in batch:
            for query in request.queries:
                row_of.setdefault(query, len(row_of))
        total = sum(len(r.queries) for r in batch)
        self.metrics.batches.inc()
        self.metrics.batch_requests.observe(len(batch))
        self.metrics.batch_queries.observe(len(row_of))
        self.metrics.deduplicated.inc(total - len(row_of))
        try:
            scores, positions = self.retriever.search(list(row_of), max(r.k for r in batch))
            self._searched_at = time.perf_counter()
            self._last_search_s = self._searched_at - started
        except Exception as err:  # noqa: BLE001 - any backend failure must reach every waiting request
            if getattr(err, "expected", False):  # e.g. a shard down: one line, not a traceback per batch
                self._warn_once(f"search failed: {err}")
            else:
                logger.exception("search failed for a batch of %d queries", len(row_of))
            _fail(batch, err)
            return
        self._searched.put(_Searched(batch, row_of, scores, positions))

    def _warn_once(self, message: str, every_s: float = 10.0) -> None:
        """Log ``message`` unless it was logged in the last ``every_s`` seconds."""
        now = time.monotonic()
        if now - self._warned.get(message, -every_s) >= every_s:
            self._warned = {m: t for m, t in self._warned.items() if now - t < every_s}
            self._warned[message] = now
            logger.warning("%s", message)

    def _finish_batches(self) -> None:
        while (searched := self._searched.get()) is not None:
            try:
                answers = _answers(searched, self.fragments)
            except Exception as err:  # noqa: BLE001 - e.g. a shard's documents evicted: each request hears
                logger.exception("document lookup failed for a batch of %d requests", len(searched.requests))
                _fail(searched.requests, err)
                continue
            for request, answer in zip(searched.requests, answers):
                request.future.set_result(answer)

    def _fail_pending(self) -> None:
        """Called once the search thread has stopped: nothing else takes from the request queue."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                item.future.set_exception(BatcherStopped("the retriever is shutting down"))


def _answers(searched: _Searched, fragments) -> list[BatchAnswer]:
    """Each request's rows of the batch, with the JSON of every hit's document from one lookup."""
    rows = [[searched.row_of[q] for q in request.queries] for request in searched.requests]
    positions = [searched.positions[row, :request.k] for row, request in zip(rows, searched.requests)]
    found = None
    if fragments is not None:
        hits = np.concatenate([p.ravel() for p in positions])
        found = fragments(np.unique(hits[hits >= 0]).tolist())
    return [BatchAnswer(searched.scores[row, :request.k], position, found)
            for row, request, position in zip(rows, searched.requests, positions)]


def _fail(requests: list[_Request], err: Exception) -> None:
    for request in requests:
        request.future.set_exception(err)
