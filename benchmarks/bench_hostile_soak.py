"""Soak test of the retriever under a mix of normal and hostile clients.

``ragr1-retriever serve`` runs in its own process (the BM25 demo index by default, or ``--index DIR``). For
``--seconds`` (default 60), ``--clients`` threads (default 64) each send requests back to back; a fraction
``--hostile-fraction`` (default 0.1) of them are hostile, drawn from: malformed JSON, a 100,000-deep nesting
bomb, a 5,000-digit integer, an amplification request (512 queries x topk 100), a 300 KB header, an
unsupported transfer encoding, a half-sent request left open, and a connection flood of 50 idle sockets.
The others are normal searches of 1-3 demo questions at topk 3.

Reported: normal requests, their errors (the target is 0) and latency percentiles; per hostile kind, the
statuses it got (a 500 is a failure); the server's resident memory before the run, at its peak and 5 s
after; and whether the server is still alive. It exits with status 1 on any normal error, 500 or crash.

Run from the repository root: ``python benchmarks/bench_hostile_soak.py`` (about 80 s). On a 2-core machine
the clients compete with the server for the cores: latencies are an upper bound.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import HelpFormatter, cpu_model  # noqa: E402

QUESTIONS = ["Eiffel Tower height", "Sydney Opera House architect", "Mount Everest", "Great Wall of China",
             "Marie Curie Nobel Prize", "river Nile length", "Mona Lisa painter", "Tokyo population"]


@dataclass
class Tally:
    normal_seconds: list[float] = field(default_factory=list)
    normal_errors: Counter = field(default_factory=Counter)
    hostile: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    lock: threading.Lock = field(default_factory=threading.Lock)


def start_server(args: argparse.Namespace, log: Path) -> tuple[subprocess.Popen, str]:
    where = ["--index", str(args.index)] if args.index else ["--demo", "--demo-kind", "bm25"]
    with log.open("w") as sink:
        process = subprocess.Popen([sys.executable, "-m", "retriever_server.cli", "serve", *where, "--port", "0"],
                                   stdout=sink, stderr=sink)
    deadline = time.monotonic() + 600
    while not (match := re.search(r"listening on (http://\S+)", log.read_text())):
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the server did not start:\n{log.read_text()[-2000:]}")
        time.sleep(0.2)
    url = match.group(1)
    while requests.get(f"{url}/health", timeout=30).status_code != 200:
        time.sleep(0.2)
    return process, url


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _raw(address: tuple[str, int], data: bytes, hold_s: float = 0.0) -> str:
    """Send raw bytes; the status the server answered, or what happened to the connection."""
    try:
        with socket.create_connection(address, timeout=30) as connection:
            connection.sendall(data)
            if hold_s:
                time.sleep(hold_s)
            answer = connection.recv(65536)
    except OSError as err:
        return type(err).__name__
    return answer.split(b" ", 2)[1].decode() if answer.startswith(b"HTTP/") else "closed"


def _post(url: str, body: bytes) -> str:
    try:
        return str(requests.post(f"{url}/retrieve", data=body, headers={"Content-Type": "application/json"},
                                 timeout=60).status_code)
    except requests.RequestException as err:
        return type(err).__name__


def _flood(address: tuple[str, int]) -> str:
    sockets = []
    try:
        for _ in range(50):
            sockets.append(socket.create_connection(address, timeout=10))
        time.sleep(2)
        return "held 50"
    except OSError as err:
        return type(err).__name__
    finally:
        for connection in sockets:
            connection.close()


def hostile_requests(url: str) -> dict:
    host, port = url.removeprefix("http://").split(":")
    address = (host, int(port))
    amplification = json.dumps({"queries": [f"q{i}" for i in range(512)], "topk": 100}).encode()
    return {
        "malformed JSON": lambda: _post(url, b'{"queries": ['),
        "nesting bomb": lambda: _post(url, b"[" * 100_000 + b"]" * 100_000),
        "huge integer": lambda: _post(url, b'{"queries": ["q"], "topk": ' + b"9" * 5000 + b"}"),
        "amplification": lambda: _post(url, amplification),
        "300 KB header": lambda: _raw(address, b"GET /health HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 300_000 + b"\r\n\r\n"),
        "gzip encoding": lambda: _raw(address, b"POST /retrieve HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n"),
        "half-sent request": lambda: _raw(address, b"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Length: 99\r\n\r\n{",
                                          hold_s=3),
        "connection flood": lambda: _flood(address),
    }


def client(url: str, deadline: float, fraction: float, tally: Tally, seed: int) -> None:
    rng, session = random.Random(seed), requests.Session()
    hostile = hostile_requests(url)
    while time.monotonic() < deadline:
        if rng.random() < fraction:
            kind = rng.choice(sorted(hostile))
            outcome = hostile[kind]()
            with tally.lock:
                tally.hostile[kind][outcome] += 1
            continue
        seconds, error = timed_search(session, url, rng.sample(QUESTIONS, rng.randint(1, 3)), 3)
        with tally.lock:
            tally.normal_seconds.append(seconds)
            if error:
                tally.normal_errors[error] += 1


def timed_search(session: requests.Session, url: str, queries: list[str], topk: int) -> tuple[float, str | None]:
    """One ``/retrieve`` call: its seconds, and None or what was wrong (a status other than 200 with one row
    per query, or the client's error)."""
    started = time.perf_counter()
    try:
        response = session.post(f"{url}/retrieve", json={"queries": queries, "topk": topk}, timeout=60)
        error = None if response.status_code == 200 and len(response.json()["result"]) == len(queries) else (
            f"status {response.status_code}: {response.text[:120]}")
    except (requests.RequestException, ValueError) as err:
        error = type(err).__name__
    return time.perf_counter() - started, error


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def soak(args: argparse.Namespace, process: subprocess.Popen, url: str) -> tuple[Tally, dict]:
    tally, memory = Tally(), {"before": rss_mib(process.pid), "peak": 0.0}
    deadline = time.monotonic() + args.seconds
    threads = [threading.Thread(target=client, args=(url, deadline, args.hostile_fraction, tally, seed), daemon=True)
               for seed in range(args.clients)]
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads):
        if process.poll() is None:
            memory["peak"] = max(memory["peak"], rss_mib(process.pid))
        time.sleep(0.5)
    time.sleep(5)
    memory["after"] = rss_mib(process.pid) if process.poll() is None else float("nan")
    return tally, memory


def report(args: argparse.Namespace, tally: Tally, memory: dict, alive: bool) -> bool:
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores; {args.clients} clients for {args.seconds:g} s, "
          f"{args.hostile_fraction:.0%} hostile")
    normal = len(tally.normal_seconds)
    errors = sum(tally.normal_errors.values())
    print(f"\n| normal requests | errors | p50 ms | p99 ms |\n|---|---|---|---|\n| {normal} | {errors} "
          f"{dict(tally.normal_errors) or ''} | {percentile(tally.normal_seconds, 0.5) * 1000:.0f} | "
          f"{percentile(tally.normal_seconds, 0.99) * 1000:.0f} |")
    print("\n| hostile kind | sent | outcomes |\n|---|---|---|")
    for kind, outcomes in sorted(tally.hostile.items()):
        print(f"| {kind} | {sum(outcomes.values())} | {', '.join(f'{k}: {v}' for k, v in outcomes.most_common())} |")
    print(f"\nserver RSS MiB: before {memory['before']:.0f}, peak {memory['peak']:.0f}, 5 s after "
          f"{memory['after']:.0f}; alive: {alive}")
    five_hundreds = sum(outcomes["500"] for outcomes in tally.hostile.values())
    return errors == 0 and five_hundreds == 0 and alive


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--index", type=Path, default=None, help="index folder (default: the BM25 demo index)")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--hostile-fraction", type=float, default=0.1)
    args = parser.parse_args(argv)
    log = Path(tempfile.mkdtemp(prefix="ragr1-soak-")) / "server.log"
    process, url = start_server(args, log)
    try:
        tally, memory = soak(args, process, url)
        alive = process.poll() is None and requests.get(f"{url}/health", timeout=30).status_code == 200
        ok = report(args, tally, memory, alive)
    finally:
        process.terminate()
        process.wait(timeout=30)
    print(f"server log: {log}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
