"""Soak of the sharded retriever on Ray beside the single-process one: mixed load, memory of every process.

Two servers run at once, each started as a user starts it (``ragr1-retriever serve`` as a subprocess): the
demo index served whole by one process, and the same index cut into ``--shards`` (default 2) served with
``--ray`` on a Ray instance of the server's own (or ``--ray-address``). For ``--minutes`` (default 20),
``--clients`` threads per server (default 16) send requests back to back: searches of 1-3 demo questions at
topk 3, and a fraction ``--hostile-fraction`` (default 0.1) of hostile requests (those of
``bench_hostile_soak.py``: malformed JSON, nesting bomb, huge integer, amplification, 300 KB header, gzip
encoding, half-sent request, connection flood).

Every ``--sample-seconds`` (default 60) the resident memory of every process of each server is sampled:
the front (and its supervisor), and for the sharded server every Ray process it started (GCS, raylet,
dashboard, agents, Serve controller, each shard replica). Reported: per server, the requests, their errors
(the target is 0; a 500 to a hostile request counts), latency percentiles, and the memory table; then whether
both servers give the same documents for every demo question, and whether SIGTERM stopped each server with
status 0 and every process it started. Exits with status 1 on any error.

Run from the repository root: ``python benchmarks/bench_ray_soak.py`` (20 minutes plus about 2 to start;
``--minutes 2`` to try it). On a 2-core machine the two servers and all clients share the cores: latencies
are an upper bound; errors and memory growth are what this measures.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import HelpFormatter, cpu_model  # noqa: E402
from bench_hostile_soak import hostile_requests, percentile, timed_search  # noqa: E402

TOPK = 3


@dataclass
class Tally:
    seconds: list[float] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)
    hostile: Counter = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class Server:
    name: str
    process: subprocess.Popen
    url: str
    log: Path
    tally: Tally = field(default_factory=Tally)
    samples: list[tuple[str, dict[str, float]]] = field(default_factory=list)  # (when, MiB per process)
    family: dict[int, object] = field(default_factory=dict)  # every process seen in its tree (psutil)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start(name: str, index: Path, options: list[str], workdir: Path) -> Server:
    log, port = workdir / f"{name}.log", free_port()
    script = Path(sys.executable).with_name("ragr1-retriever")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "retriever_server.cli"]
    with log.open("w") as sink:
        process = subprocess.Popen([*command, "serve", "--index", str(index), "--port", str(port), *options],
                                   stdout=sink, stderr=subprocess.STDOUT)
    return Server(name, process, f"http://127.0.0.1:{port}", log)


def wait_ready(server: Server, timeout_s: float = 900.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise SystemExit(f"{server.name} exited ({server.process.returncode}):\n{server.log.read_text()[-3000:]}")
        with contextlib.suppress(requests.RequestException):
            if requests.get(f"{server.url}/health", timeout=5).status_code == 200:
                return
        time.sleep(1.0)
    raise SystemExit(f"{server.name} not ready within {timeout_s:g} s:\n{server.log.read_text()[-3000:]}")


def label(process) -> str:
    """A stable name for a process of a server's tree."""
    name = process.name()
    if name.startswith("ray::ServeReplica:"):  # shard-0, directory, encoder (".method" while it runs one)
        return name.rsplit(":", 1)[1].split(".")[0]
    if name.startswith("ray::"):
        return name[len("ray::"):].split(".")[0]
    if not name.startswith("python") and name != "ragr1-retriever":
        return name  # gcs_server, raylet
    command = " ".join(process.cmdline())
    for script, short in (("dashboard/agent.py", "dashboard agent"), ("dashboard.py", "dashboard"),
                          ("log_monitor.py", "log monitor"), ("monitor.py", "autoscaler monitor"),
                          ("runtime_env/agent", "runtime env agent"), ("retriever_server.cli", "front")):
        if script in command:
            return short
    if "ragr1-retriever" in command:
        return "front" if "--ray" not in command else "supervisor"
    return name


def sample(server: Server, when: str) -> None:
    import psutil

    memory: dict[str, float] = Counter()
    try:
        root = psutil.Process(server.process.pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        processes = []
    for process in processes:
        with contextlib.suppress(psutil.Error):
            if process.status() == psutil.STATUS_ZOMBIE:
                continue
            server.family.setdefault(process.pid, process)
            memory[label(process)] += process.memory_info().rss / 2**20
    server.samples.append((when, dict(memory)))


def client(server: Server, questions: list[str], deadline: float, fraction: float, seed: int) -> None:
    rng, session, tally = random.Random(seed), requests.Session(), server.tally
    hostile = hostile_requests(server.url)
    while time.monotonic() < deadline:
        if rng.random() < fraction:
            kind = rng.choice(sorted(hostile))
            outcome = hostile[kind]()
            with tally.lock:
                tally.hostile[kind] += 1
                if outcome == "500":
                    tally.errors[f"500 to {kind}"] += 1
            continue
        seconds, error = timed_search(session, server.url, rng.sample(questions, rng.randint(1, 3)), TOPK)
        with tally.lock:
            tally.seconds.append(seconds)
            if error:
                tally.errors[error] += 1


def same_documents(servers: list[Server], questions: list[str]) -> bool:
    answers = []
    for server in servers:
        rows = []
        for start in range(0, len(questions), 32):
            response = requests.post(f"{server.url}/retrieve", json={"queries": questions[start:start + 32],
                                                                     "topk": TOPK}, timeout=120)
            if response.status_code != 200:
                print(f"{server.name}: {response.status_code} {response.text[:200]}")
                return False
            rows += [[hit["id"] for hit in row] for row in response.json()["result"]]
        answers.append(rows)
    return all(answer == answers[0] for answer in answers[1:])


def stop(server: Server) -> tuple[int | None, list[str]]:
    """SIGTERM; the exit status and the processes of its tree still running 20 s after it exited."""
    import psutil

    sample(server, "at SIGTERM")  # the tree as it is now, replicas restarted during the run included
    server.process.send_signal(signal.SIGTERM)
    try:
        code = server.process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        server.process.kill()
        code = None
    deadline, left = time.monotonic() + 20, []
    while time.monotonic() < deadline:
        left = []
        for process in server.family.values():
            with contextlib.suppress(psutil.Error):
                if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                    left.append(process)
        if not left:
            break
        time.sleep(0.5)
    names = [f"{label(p)} (pid {p.pid})" for p in left]
    for process in left:  # never leave them running
        with contextlib.suppress(psutil.Error):
            process.kill()
    return code, names


def memory_table(server: Server) -> str:
    labels = sorted({name for _, memory in server.samples for name in memory},
                    key=lambda name: (name not in ("supervisor", "front"), name))
    lines = ["| minute | " + " | ".join(labels) + " | total |", "|---" * (len(labels) + 2) + "|"]
    for when, memory in server.samples:
        cells = [f"{memory[name]:.0f}" if name in memory else "-" for name in labels]
        lines.append(f"| {when} | " + " | ".join(cells) + f" | {sum(memory.values()):.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--clients", type=int, default=16, help="client threads per server")
    parser.add_argument("--hostile-fraction", type=float, default=0.1)
    parser.add_argument("--sample-seconds", type=float, default=60.0)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--ray-address", default=None, help="a Ray cluster for the shards (default: the server's own)")
    parser.add_argument("--workdir", type=Path, default=None, help="where the sharded index and logs go")
    parser.add_argument("--servers", default="single,sharded", help="which servers run (at once)")
    args = parser.parse_args(argv)

    from retriever_server.demo import ensure_demo_index, load_demo_questions
    from retriever_server.sharding import shard_index

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="ragr1-ray-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    whole = ensure_demo_index("dense", show_progress=True)
    sharded = workdir / f"demo-{args.shards}-shards"
    if not (sharded / "manifest.json").exists():
        shard_index(whole, sharded, args.shards)
    questions = [question["question"] for question in load_demo_questions()]
    ray_options = ["--ray", *(["--ray-address", args.ray_address] if args.ray_address else [])]
    chosen = {"single": ("single-process", whole, []), "sharded": ("sharded", sharded, ray_options)}
    servers = [start(*chosen[name], workdir) for name in args.servers.split(",")]
    ok, identical = True, False
    try:
        for server in servers:
            wait_ready(server)
        for server in servers:
            sample(server, "0 (ready)")
        started = time.monotonic()
        deadline = started + args.minutes * 60
        threads = [threading.Thread(target=client, args=(server, questions, deadline, args.hostile_fraction,
                                                         1000 * number + seed), daemon=True)
                   for number, server in enumerate(servers) for seed in range(args.clients)]
        for thread in threads:
            thread.start()
        next_sample = time.monotonic() + args.sample_seconds
        while any(thread.is_alive() for thread in threads):
            if time.monotonic() >= next_sample:
                for server in servers:
                    sample(server, f"{(time.monotonic() - started) / 60:.1f}")
                next_sample += args.sample_seconds
            time.sleep(0.5)
        for server in servers:
            sample(server, f"{(time.monotonic() - started) / 60:.1f} (load over)")
            alive = server.process.poll() is None
            ok &= alive
        identical = same_documents(servers, questions)
        ok &= identical or len(servers) == 1
    finally:
        outcomes = {server.name: stop(server) for server in servers}

    print(f"machine: {cpu_model()}, {os.cpu_count()} cores; {args.minutes:g} min, {args.clients} clients per "
          f"server, {args.hostile_fraction:.0%} hostile, demo index ({args.shards} shards on Ray for 'sharded')")
    for server in servers:
        tally = server.tally
        errors = sum(tally.errors.values())
        ok &= errors == 0
        code, left = outcomes[server.name]
        ok &= code == 0 and not left
        print(f"\n### {server.name}\n\n| searches | hostile | errors | p50 ms | p99 ms | SIGTERM: status, left |\n"
              f"|---|---|---|---|---|---|\n| {len(tally.seconds)} | {sum(tally.hostile.values())} | {errors} "
              f"{dict(tally.errors) or ''} | {percentile(tally.seconds, 0.5) * 1000:.0f} | "
              f"{percentile(tally.seconds, 0.99) * 1000:.0f} | {code}, {', '.join(left) or 'none'} |")
        print(f"\nresident memory, MiB, every {args.sample_seconds:g} s:\n\n{memory_table(server)}")
    if len(servers) > 1:
        print(f"\nsame documents for every demo question: {'yes' if identical else 'NO'}")
    print(f"logs: {workdir}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
