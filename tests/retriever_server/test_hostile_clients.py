"""The retriever against hostile clients on loopback: descriptor floods, slow and idle connections, requests
that waitress itself rejects, amplification and overload. Each test reproduces an attack that once crashed,
stalled or 500'd the server, bounded in connections and time."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from retriever_server.batcher import BatchingConfig
from retriever_server.http_server import ServingLimits, serving
from retriever_server.wire import RequestLimits

QUERY = {"queries": ["Eiffel Tower"], "topk": 1}


def _retrieve(url: str, payload: dict = QUERY, timeout: float = 30) -> requests.Response:
    return requests.post(f"{url}/retrieve", json=payload, timeout=timeout)


def _raw_exchange(url: str, request: bytes, timeout: float = 20) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read the response until the server closes; (status, headers, body)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as connection:
        connection.sendall(request)
        received = b""
        while chunk := connection.recv(65536):
            received += chunk
            if b"\r\n\r\n" in received and _complete(received):
                break
    head, _, body = received.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in header_lines)}
    return int(status_line.split()[1]), headers, body


def _complete(received: bytes) -> bool:
    head, _, body = received.partition(b"\r\n\r\n")
    length = re.search(rb"(?i)content-length:\s*(\d+)", head)
    return length is not None and len(body) >= int(length.group(1))


@pytest.fixture(scope="module")
def guarded_server(demo_bm25_index):
    limits = ServingLimits(connection_limit=64, request_read_timeout_s=2, idle_timeout_s=2)
    with serving(demo_bm25_index, serving_limits=limits) as (url, _):
        yield url


WAITRESS_REJECTIONS = [
    ("body over waitress's cap", b"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
     b"Content-Length: 17000000\r\n\r\n", 413),
    ("300 KB header", b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 300_000 + b"\r\n\r\n", 431),
    ("gzip transfer encoding", b"POST /retrieve HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    ("malformed header", b"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", 400),
    ("two content lengths", b"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
     400),
]


@pytest.mark.parametrize("name, request_bytes, status", WAITRESS_REJECTIONS, ids=[r[0] for r in WAITRESS_REJECTIONS])
def test_the_http_servers_own_rejections_are_json(guarded_server, name, request_bytes, status):
    got, headers, body = _raw_exchange(guarded_server, request_bytes)
    assert got == status
    assert headers["content-type"] == "application/json"
    assert json.loads(body)["error"]
    assert _retrieve(guarded_server).status_code == 200


def test_no_static_route_serves_files(guarded_server):
    for path in ("/static/pyproject.toml", "/static/../README.md", "/static/"):
        response = requests.get(f"{guarded_server}{path}", timeout=10)
        assert response.status_code == 404 and "error" in response.json()


def test_slow_and_idle_connections_cannot_lock_out_a_client(guarded_server):
    host, port = guarded_server.removeprefix("http://").split(":")
    # Twice the connection limit, each holding half a request line.
    hostile = [socket.create_connection((host, int(port)), timeout=10) for _ in range(128)]
    try:
        for connection in hostile:
            connection.sendall(b"POST /retrieve HTTP/1.1\r\nHost: x\r\n")
        response = _retrieve(guarded_server, timeout=15)
        assert response.status_code == 200 and response.json()["result"][0]
    finally:
        for connection in hostile:
            connection.close()


def test_a_request_trickling_in_is_cut_off_at_the_read_deadline(guarded_server):
    host, port = guarded_server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=20) as connection:
        started = time.monotonic()
        closed = False
        for byte in b"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"x" * 100:
            try:
                connection.sendall(bytes([byte]))
            except OSError:  # reset by the server
                closed = True
                break
            time.sleep(0.25)  # activity every quarter second: an idle timeout alone would never fire
        assert closed or connection.recv(1024) == b""
        # A 2 s deadline, checked every second; the whole request would take 25 s.
        assert time.monotonic() - started < 20


def test_idle_keep_alive_connections_are_closed(guarded_server):
    host, port = guarded_server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=20) as connection:
        connection.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        while not _complete(answer):
            answer += connection.recv(65536)
        # The connection stays open for keep-alive, then closes once idle past the 2 s timeout.
        assert connection.recv(1024) == b""


def test_work_and_response_bytes_are_capped(demo_bm25_index):
    limits = RequestLimits(max_response_bytes=2000, max_results_per_request=20)
    with serving(demo_bm25_index, limits=limits) as (url, _):
        too_many = _retrieve(url, {"queries": ["a", "b", "c"], "topk": 10})
        assert too_many.status_code == 413 and "3 queries x topk 10 = 30 results" in too_many.json()["error"]
        too_big = _retrieve(url, {"queries": ["Eiffel Tower", "Paris"], "topk": 10})
        assert too_big.status_code == 413 and "the response would be" in too_big.json()["error"]
        assert _retrieve(url, QUERY).status_code == 200


def test_requests_waiting_for_a_thread_log_nothing(demo_bm25_index, caplog):
    with serving(demo_bm25_index, serving_limits=ServingLimits(threads=2),
                 limits=RequestLimits(max_concurrent_requests=1)) as (url, _):
        with caplog.at_level("WARNING"), concurrent.futures.ThreadPoolExecutor(32) as pool:
            statuses = list(pool.map(lambda _: _retrieve(url).status_code, range(200)))
    assert set(statuses) <= {200, 503} and 200 in statuses
    assert not [record for record in caplog.records if "queue depth" in record.getMessage()]


class _SlowIndex:
    """The real retriever, 3 s slower a search, saying when a search has started: the first search is still
    in flight when the second arrives, however loaded the machine (a lone request is never held by the
    batching wait)."""

    def __init__(self, inner):
        self.inner, self.ntotal, self.description = inner, inner.ntotal, inner.description
        self.searching = threading.Event()

    def search(self, queries, k):
        self.searching.set()
        time.sleep(3.0)
        return self.inner.search(queries, k)


def test_searches_beyond_the_concurrency_cap_get_a_503_at_once(demo_bm25_index):
    with serving(demo_bm25_index, limits=RequestLimits(max_concurrent_requests=1),
                 batching=BatchingConfig(max_batch_queries=2)) as (url, service):
        slow = service.batcher.retriever = _SlowIndex(service.batcher.retriever)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            first = pool.submit(_retrieve, url)
            assert slow.searching.wait(timeout=60)
            second = _retrieve(url)
            assert second.status_code == 503 and "overloaded" in second.json()["error"]
            assert second.headers["Retry-After"] == "1"
            assert first.result().status_code == 200
        assert _retrieve(url).status_code == 200


def _serve_in_subprocess(index: Path, log: Path, descriptors: int, *args: str) -> tuple[subprocess.Popen, str]:
    def limit_descriptors():
        resource.setrlimit(resource.RLIMIT_NOFILE, (descriptors, descriptors))

    with log.open("w") as sink:  # a file, not a pipe: a full pipe would block the server's logging
        process = subprocess.Popen(
            [sys.executable, "-m", "retriever_server.cli", "serve", "--index", str(index), "--port", "0", *args],
            stderr=sink, stdout=sink, preexec_fn=limit_descriptors)
    deadline = time.monotonic() + 120
    while not (match := re.search(r"listening on (http://\S+)", log.read_text())):
        assert process.poll() is None, f"the server exited before serving:\n{log.read_text()}"
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.2)
    url = match.group(1)
    while requests.get(f"{url}/health", timeout=10).status_code != 200:
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.2)
    return process, url


@pytest.mark.slow
def test_descriptors_past_1023_do_not_crash_the_server(demo_bm25_index, tmp_path):
    """Half-sent bodies over 512 KB spill to temporary files: two descriptors a connection. With select()
    the first descriptor numbered 1024 ended the server."""
    process, url = _serve_in_subprocess(demo_bm25_index, tmp_path / "server.log", 1200)
    host, port = url.removeprefix("http://").split(":")
    header = b"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1048576\r\n\r\n"
    hostile, highest = [], 0
    try:
        for _ in range(600):
            connection = socket.create_connection((host, int(port)), timeout=30)
            connection.sendall(header + b" " * 600 * 1024)
            hostile.append(connection)
        deadline = time.monotonic() + 30
        while highest < 1024 and time.monotonic() < deadline and process.poll() is None:
            highest = max(highest, *map(int, os.listdir(f"/proc/{process.pid}/fd")))
            time.sleep(0.1)
        assert highest >= 1024, f"the flood only reached descriptor {highest}"
        assert process.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
        assert _retrieve(url, timeout=30).status_code == 200
    finally:
        for connection in hostile:
            connection.close()
        process.terminate()
        try:  # a drain of up to 10 s, then 600 connections closed: slow on a loaded machine, but bounded
            process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGUSR1)  # the server prints every thread's stack to its log
            time.sleep(2)
            process.kill()
            pytest.fail("the server did not stop within 90 s of SIGTERM:\n"
                        + (tmp_path / "server.log").read_text()[-6000:])


def _stack_dump(process: subprocess.Popen, log: Path, earlier_dumps: int) -> list[str]:
    """Send SIGUSR1 and return the new dump's per-stack sections, each headed "N thread(s): names"."""
    process.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 30
    while log.read_text().count("=== end of stacks ===") <= earlier_dumps and time.monotonic() < deadline:
        time.sleep(0.1)
    dump = log.read_text().split("=== stacks of every thread (SIGUSR1) ===")[-1]
    assert "=== end of stacks ===" in dump, f"no complete dump within 30 s:\n{dump[:3000]}"
    return dump.partition("=== end of stacks ===")[0].split("--- ")[1:]


def test_sigusr1_prints_every_threads_stack_and_the_server_keeps_serving(demo_bm25_index, tmp_path):
    log = tmp_path / "server.log"
    process, url = _serve_in_subprocess(demo_bm25_index, log, 1024)
    try:
        main, *others = sections = _stack_dump(process, log, 0)
        assert "MainThread" in main.splitlines()[0] and "serve_forever" in main, "".join(sections)[:3000]
        assert any("ragr1-batcher" in stack.splitlines()[0] for stack in others), "".join(sections)[:3000]
        workers = [stack for stack in others if "handler_thread" in stack]
        assert sum(int(stack.split(" ", 1)[0]) for stack in workers) == 128, "".join(workers)[:3000]
        # Idle workers share one stack, printed once. A worker may still be finishing the /health answer
        # when the first signal lands (seen on a loaded CI machine), so ask again until it has gone idle.
        deadline = time.monotonic() + 30
        while not any(stack.startswith("128 thread(s)") for stack in workers) and time.monotonic() < deadline:
            time.sleep(0.5)
            sections = _stack_dump(process, log, log.read_text().count("=== end of stacks ==="))
            workers = [stack for stack in sections if "handler_thread" in stack]
        assert any(stack.startswith("128 thread(s)") for stack in workers), "".join(workers)[:3000]
        assert _retrieve(url, timeout=30).status_code == 200 and process.poll() is None
    finally:
        process.terminate()
        assert process.wait(timeout=60) == 0, log.read_text()[-3000:]
