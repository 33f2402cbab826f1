"""Serving the Flask app with waitress (a production WSGI server; never Flask's development server).

waitress is hardened here against hostile clients of a shared retriever:

- it polls its sockets (``poll``, not ``select``, which crashes the server on any descriptor past 1023);
- the process's soft descriptor limit is raised to its hard limit, and the connection limit is kept below
  what that allows (a connection can hold two descriptors: its socket and a spilled request body);
- a request must arrive whole within ``request_read_timeout_s`` of its first byte, and an idle keep-alive
  connection is closed after ``idle_timeout_s``, so slow or silent clients cannot hold connections;
- at the connection limit, the connections that wait on their client (idle, or half-sent) longest are
  closed to make room, so a flood of them never locks out a well-behaved client;
- waitress's own rejections (malformed requests, oversized headers or bodies) are JSON like the app's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import resource
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.server import TcpWSGIServer
from waitress.task import ErrorTask, ThreadedTaskDispatcher

logger = logging.getLogger(__name__)
# waitress warns "Task queue depth is N" whenever requests wait for a thread, which is normal under load:
# overload is answered by the concurrency cap (503 + Retry-After), so the warning is only noise.
logging.getLogger("waitress.queue").setLevel(logging.ERROR)

DESCRIPTORS_RESERVED = 64  # index files, logs, the encoder's files, waitress's trigger pipe
EVICT_FRACTION = 0.1  # of the connection limit, closed at once when it is reached


@dataclass(frozen=True)
class ServingLimits:
    """The HTTP layer's knobs (CLI: ``--threads``, ``--connection-limit``, ``--request-read-timeout``,
    ``--idle-timeout``, ``--shutdown-timeout``)."""

    threads: int = 128  # above RequestLimits.max_concurrent_requests (120): some stay free for 503s
    connection_limit: int = 0  # 0: as many as the descriptor limit allows, at most 10,000
    request_read_timeout_s: float = 15.0
    idle_timeout_s: float = 30.0
    shutdown_timeout_s: float = 10.0  # on SIGTERM: how long requests already received may take to be answered


def descriptor_budget() -> int:
    """The soft ``RLIMIT_NOFILE``, first raised to the hard limit where the process may."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return soft if soft != resource.RLIM_INFINITY else 65536


def connection_limit(requested: int, descriptors: int) -> int:
    """The connection limit for a descriptor budget: two descriptors a connection, a reserve kept free."""
    allowed = max(8, (descriptors - DESCRIPTORS_RESERVED) // 2)
    if requested > allowed:
        logger.warning("--connection-limit %d lowered to %d: the process may open %d descriptors", requested,
                       allowed, descriptors)
    return min(requested, allowed) if requested > 0 else min(allowed, 10_000)


class _JsonErrorTask(ErrorTask):
    """waitress's error responses, with a JSON body like every other error of the retriever."""

    def execute(self) -> None:
        error = self.request.error
        body = json.dumps({"error": f"{error.reason}: {error.body}"}).encode()
        self.status = f"{error.code} {error.reason}"
        self.response_headers.append(("Content-Type", "application/json"))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class _GuardedChannel(HTTPChannel):
    """A connection that records when its current, incomplete request began to arrive."""

    error_task_class = _JsonErrorTask
    reading_since: float | None = None

    def received(self, data: bytes) -> bool:
        if self.reading_since is None and data:
            self.reading_since = time.monotonic()
        try:
            return super().received(data)
        finally:
            if self.request is None:  # nothing half-received is left
                self.reading_since = None

    def waits_on_client(self) -> bool:
        """Idle or half-sent: no request of this connection is being served or answered."""
        return not self.requests and not self.total_outbufs_len


class _GuardedServer(TcpWSGIServer):
    channel_class = _GuardedChannel

    def __init__(self, *args: Any, limits: ServingLimits, **kwargs: Any):
        self.limits = limits
        self.stop_requested = False
        super().__init__(*args, **kwargs)

    def readable(self) -> bool:
        if self.accepting and len(self._map) >= self.adj.connection_limit:
            self._evict_waiting(max(1, int(self.adj.connection_limit * EVICT_FRACTION)))
        return super().readable()

    def run(self) -> None:
        """Serve until :meth:`request_stop` (or a KeyboardInterrupt or SystemExit), then drain."""
        try:
            while not self.stop_requested and self._map:
                self.asyncore.loop(timeout=self.adj.asyncore_loop_timeout, map=self._map, use_poll=True, count=1)
        except (SystemExit, KeyboardInterrupt):
            pass
        self.drain()

    def request_stop(self) -> None:
        """Safe in a signal handler: sets a flag and wakes the poll, taking no lock. An exception raised
        from a signal handler can land anywhere in the loop, e.g. between a lock's acquire and the block
        that releases it, and later stall the drain on that lock (seen once, under a flood of connections)."""
        self.stop_requested = True
        with contextlib.suppress(OSError):  # the trigger is closed once the server is
            self.trigger.pull_trigger()

    def drain(self) -> None:
        """Stop accepting, answer the requests already begun (within the shutdown timeout), then close
        every connection, so that no worker thread writes to a closed socket."""
        self.accepting = False  # the listening socket is no longer polled
        deadline = time.monotonic() + self.limits.shutdown_timeout_s
        if self._in_flight():
            logger.info("stopping: answering the requests in flight (at most %.0f s)", self.limits.shutdown_timeout_s)
        while self._in_flight() and time.monotonic() < deadline:
            self.asyncore.loop(timeout=0.05, map=self._map, use_poll=True, count=1)
        self.task_dispatcher.shutdown(cancel_pending=True, timeout=1)
        for channel in list(self.active_channels.values()):
            channel.close()

    def _in_flight(self) -> bool:
        """A request is being received, waits for or holds a worker thread, or its answer is being sent."""
        return bool(self.task_dispatcher.queue) or any(
            channel.request is not None or channel.requests or channel.total_outbufs_len
            for channel in list(self.active_channels.values()))

    def maintenance(self, now: float) -> None:
        """Close idle connections and connections whose request has been arriving for too long."""
        super().maintenance(now)
        deadline = time.monotonic() - self.limits.request_read_timeout_s
        for channel in list(self.active_channels.values()):
            since = getattr(channel, "reading_since", None)
            if since is not None and since < deadline and channel.waits_on_client():
                channel.will_close = True

    def _evict_waiting(self, count: int) -> None:
        waiting = [channel for channel in self.active_channels.values()
                   if getattr(channel, "waits_on_client", lambda: False)() and not channel.will_close]
        waiting.sort(key=lambda channel: channel.reading_since or channel.last_activity)
        for channel in waiting[:count]:
            channel.will_close = True
        if waiting:
            logger.warning("connection limit (%d) reached: closed the %d connections that waited longest on their "
                           "client", self.adj.connection_limit, min(count, len(waiting)))


class WaitressServer:
    """A waitress server bound at construction (port 0 picks a free port), run in the foreground or a thread."""

    def __init__(self, app, *, host: str = "127.0.0.1", port: int = 8000, max_body_bytes: int = 4 * 1024 * 1024,
                 limits: ServingLimits = ServingLimits()):
        # Flask answers oversized bodies with a JSON 413; waitress's own cap, set higher, only bounds what
        # it buffers before Flask sees the request.
        adjustments = Adjustments(
            host=host, port=port, threads=limits.threads, asyncore_use_poll=True,
            connection_limit=connection_limit(limits.connection_limit, descriptor_budget()),
            channel_timeout=max(1, round(limits.idle_timeout_s)), cleanup_interval=1,
            max_request_body_size=4 * max_body_bytes, ident="ragr1-retriever", clear_untrusted_proxy_headers=True)
        dispatcher = ThreadedTaskDispatcher()
        dispatcher.set_thread_count(adjustments.threads)
        self._server = _GuardedServer(app, {}, dispatcher=dispatcher, adj=adjustments,
                                      sockinfo=adjustments.listen[0], limits=limits)
        self.host = host
        self.port = int(self._server.effective_port)
        self.connection_limit = adjustments.connection_limit
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def serve_forever(self) -> None:
        logger.info("listening on %s (at most %d connections); /health says ready: false until the index is loaded",
                    self.url, self.connection_limit)
        self._server.run()

    def start_in_thread(self) -> WaitressServer:
        self._thread = threading.Thread(target=self._server.run, name="ragr1-http", daemon=True)
        self._thread.start()
        return self

    def request_stop(self) -> None:
        """Ends :meth:`serve_forever` (or the thread's loop) after a drain; safe in a signal handler."""
        self._server.request_stop()

    def stop(self) -> None:
        self._server.request_stop()
        if self._thread is not None:
            self._thread.join(timeout=self._server.limits.shutdown_timeout_s + 5)
        self._server.close()
        self._server.task_dispatcher.shutdown()


@contextlib.contextmanager
def serving(index_dir: Path, *, options: Any = None, batching: Any = None, load: bool = True,
            serving_limits: ServingLimits = ServingLimits(), **app_kwargs: Any) -> Iterator[tuple[str, Any]]:
    """Serve an index from a thread on a free loopback port for the block; yields (base URL, service).

    The embedded demos and the tests use it; ``ragr1-retriever serve`` runs its server in the foreground.
    """
    from retriever_server.app import create_app
    from retriever_server.batcher import BatchingConfig
    from retriever_server.service import LoadOptions, RetrievalService

    service = RetrievalService(index_dir, options or LoadOptions(), batching or BatchingConfig())
    if load:
        service.load()
    server = WaitressServer(create_app(service, **app_kwargs), port=0, limits=serving_limits).start_in_thread()
    try:
        yield server.url, service
    finally:
        server.stop()
        service.close()
