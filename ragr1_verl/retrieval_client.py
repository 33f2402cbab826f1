"""An asyncio client for the retriever's ``POST /retrieve``, shared by all trajectories of a rollout worker.

verl runs many trajectories as asyncio tasks in one agent-loop worker, and each search turn asks for 1-3
queries. Sending one HTTP request per turn would cost the server an HTTP round trip per turn, so searches
that arrive within ``coalesce_window_ms`` are coalesced:

- callers append ``(queries, topk, future)`` to a pending list; the first one schedules a flush;
- the flush groups the pending searches by ``topk``, sends identical query strings once, and packs whole
  callers into requests of at most ``max_queries_per_request`` queries (only a caller with more distinct
  queries than that is split over several requests);
- each request runs as its own task, under a per-loop semaphore, with retries (connection errors,
  timeouts, 5xx, 429; exponential backoff with full jitter) and failover to the next URL; the answer is
  then cut back into one :class:`SearchResult` per caller, in that caller's query order.

A failed retrieval never raises into the rollout: the caller gets a :class:`SearchResult` with ``error``
set, which the agent loop shows the model as an observation. A request that served several callers and was
refused for its content (400, 413, 414, 422) is re-sent caller by caller, so one over-long query fails only
its own search. A 200 answer that is not the documented JSON shape is not retried: a server that answers
garbage once answers it again, and retrying would multiply the load on a broken server.

The client binds to the event loop that first uses it: its ``aiohttp`` session, semaphore and timers belong
to that loop. :func:`shared_client` hands out one client per (running loop, settings).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import numbers
import random
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from urllib.parse import urljoin

import aiohttp

from ragr1_verl.settings import setting

logger = logging.getLogger(__name__)

# Statuses that depend on what was asked, so a coalesced request refused with one of them is re-sent caller
# by caller. Auth and routing errors (401, 403, 404, ...) would fail every caller again.
_CONTENT_ERRORS = frozenset({400, 413, 414, 422})
_MESSAGE_CHARS = 300
DEFAULT_RETRIEVER_URL = "http://127.0.0.1:8000/retrieve"  # ragr1-retriever serve's default


@dataclass(frozen=True)
class RetrieverSettings:
    """Where and how to reach the retriever (config: ``ragr1.retriever.*``).

    ``urls`` are full endpoint URLs (``http://host:8000/retrieve``); the others are tried in order when
    one fails. A single string or a list is accepted and stored as a tuple, so settings stay hashable.
    """

    urls: tuple[str, ...] = setting(
        key="url", shown_default=DEFAULT_RETRIEVER_URL, paper="same",
        help="one URL, a list, or a comma-separated string; tried in order on failure; a bare `http://host:port` "
             "gets `/retrieve`. Precedence: the command line (`ragr1.retriever.url=...`), then env "
             "`RAGR1_RETRIEVER_URL` (the recipes read it with `${oc.env:...}`), then this default.")
    token: str | None = setting(
        None, help="bearer token (`--auth-token` of `ragr1-retriever serve`). Same precedence, with env "
                   "`RAGR1_RETRIEVER_TOKEN`.")
    timeout_s: float = setting(30.0, help="timeout of one HTTP attempt")
    connect_timeout_s: float = setting(2.0, help="timeout of the TCP connect alone")
    probe_after_s: float = setting(
        2.0, help="an attempt without an answer after this many seconds sends `GET /health` to that server")
    probe_timeout_s: float = setting(
        2.0, help="no answer to that probe within this many seconds means the server is dead or blackholed "
                  "(accepts, never answers): the attempt is abandoned and retried on the next URL")
    breaker_cooldown_s: float = setting(
        1.0, help="a URL that failed (no connection, timeout, 5xx, failed probe) is skipped while another URL "
                  "is healthy, for a cooldown that doubles with each consecutive failure; a success resets it. "
                  "`RetrievalClient.url_health()` reports attempts, failures, breaker state and last error per "
                  "URL")
    breaker_max_cooldown_s: float = setting(30.0, help="the longest that cooldown grows")
    max_retries: int = setting(
        3, help="retries on connection errors, timeouts, 5xx and 429, with exponential backoff and full jitter")
    backoff_base_s: float = setting(0.5, help="backoff: a uniform draw from 0 to min(max, base·2^retry)")
    backoff_max_s: float = setting(8.0, help="the backoff's cap")
    max_concurrent_requests: int = setting(16, help="HTTP requests in flight per rollout worker")
    coalesce_window_ms: float = setting(
        2.0, help="searches of concurrent trajectories arriving within this window share one HTTP request "
                  "(0: only those in the same event-loop step)")
    max_queries_per_request: int = setting(
        512, help="larger coalesced batches are split (the server's `--max-queries-per-request`)")

    def __post_init__(self):
        urls = (self.urls,) if isinstance(self.urls, str) else tuple(self.urls)
        object.__setattr__(self, "urls", urls)
        if not urls or not all(isinstance(url, str) and url.startswith(("http://", "https://"))
                               for url in urls):
            raise ValueError(f"retriever urls must be one or more http(s) URLs, got {self.urls!r}")
        for name in ("timeout_s", "connect_timeout_s", "probe_after_s", "probe_timeout_s", "breaker_cooldown_s",
                     "breaker_max_cooldown_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_retries < 0 or self.backoff_base_s < 0 or self.backoff_max_s < 0:
            raise ValueError("max_retries, backoff_base_s and backoff_max_s must not be negative")
        if self.max_concurrent_requests < 1 or self.max_queries_per_request < 1:
            raise ValueError("max_concurrent_requests and max_queries_per_request must be at least 1")
        if self.coalesce_window_ms < 0:
            raise ValueError(f"coalesce_window_ms must not be negative, got {self.coalesce_window_ms}")


@dataclass(frozen=True)
class SearchResult:
    """The answer to one :meth:`RetrievalClient.search`.

    ``documents`` holds, per input query, its documents (dicts with at least ``"contents"``, normally also
    ``"id"``; Search-R1's ``{"document": ..., "score": ...}`` hits are unwrapped). Documents of a query that
    several callers asked for are the same objects: treat them as read-only. On failure ``documents`` is
    None and ``error`` says why.
    """

    documents: tuple[tuple[dict, ...], ...] | None
    error: str | None = None
    elapsed_ms: float = 0.0
    attempts: int = 0

    @property
    def ok(self) -> bool:
        return self.documents is not None and self.error is None


@dataclass
class ClientStats:
    """Counters since the client was made: HTTP requests sent (every attempt), searches answered, retries,
    failovers to another URL, searches answered with an error, and query strings saved by deduplication."""

    http_requests: int = 0
    coalesced_searches: int = 0
    retries: int = 0
    failovers: int = 0
    failed_searches: int = 0
    deduplicated_queries: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class UrlHealth:
    """What the client knows of one retriever URL: attempts sent, failed ones, and its circuit breaker.

    After a failure (no connection, a timeout, a 5xx, a failed health probe) the breaker opens: the URL is
    skipped while another is closed, for a cooldown that doubles with each consecutive failure. A success
    closes it.
    """

    attempts: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    open_until: float = 0.0  # time.monotonic()
    last_error: str = ""

    def is_open(self, now: float) -> bool:
        return now < self.open_until

    def as_dict(self) -> dict[str, int | str | bool]:
        return {"attempts": self.attempts, "failures": self.failures, "open": self.is_open(time.monotonic()),
                "last_error": self.last_error}


class _BadResponse(ValueError):
    """A 200 answer that does not follow the ``/retrieve`` response shape."""


@dataclass
class _Pending:
    queries: tuple[str, ...]
    topk: int
    future: asyncio.Future

    @property
    def distinct(self) -> list[str]:
        return list(dict.fromkeys(self.queries))


@dataclass
class _Batch:
    """The searches that one request (or, past the query cap, a few requests) answers together."""

    topk: int
    queries: list[str] = field(default_factory=list)
    members: list[_Pending] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)

    def add(self, member: _Pending, new_queries: list[str]) -> None:
        self.members.append(member)
        self.queries.extend(new_queries)
        self.seen.update(new_queries)


@dataclass(frozen=True)
class _Reply:
    """One HTTP attempt: the documents per query sent, or why not and what to do next."""

    documents: list[tuple[dict, ...]] | None = None
    error: str = ""
    retry: bool = False
    failover: bool = False
    content_error: bool = False


@dataclass(frozen=True)
class _Outcome:
    """One request with its retries: documents per distinct query, or the error."""

    documents: dict[str, tuple[dict, ...]] | None
    error: str | None = None
    attempts: int = 0
    content_error: bool = False


class RetrievalClient:
    """Coalescing, retrying ``/retrieve`` client for one event loop; get it through :func:`shared_client`."""

    def __init__(self, settings: RetrieverSettings):
        self.settings = settings
        self.stats = ClientStats()
        self._preferred = 0
        self.health = {url: UrlHealth() for url in settings.urls}
        self._probes: dict[str, asyncio.Task] = {}
        self._request_ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._session: aiohttp.ClientSession | None = None
        self._semaphore: asyncio.Semaphore | None = None
        self._pending: list[_Pending] = []
        self._flush_handle: asyncio.Handle | None = None
        self._tasks: set[asyncio.Task] = set()

    async def search(self, queries: Sequence[str], topk: int) -> SearchResult:
        """The documents of each query, in order. Never raises, except :class:`asyncio.CancelledError`."""
        started = time.perf_counter()
        try:
            result = await self._search(queries, topk)
        except asyncio.CancelledError:
            raise
        except Exception as err:  # a broken client must not kill a rollout
            logger.exception("retrieval client failed unexpectedly")
            result = SearchResult(None, f"retrieval client error: {err!r}")
        return replace(result, elapsed_ms=(time.perf_counter() - started) * 1000)

    async def close(self) -> None:
        """Answer waiting searches with an error, stop requests in flight and close the HTTP session.

        The client stays usable: a later search opens a new session.
        """
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        pending, self._pending = self._pending, []
        self._fail(pending, "retrieval client closed")
        tasks = list(self._tasks) + list(self._probes.values())
        self._probes = {}
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        session_usable = self._session is not None and not self._session.closed
        if session_usable and self._loop is asyncio.get_running_loop():
            await self._session.close()
        self._session = None

    async def _search(self, queries: Sequence[str], topk: int) -> SearchResult:
        problem = _input_problem(queries, topk)
        if problem is not None:
            return SearchResult(None, problem)
        if not queries:
            return SearchResult(())
        loop = asyncio.get_running_loop()
        self._bind(loop)
        future = loop.create_future()
        self._pending.append(_Pending(tuple(queries), int(topk), future))
        if self._flush_handle is None:
            delay = self.settings.coalesce_window_ms / 1000
            self._flush_handle = (loop.call_soon(self._flush) if delay <= 0
                                  else loop.call_later(delay, self._flush))
        # A cancelled caller cancels only its own future; the batch skips it when answering.
        return await future

    def _bind(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop is loop:
            return
        if self._loop is not None and not self._loop.is_closed():
            raise RuntimeError("this RetrievalClient belongs to another running event loop; "
                               "use shared_client()")
        # The old loop is closed, so its session, timers and waiters are dead: start over on this one.
        self._loop, self._session, self._flush_handle = loop, None, None
        self._semaphore = asyncio.Semaphore(self.settings.max_concurrent_requests)
        self._pending, self._tasks, self._probes = [], set(), {}

    def _flush(self) -> None:
        self._flush_handle = None
        pending = [member for member in self._pending if not member.future.done()]
        self._pending = []
        for batch in _plan_batches(pending, self.settings.max_queries_per_request):
            self.stats.deduplicated_queries += sum(len(m.queries) for m in batch.members) - len(batch.queries)
            self._spawn(self._serve(batch))

    def _spawn(self, coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        # The loop keeps only weak references to tasks; this set keeps them alive and lets close() stop them.
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, batch: _Batch) -> None:
        try:
            outcome = await self._fetch(batch.queries, batch.topk)
            live = [member for member in batch.members if not member.future.done()]
            if outcome.content_error and len(live) > 1:
                logger.info("a request for %d searches was refused (%s); re-sending them one by one",
                            len(live), outcome.error)
                await asyncio.gather(*(self._serve(_single(member)) for member in live))
                return
            self._deliver(live, outcome)
        except asyncio.CancelledError:
            self._fail(batch.members, "retrieval client closed while the request was in flight")
            raise
        except Exception as err:  # every waiting caller must get an answer
            logger.exception("retrieval batch failed unexpectedly")
            self._fail(batch.members, f"retrieval client error: {err!r}")

    async def _fetch(self, queries: list[str], topk: int) -> _Outcome:
        cap = self.settings.max_queries_per_request
        slices = [queries[start:start + cap] for start in range(0, len(queries), cap)]
        outcomes = await asyncio.gather(*(self._request(piece, topk) for piece in slices))
        failed = [outcome for outcome in outcomes if outcome.documents is None]
        if failed:
            return failed[0]
        documents = {query: docs for outcome in outcomes for query, docs in outcome.documents.items()}
        return _Outcome(documents, attempts=max(outcome.attempts for outcome in outcomes))

    async def _request(self, queries: list[str], topk: int) -> _Outcome:
        request_id = next(self._request_ids)
        attempts, reply = 0, _Reply()
        for attempt in range(self.settings.max_retries + 1):
            if attempt:
                self.stats.retries += 1
                await asyncio.sleep(self._backoff(attempt - 1))
            url_index = self._choose_url()
            attempts += 1
            reply = await self._attempt(url_index, queries, topk)
            self._record(url_index, reply)
            if reply.documents is not None:
                return _Outcome(dict(zip(queries, reply.documents, strict=True)), attempts=attempts)
            if reply.failover:
                self._fail_over(url_index, reply.error)
            if not reply.retry:
                logger.warning("retrieval request %d failed: %s", request_id, reply.error)
                return _Outcome(None, reply.error, attempts, reply.content_error)
            logger.info("retrieval request %d, attempt %d failed: %s", request_id, attempts, reply.error)
        error = f"retriever unreachable after {attempts} attempts: {reply.error}"
        logger.warning("retrieval request %d failed: %s", request_id, error)
        return _Outcome(None, error, attempts)

    def _backoff(self, retry: int) -> float:
        ceiling = min(self.settings.backoff_max_s, self.settings.backoff_base_s * 2 ** retry)
        # Full jitter: retries of many trajectories that failed together spread out instead of colliding.
        return random.uniform(0, ceiling)

    def _choose_url(self) -> int:
        """The preferred URL, unless its breaker is open and another URL's is closed.

        With every breaker open, the URL with the fewest consecutive failures, and among those the one whose
        cooldown ends first, is tried.
        """
        now, urls = time.monotonic(), self.settings.urls
        order = [(self._preferred + offset) % len(urls) for offset in range(len(urls))]
        for index in order:
            if not self.health[urls[index]].is_open(now):
                return index
        return min(order, key=lambda index: (self.health[urls[index]].consecutive_failures,
                                             self.health[urls[index]].open_until))

    def _record(self, url_index: int, reply: _Reply) -> None:
        health = self.health[self.settings.urls[url_index]]
        health.attempts += 1
        if not reply.failover:  # answered (even with a client error): the URL is alive
            health.consecutive_failures, health.open_until = 0, 0.0
            return
        health.failures += 1
        health.consecutive_failures += 1
        health.last_error = reply.error
        cooldown = min(self.settings.breaker_max_cooldown_s,
                       self.settings.breaker_cooldown_s * 2 ** (health.consecutive_failures - 1))
        health.open_until = time.monotonic() + cooldown

    def url_health(self) -> dict[str, dict[str, int | str | bool]]:
        """Per retriever URL: attempts, failures, whether its breaker is open, and the last error."""
        return {url: health.as_dict() for url, health in self.health.items()}

    def _fail_over(self, url_index: int, reason: str) -> None:
        urls = self.settings.urls
        # Concurrent requests that failed on the same URL must move the preference once, not once each.
        if len(urls) == 1 or self._preferred != url_index:
            return
        self._preferred = (url_index + 1) % len(urls)
        self.stats.failovers += 1
        logger.warning("retriever %s failed (%s); switching to %s", urls[url_index], reason,
                       urls[self._preferred])

    async def _attempt(self, url_index: int, queries: list[str], topk: int) -> _Reply:
        url = self.settings.urls[url_index]
        async with self._semaphore:
            self.stats.http_requests += 1
            post = asyncio.ensure_future(self._post(url, {"queries": queries, "topk": topk, "return_scores": False}))
            try:
                done, _ = await asyncio.wait({post}, timeout=self.settings.probe_after_s)
                # A slow answer is normal under load, but a URL that accepts connections and never answers
                # would hold every search for the whole timeout: its /health, which a live server answers
                # at once, tells the two apart.
                if not done and not await self._alive(url):
                    post.cancel()
                    return _Reply(error=f"{url} is not answering: its health check got no answer within "
                                        f"{self.settings.probe_timeout_s:g}s", retry=True, failover=True)
                return await post
            finally:
                if not post.done():
                    post.cancel()

    async def _post(self, url: str, payload: dict) -> _Reply:
        try:
            async with self._http().post(url, json=payload) as response:
                status, body = response.status, await response.read()
        except asyncio.TimeoutError:
            return _Reply(error=f"timed out after {self.settings.timeout_s:g}s", retry=True, failover=True)
        except aiohttp.ClientError as err:
            return _Reply(error=f"{type(err).__name__}: {err}", retry=True, failover=True)
        return _interpret(status, body, len(payload["queries"]))

    async def _alive(self, url: str) -> bool:
        """Whether the server behind ``url`` answers ``GET /health`` (any status) quickly; one probe at a time."""
        probe = self._probes.get(url)
        if probe is None or probe.done():
            probe = self._probes[url] = asyncio.ensure_future(self._probe(url))
        return await asyncio.shield(probe)

    async def _probe(self, url: str) -> bool:
        timeout = aiohttp.ClientTimeout(total=self.settings.probe_timeout_s)
        try:
            async with self._http().get(urljoin(url, "health"), timeout=timeout) as response:
                await response.read()
            return True
        except (asyncio.TimeoutError, aiohttp.ClientError):
            return False

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            headers = {"Authorization": f"Bearer {self.settings.token}"} if self.settings.token else None
            connector = aiohttp.TCPConnector(limit=self.settings.max_concurrent_requests, ttl_dns_cache=300)
            timeout = aiohttp.ClientTimeout(total=self.settings.timeout_s, sock_connect=self.settings.connect_timeout_s)
            self._session = aiohttp.ClientSession(connector=connector, headers=headers, timeout=timeout)
        return self._session

    def _deliver(self, members: list[_Pending], outcome: _Outcome) -> None:
        for member in members:
            if outcome.documents is None:
                result = SearchResult(None, outcome.error, attempts=outcome.attempts)
                self.stats.failed_searches += 1
            else:
                documents = tuple(outcome.documents[query] for query in member.queries)
                result = SearchResult(documents, attempts=outcome.attempts)
            self.stats.coalesced_searches += 1
            member.future.set_result(result)

    def _fail(self, members: list[_Pending], error: str) -> None:
        for member in members:
            if not member.future.done():
                self.stats.failed_searches += 1
                member.future.set_result(SearchResult(None, error))


def _input_problem(queries: Sequence[str], topk: int) -> str | None:
    # A lone string would otherwise be searched character by character.
    if isinstance(queries, (str, bytes)) or not isinstance(queries, Sequence):
        return f"queries must be a sequence of strings, got {type(queries).__name__}"
    if not all(isinstance(query, str) for query in queries):
        return "every query must be a string"
    if isinstance(topk, bool) or not isinstance(topk, numbers.Integral) or topk < 1:
        return f"topk must be a positive integer, got {topk!r}"
    return None


def _plan_batches(pending: list[_Pending], max_queries: int) -> list[_Batch]:
    """Group by topk, send each distinct query once, and keep every caller whole within one batch."""
    by_topk: dict[int, list[_Pending]] = {}
    for member in pending:
        by_topk.setdefault(member.topk, []).append(member)
    batches = []
    for topk, members in by_topk.items():
        batch = _Batch(topk)
        for member in members:
            new_queries = [query for query in member.distinct if query not in batch.seen]
            if batch.members and len(batch.queries) + len(new_queries) > max_queries:
                batches.append(batch)
                batch, new_queries = _Batch(topk), member.distinct
            batch.add(member, new_queries)
        batches.append(batch)
    return batches


def _single(member: _Pending) -> _Batch:
    batch = _Batch(member.topk)
    batch.add(member, member.distinct)
    return batch


def _interpret(status: int, body: bytes, expected: int) -> _Reply:
    if 200 <= status < 300:
        try:
            return _Reply(documents=_parse_result(body, expected))
        except _BadResponse as err:
            return _Reply(error=f"retriever sent a bad answer: {err}")
    message = f"retriever answered {status}: {_server_message(body)}"
    if status == 429:
        return _Reply(error=message, retry=True)
    if status >= 500:
        return _Reply(error=message, retry=True, failover=True)
    return _Reply(error=message, content_error=status in _CONTENT_ERRORS)


def _server_message(body: bytes) -> str:
    text = body.decode("utf-8", errors="replace")
    try:
        payload = json.loads(text)
    except ValueError:
        payload = None
    if isinstance(payload, dict) and isinstance(payload.get("error"), str):
        text = payload["error"]
    text = " ".join(text.split())
    return text[:_MESSAGE_CHARS] if text else "(empty body)"


def _parse_result(body: bytes, expected: int) -> list[tuple[dict, ...]]:
    try:
        payload = json.loads(body)
    except ValueError:
        raise _BadResponse("the body is not JSON") from None
    result = payload.get("result") if isinstance(payload, dict) else None
    if not isinstance(result, list):
        raise _BadResponse("the body has no 'result' list")
    if len(result) != expected:
        raise _BadResponse(f"{len(result)} result lists for {expected} queries")
    return [_documents(hits, number) for number, hits in enumerate(result)]


def _documents(hits, number: int) -> tuple[dict, ...]:
    if not isinstance(hits, list):
        raise _BadResponse(f"result[{number}] is not a list")
    documents = []
    for hit in hits:
        # Search-R1 servers wrap each document with its score when asked for scores; some always do.
        wrapped = isinstance(hit, dict) and isinstance(hit.get("document"), dict)
        document = hit["document"] if wrapped else hit
        if not isinstance(document, dict) or "contents" not in document:
            raise _BadResponse(f"result[{number}] holds a hit that is not a document with 'contents'")
        documents.append(document)
    return tuple(documents)


_SHARED: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[RetrieverSettings, RetrievalClient]] = (
    weakref.WeakKeyDictionary())
_SHARED_LOCK = threading.Lock()


def shared_client(settings: RetrieverSettings) -> RetrievalClient:
    """One client per (running event loop, settings): the agent loop creates one instance per trajectory, and
    verl's tool instances are per worker, so both get the shared client through this.

    Call it from a coroutine: it raises :class:`RuntimeError` when no event loop is running.
    """
    loop = asyncio.get_running_loop()
    with _SHARED_LOCK:
        # A client holds its loop, so weak keys alone would never let a finished loop go.
        for finished in [old for old in _SHARED if old.is_closed()]:
            del _SHARED[finished]
        clients = _SHARED.setdefault(loop, {})
        client = clients.get(settings)
        if client is None:
            client = clients[settings] = RetrievalClient(settings)
        return client


async def close_shared_clients() -> None:
    """Close and forget every shared client of the running loop (the end of an evaluation run, a test)."""
    loop = asyncio.get_running_loop()
    with _SHARED_LOCK:
        clients = list(_SHARED.pop(loop, {}).values())
    await asyncio.gather(*(client.close() for client in clients))
