"""Throughput benchmark of the retriever server: HTTP serving next to the raw encoder + faiss limit.

What it measures
----------------
1. **Raw limit.** The loaded service's retriever called directly (``encoder.encode_queries`` then
   ``searcher.search``), bypassing HTTP, the batcher and the embedding cache, on batches of fresh queries
   (``--raw-batches``, default 1, 3, 8, 16, 32, 64, 128 and 256). The best queries/s is the ceiling the server is
   compared with; batches of 1 and 3 are what one client alone can get.
2. **Server.** The real server in this process: ``RetrievalService`` + ``create_app`` + ``WaitressServer``
   on a free 127.0.0.1 port. Clients post ``/retrieve`` requests of 1 or 3 queries
   (``--queries-per-request``) at each concurrency (``--concurrency``), each cell for ``--seconds`` after a
   ``--warmup``. A fraction of the queries (``--repeat-fraction``, default 0.3) repeats queries already sent
   to the server in this run; the rest were never sent before, so the embedding cache helps only as much as
   the repeats allow.

Per cell it reports requests/s, queries/s, p50/p99 request latency, errors, % of the raw limit, and from the
server's ``/metrics`` (deltas over the cell): average distinct queries per batch, embedding-cache hit rate,
and how busy the batcher thread was (encode + search seconds / wall seconds). It also reports the CPU
cores used by the server process and by the load generator.
3. **One large request.** After the cells, ``--large-repeats`` requests of ``--large-request`` (default 512)
   fresh queries each, one at a time, against the raw encode + search of as many fresh queries in one
   batch: what the server adds to a large request.

The load generator
------------------
By default the clients run in a separate process (``--client-mode process``) so that they do not hold the
server's GIL; ``--client-mode thread`` runs them as threads of the server process instead. The client uses
aiohttp (one event loop, ``concurrency`` connections) when it is installed, else a ``requests.Session`` per
client thread (``--client-lib``). Either way, on a machine with few cores the clients COMPETE WITH THE
SERVER FOR CPU: on 2 cores the numbers are a lower bound on what the server does with a client elsewhere.
The header shows the core count and the client's CPU use per cell shows how much it took.

Pinned mode
-----------
``--pinned`` puts the server (this process, before the index is loaded, so its thread pools are sized from
its affinity as a Slurm or Kubernetes CPU limit would size them) on the first CPU this process may use and
the load generator on the second; ``--server-cpus`` and ``--client-cpus`` choose others. The raw limit is
then measured on the server's CPUs too, so every cell compares the server with what the same core does
without HTTP. This is the reproducible setting: the client never competes with the server.

The index
---------
A synthetic, deterministic corpus of ``--passages`` templated passages (default 100000) is indexed with the
``minilm`` encoder and a faiss ``--index-type`` (default ``Flat``) in ``--workdir`` (default
/tmp/ragr1-bench). The first run builds it (about 13 minutes for 100k passages on 2 cores); later runs
reuse it. ``--index DIR`` serves an existing index folder instead.

Run ``python benchmarks/bench_retriever.py --help`` from the repository root. With the defaults it takes
about 2.5 minutes on a 2-core machine once the index is built. It talks
only to 127.0.0.1, stops by itself (every request loop is bounded by time), writes the results as JSON with
``--json PATH``, and exits with status 1 if any request failed. ``--max-wait-ms``, ``--max-return-wait-ms``,
``--max-batch-queries``, ``--http-threads``, ``--omp-threads``, ``--torch-threads`` and
``--encoder-batch-size`` are passed to the server, for tuning. ``--return-wait-ab`` runs every cell twice in a
row, the batcher's return wait off and then on (in alternating order), so that the two are compared on the
same server and minute. ``--lone-floor`` also times one client of one query against a minimal Flask route
around the same encoder and index (no batcher, embedding cache, metrics or limits), served the same way: the
floor of what HTTP and Flask add on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import multiprocessing
import os
import platform
import random
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# First on the path even where an editable install lists the checkout already: some wheels ship a top-level
# `tests` package into site-packages that would shadow ours.
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.bench_common import (  # noqa: E402 (after the path set-up above)
    HelpFormatter,
    cpu_model,
    int_list,
    machine_busy_seconds,
    process_cpu_seconds,
)
from retriever_server.batcher import BatchingConfig  # noqa: E402

CORPUS_VERSION = 2  # bump when the generator below changes, so a cached index is not reused

# ---------------------------------------------------------------------------------------------------------
# Synthetic corpus and queries (shared vocabulary, so queries find related passages)
# ---------------------------------------------------------------------------------------------------------

SUBJECTS = ("observatory", "lighthouse", "textile mill", "botanical garden", "clock tower", "railway station",
            "river port", "abbey", "printing house", "glassworks", "salt mine", "opera house", "fish market",
            "stone bridge", "windmill", "brewery", "shipyard", "university", "hospital", "aqueduct",
            "fortress", "cathedral", "tannery", "paper mill", "silk exchange", "ferry terminal",
            "copper mine", "bell foundry", "orchard estate", "canal lock", "weather station", "chess club")
PLACE_HEADS = ("Ash", "Bel", "Cor", "Dun", "Elm", "Fen", "Glen", "Hal")
PLACE_TAILS = ("brook", "mere", "wick", "haven", "stead", "ford")
PLACES = tuple(head + tail for head in PLACE_HEADS for tail in PLACE_TAILS)
TRAITS = ("a painted ceiling", "a winter market", "rare alpine orchids", "a bronze bell", "annual boat races",
          "hand-carved doors", "a hidden library", "lavender fields", "steam engines", "a spiral staircase",
          "amber glass", "a great spring flood", "the wool trade", "a stained-glass rose window",
          "lantern parades", "mineral springs", "an old sundial", "migrating cranes", "cheese cellars",
          "a marble fountain", "copper etchings", "a haunted cellar", "a collection of sea charts",
          "tide-powered wheels", "pear cider", "a rooftop garden", "an iron footbridge", "a puppet theatre",
          "a meteorite fragment", "silver filigree", "the apricot harvest", "a telescope dome")
FIRST_NAMES = ("Agnes", "Bertram", "Clara", "Dmitri", "Edith", "Florian", "Greta", "Hugo", "Ines", "Jonas",
               "Katrin", "Lorenzo", "Mira", "Nils", "Odile", "Pavel")
SURNAMES = ("Ashgrove", "Brandt", "Castell", "Devereux", "Ekwall", "Fairweather", "Grieve", "Holloway",
            "Ivers", "Janssen", "Kowal", "Lindqvist", "Marchetti", "Norberg", "Oakes", "Prideaux")
PASSAGE_TEMPLATES = (
    "The {subject} of {place} was founded in {year} by {founder}. It is known for {t1} and {t2}.",
    "{founder} opened the {place} {subject} in {year}; visitors come for {t1} and {t2}.",
    "Built in {year} under {founder}, the {subject} in {place} is famous for {t1} and {t2}.",
    "In {year} {place} gained a {subject}, paid for by {founder}, with {t1} and {t2}.",
)
QUERY_TEMPLATES = (
    "when was the {place} {subject} known for {trait} founded",
    "who founded the {subject} in {place} famous for {trait}",
    "does the {subject} of {place} have {trait}",
    "{trait} at the {place} {subject}",
    "history of the {subject} in {place} with {trait}",
    "what year did {place} open the {subject} with {trait}",
    "where is the {subject} near {place} known for {trait}",
    "tell me about {trait} in the {place} {subject}",
    "{place} {subject} {trait} founder",
    "is {trait} the reason people visit the {subject} of {place}",
)
QUERY_SPACE = len(QUERY_TEMPLATES) * len(SUBJECTS) * len(PLACES) * len(TRAITS)
QUERY_STRIDE = 104_729  # a prime not dividing QUERY_SPACE: consecutive queries differ in every slot


def passage(number: int, rng: random.Random) -> dict:
    """One Search-R1 jsonl row: a quoted title line, then two templated sentences (about 35 tokens)."""
    subject, place = rng.choice(SUBJECTS), rng.choice(PLACES)
    t1, t2 = rng.sample(TRAITS, 2)
    founder = f"{rng.choice(FIRST_NAMES)} {rng.choice(SURNAMES)}"
    text = rng.choice(PASSAGE_TEMPLATES).format(subject=subject, place=place, year=rng.randint(1150, 1985),
                                                founder=founder, t1=t1, t2=t2)
    return {"id": f"bench-{number}", "contents": f'"{place} {subject} {number}"\n{text}'}


def write_corpus(path: Path, count: int, seed: int = 20240611) -> None:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(passage(number, rng)) + "\n" for number in range(count))


def make_query(number: int) -> str:
    """The ``number``-th query of the pool; distinct for every ``number`` (a permutation of the slots)."""
    slot = (number * QUERY_STRIDE + 12_345) % QUERY_SPACE
    slot, trait = divmod(slot, len(TRAITS))
    slot, place = divmod(slot, len(PLACES))
    template, subject = divmod(slot, len(SUBJECTS))
    text = QUERY_TEMPLATES[template].format(subject=SUBJECTS[subject], place=PLACES[place],
                                            trait=TRAITS[trait])
    lap = number // QUERY_SPACE
    return f"{text} {lap + 1}" if lap else text


class QueryStream:
    """Queries to send: fresh ones (never sent before in this run) and repeats of ones already sent.

    Query numbers ``[repeat_floor, next_fresh)`` are those already sent to the server; a repeat is drawn
    uniformly from them with probability ``repeat_fraction``.
    """

    def __init__(self, next_fresh: int, repeat_floor: int, repeat_fraction: float, seed: int):
        self.next_fresh = next_fresh
        self.repeat_floor = repeat_floor
        self.repeat_fraction = repeat_fraction
        self.repeats = 0
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def fresh(self, count: int) -> list[str]:
        with self._lock:
            first, self.next_fresh = self.next_fresh, self.next_fresh + count
        return [make_query(n) for n in range(first, first + count)]

    def draw(self, count: int) -> list[str]:
        with self._lock:
            numbers = [self._next_number() for _ in range(count)]
        return [make_query(n) for n in numbers]

    def _next_number(self) -> int:
        if self.next_fresh > self.repeat_floor and self._rng.random() < self.repeat_fraction:
            self.repeats += 1
            return self._rng.randrange(self.repeat_floor, self.next_fresh)
        self.next_fresh += 1
        return self.next_fresh - 1


# ---------------------------------------------------------------------------------------------------------
# Index
# ---------------------------------------------------------------------------------------------------------

def ensure_index(args: argparse.Namespace) -> Path:
    """``--index`` as given, or the cached benchmark index in ``--workdir``, built on first use."""
    from retriever_server.builder import BuildOptions, build_index
    from retriever_server.manifest import MANIFEST_NAME

    if args.index:
        return Path(args.index)
    workdir = Path(args.workdir)
    safe_type = "".join(c if c.isalnum() else "_" for c in args.index_type)
    index_dir = workdir / f"index-v{CORPUS_VERSION}-{args.passages}-{args.encoder}-{safe_type}"
    if (index_dir / MANIFEST_NAME).exists():
        print(f"reusing the index in {index_dir}")
        return index_dir
    workdir.mkdir(parents=True, exist_ok=True)
    corpus = workdir / f"corpus-v{CORPUS_VERSION}-{args.passages}.jsonl"
    write_corpus(corpus, args.passages)
    print(f"building a {args.index_type} index over {args.passages} passages in {index_dir} (first run only)")
    started = time.perf_counter()
    build_index(BuildOptions(corpus=corpus, out_dir=index_dir, encoder=args.encoder,
                             index_type=args.index_type, show_progress=sys.stderr.isatty()))
    print(f"built in {time.perf_counter() - started:.0f} s")
    return index_dir


# ---------------------------------------------------------------------------------------------------------
# Raw limit: encoder + searcher called directly
# ---------------------------------------------------------------------------------------------------------

def measure_raw_limit(retriever, stream: QueryStream, batch_sizes: list[int], seconds: float,
                      topk: int) -> dict:
    """Best queries/s of encode + search on batches of fresh queries, and the numbers per batch size."""
    per_batch = {size: _raw_batches(retriever, stream, size, seconds, topk) for size in batch_sizes}
    best = max(per_batch, key=lambda size: per_batch[size]["queries_per_s"])
    return {"best_queries_per_s": per_batch[best]["queries_per_s"], "best_batch": best,
            "per_batch": {str(size): row for size, row in per_batch.items()}}


def _raw_batches(retriever, stream: QueryStream, size: int, seconds: float, topk: int) -> dict:
    _raw_search(retriever, stream.fresh(size), topk)  # warm-up: allocator and thread pools
    encode_s = search_s = 0.0
    batches = 0
    own_cpu, machine_cpu = time.process_time(), machine_busy_seconds()
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        encode, search = _raw_search(retriever, stream.fresh(size), topk)
        encode_s, search_s, batches = encode_s + encode, search_s + search, batches + 1
    elapsed = time.perf_counter() - started
    other = machine_busy_seconds() - machine_cpu - (time.process_time() - own_cpu)
    return {"batches": batches, "queries_per_s": batches * size / elapsed,
            "other_cpu_cores": max(0.0, other) / elapsed,
            "encode_ms_per_batch": 1000 * encode_s / batches,
            "search_ms_per_batch": 1000 * search_s / batches}


def _raw_search(retriever, queries: list[str], topk: int) -> tuple[float, float]:
    """Seconds spent encoding and searching one batch (a lexical retriever only searches)."""
    started = time.perf_counter()
    encoder = getattr(retriever, "encoder", None)
    if encoder is None:
        retriever.search(queries, topk)
        return 0.0, time.perf_counter() - started
    vectors = encoder.encode_queries(queries)
    encoded = time.perf_counter()
    retriever.searcher.search(vectors, topk)
    return encoded - started, time.perf_counter() - encoded


# ---------------------------------------------------------------------------------------------------------
# Load generation (runs in a child process or a thread; imports nothing from the server)
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CellSpec:
    url: str
    concurrency: int
    queries_per_request: int
    warmup_s: float
    seconds: float
    topk: int
    next_fresh: int
    repeat_floor: int
    repeat_fraction: float
    seed: int
    client_lib: str
    server_pid: int
    request_timeout_s: float = 60.0
    client_cpus: tuple[int, ...] = ()  # pinned mode: the load generator's CPUs


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    queries: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)

    def record(self, latency: float, queries: int, error: str | None) -> None:
        if error is None:
            self.latencies.append(latency)
            self.queries += queries
            return
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(error)


def check_response(status: int, body: bytes, sent: int, topk: int) -> str | None:
    """None for a correct answer to ``sent`` queries, else what is wrong with it."""
    if status != 200:
        return f"HTTP {status}: {body[:200]!r}"
    try:
        result = json.loads(body)["result"]
    except (ValueError, KeyError, TypeError) as err:
        return f"unreadable response: {err}"
    if len(result) != sent or any(not 1 <= len(hits) <= topk for hits in result):
        return f"wrong result shape: {[len(hits) for hits in result]} for {sent} queries"
    return None


async def _aiohttp_phase(spec: CellSpec, stream: QueryStream, seconds: float) -> tuple[Tally, float]:
    import aiohttp

    tally = Tally()
    connector = aiohttp.TCPConnector(limit=spec.concurrency)
    timeout = aiohttp.ClientTimeout(total=spec.request_timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = time.perf_counter()
        deadline = started + seconds
        await asyncio.gather(*(_aiohttp_client(session, spec, stream, deadline, tally)
                               for _ in range(spec.concurrency)))
        return tally, time.perf_counter() - started


async def _aiohttp_client(session, spec: CellSpec, stream: QueryStream, deadline: float,
                          tally: Tally) -> None:
    import aiohttp

    while time.perf_counter() < deadline:
        queries = stream.draw(spec.queries_per_request)
        payload = {"queries": queries, "topk": spec.topk}
        started = time.perf_counter()
        try:
            async with session.post(f"{spec.url}/retrieve", json=payload) as reply:
                error = check_response(reply.status, await reply.read(), len(queries), spec.topk)
        except (aiohttp.ClientError, asyncio.TimeoutError) as err:
            error = f"{type(err).__name__}: {err}"
        tally.record(time.perf_counter() - started, len(queries), error)


def _requests_phase(spec: CellSpec, stream: QueryStream, seconds: float) -> tuple[Tally, float]:
    tally, lock = Tally(), threading.Lock()
    started = time.perf_counter()
    deadline = started + seconds
    threads = [threading.Thread(target=_requests_client, args=(spec, stream, deadline, tally, lock),
                                daemon=True) for _ in range(spec.concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=seconds + spec.request_timeout_s + 5)
    return tally, time.perf_counter() - started


def _requests_client(spec: CellSpec, stream: QueryStream, deadline: float, tally: Tally,
                     lock: threading.Lock) -> None:
    import requests

    with requests.Session() as session:
        while time.perf_counter() < deadline:
            queries = stream.draw(spec.queries_per_request)
            started = time.perf_counter()
            try:
                reply = session.post(f"{spec.url}/retrieve", json={"queries": queries, "topk": spec.topk},
                                     timeout=spec.request_timeout_s)
                error = check_response(reply.status_code, reply.content, len(queries), spec.topk)
            except requests.RequestException as err:
                error = f"{type(err).__name__}: {err}"
            with lock:
                tally.record(time.perf_counter() - started, len(queries), error)


def run_phase(spec: CellSpec, stream: QueryStream, seconds: float) -> tuple[Tally, float]:
    if spec.client_lib == "aiohttp":
        return asyncio.run(_aiohttp_phase(spec, stream, seconds))
    return _requests_phase(spec, stream, seconds)


def pin(cpus: tuple[int, ...]) -> None:
    """Keep this process (and the threads it starts) on ``cpus``; nothing when empty."""
    if cpus:
        os.sched_setaffinity(0, cpus)


def run_large_requests(url: str, batches: list[list[str]], topk: int, client_cpus: tuple[int, ...]) -> dict:
    """One request per batch, one after another: each request's latency and any error."""
    pin(client_cpus)
    latencies, errors = [], []
    for queries in batches:
        body = json.dumps({"queries": queries, "topk": topk}).encode()
        request = urllib.request.Request(f"{url}/retrieve", data=body,
                                         headers={"Content-Type": "application/json"})
        started = time.perf_counter()
        try:
            with urllib.request.urlopen(request, timeout=120) as reply:
                error = check_response(reply.status, reply.read(), len(queries), topk)
        except OSError as err:  # urllib's HTTPError and URLError are OSErrors
            error = f"{type(err).__name__}: {err}"
        latencies.append(time.perf_counter() - started)
        if error:
            errors.append(error)
    return {"latencies": latencies, "errors": errors}


RETRIEVE_SECONDS = 'ragr1_retriever_request_seconds_{}{{endpoint="/retrieve"}}'  # .format("sum" | "count")


def scrape_metrics(url: str) -> dict[str, float]:
    """The samples of ``/metrics`` (counters and histogram sums/counts) by name: unlabelled ones, and the
    ``/retrieve`` requests' handler seconds (:data:`RETRIEVE_SECONDS`); histogram buckets are left out. Empty
    from a server without ``/metrics`` (the minimal route of ``--lone-floor``)."""
    try:
        with urllib.request.urlopen(f"{url}/metrics", timeout=30) as reply:
            text = reply.read().decode()
    except urllib.error.HTTPError as err:
        if err.code == 404:
            return {}
        raise
    wanted = {RETRIEVE_SECONDS.format("sum"), RETRIEVE_SECONDS.format("count")}
    samples = {}
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name and not line.startswith("#") and ("{" not in name or name in wanted):
            samples[name] = float(value)
    return samples


def run_cell(spec: CellSpec) -> dict:
    """Warm up, then load the server for ``spec.seconds``; the raw client-side numbers and metric deltas."""
    pin(spec.client_cpus)
    stream = QueryStream(spec.next_fresh, spec.repeat_floor, spec.repeat_fraction, spec.seed)
    warm, _ = run_phase(spec, stream, spec.warmup_s)
    before, repeats = scrape_metrics(spec.url), stream.repeats
    server_cpu, client_cpu, machine_cpu = process_cpu_seconds(spec.server_pid), time.process_time(), \
        machine_busy_seconds()
    tally, elapsed = run_phase(spec, stream, spec.seconds)
    server_cpu = process_cpu_seconds(spec.server_pid) - server_cpu
    client_cpu = time.process_time() - client_cpu
    machine_cpu = machine_busy_seconds() - machine_cpu
    after = scrape_metrics(spec.url)
    return {"latencies": tally.latencies, "queries": tally.queries, "errors": tally.errors + warm.errors,
            "error_samples": warm.error_samples + tally.error_samples, "elapsed_s": elapsed,
            "server_cpu_s": server_cpu, "client_cpu_s": client_cpu, "machine_cpu_s": machine_cpu,
            "repeats": stream.repeats - repeats, "next_fresh": stream.next_fresh,
            "metrics": {name: after[name] - before.get(name, 0.0) for name in after}}


# ---------------------------------------------------------------------------------------------------------
# Server and cells
# ---------------------------------------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summarize_cell(concurrency: int, per_request: int, raw: dict, client_mode: str) -> dict:
    """One table row from what :func:`run_cell` returned."""
    m, elapsed = raw["metrics"], raw["elapsed_s"]
    hits = m.get("ragr1_retriever_cache_hits_total", 0.0)
    misses = m.get("ragr1_retriever_cache_misses_total", 0.0)
    batches = m.get("ragr1_retriever_batch_queries_count", 0.0)
    encode_s = m.get("ragr1_retriever_encode_seconds_sum", 0.0)
    busy = encode_s + m.get("ragr1_retriever_search_seconds_sum", 0.0)
    requests_done = len(raw["latencies"])
    return {
        "concurrency": concurrency, "queries_per_request": per_request, "seconds": round(elapsed, 2),
        "requests": requests_done, "requests_per_s": requests_done / elapsed,
        "queries_per_s": raw["queries"] / elapsed,
        "p50_ms": 1000 * percentile(raw["latencies"], 50), "p99_ms": 1000 * percentile(raw["latencies"], 99),
        "errors": raw["errors"], "error_samples": raw["error_samples"],
        "avg_batch_queries": m.get("ragr1_retriever_batch_queries_sum", 0.0) / batches if batches else 0.0,
        "avg_batch_requests": m.get("ragr1_retriever_batch_requests_sum", 0.0) / batches if batches else 0.0,
        "batches": int(batches),
        "cache_hit_rate": hits / (hits + misses) if hits + misses else 0.0,
        "encoded_per_s": misses / elapsed,
        "deduplicated_queries": int(m.get("ragr1_retriever_deduplicated_queries_total", 0.0)),
        "repeat_fraction_sent": raw["repeats"] / max(1, raw["queries"]),
        "batcher_busy": busy / elapsed,
        "encode_ms_per_batch": 1000 * encode_s / batches if batches else 0.0,
        "queue_ms_avg": queue_ms_avg(m),
        "time_ms": request_time_breakdown(m, raw["latencies"]),
        "server_cpu_cores": raw["server_cpu_s"] / elapsed,
        "client_cpu_cores": raw["client_cpu_s"] / elapsed if client_mode == "process" else None,
        "other_cpu_cores": max(0.0, raw["machine_cpu_s"] - raw["server_cpu_s"]
                               - (raw["client_cpu_s"] if client_mode == "process" else 0.0)) / elapsed,
    }


def make_executor(args: argparse.Namespace) -> Executor:
    if args.client_mode == "process":
        return ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench-client")


def return_waits(args: argparse.Namespace) -> tuple[float, ...]:
    return (0.0, args.max_return_wait_ms) if args.return_wait_ab else (args.max_return_wait_ms,)


def cell_plan(args: argparse.Namespace) -> list[tuple[int, int, float]]:
    """(concurrency, queries per request, return wait) of every cell in order; with ``--return-wait-ab`` the
    two arms of a cell run back to back, off first in even cells and on first in odd ones."""
    plan = []
    for number, (concurrency, per_request) in enumerate(
            (c, q) for c in args.concurrency for q in args.queries_per_request):
        waits = return_waits(args) if number % 2 == 0 else return_waits(args)[::-1]
        plan.extend((concurrency, per_request, wait) for wait in waits)
    return plan


def run_cells(args: argparse.Namespace, url: str, raw_limit: float, next_fresh: int,
              set_return_wait: Callable[[float], None]) -> tuple[list[dict], int]:
    """Every (concurrency, queries-per-request) cell, in order, each continuing the same query stream; the
    rows and the next query number never sent. With ``--return-wait-ab`` each cell runs twice in a row, the
    batcher's return wait off and then at ``--max-return-wait-ms``."""
    rows, repeat_floor = [], next_fresh
    with make_executor(args) as executor:
        for number, (concurrency, per_request, wait_ms) in enumerate(cell_plan(args)):
            set_return_wait(wait_ms)
            spec = CellSpec(url, concurrency, per_request, args.warmup, args.seconds, args.topk, next_fresh,
                            repeat_floor, args.repeat_fraction, args.seed + number // len(return_waits(args)),
                            args.client_lib,
                            os.getpid(), client_cpus=args.client_cpus)
            raw = executor.submit(run_cell, spec).result(timeout=args.warmup + args.seconds + 180)
            next_fresh = raw["next_fresh"]
            row = summarize_cell(concurrency, per_request, raw, args.client_mode)
            row["raw_limit_fraction"] = row["queries_per_s"] / raw_limit
            row["encoded_raw_fraction"] = row["encoded_per_s"] / raw_limit
            row["return_wait_ms"] = wait_ms
            rows.append(row)
            print(f"  concurrency {concurrency:3d} x {per_request} queries, return wait {wait_ms:g} ms: "
                  f"{row['queries_per_s']:7.0f} queries/s ({100 * row['raw_limit_fraction']:.0f}% of raw), "
                  f"p99 {row['p99_ms']:.0f} ms, {row['errors']} errors", flush=True)
    return rows, next_fresh


def measure_large_request(args: argparse.Namespace, url: str, retriever, stream: QueryStream) -> dict:
    """``--large-request`` fresh queries in one request, ``--large-repeats`` times, against the raw
    encoder + search cost of the same number of fresh queries in one batch, measured just before."""
    size, repeats = args.large_request, args.large_repeats
    raw = sorted(sum(_raw_search(retriever, stream.fresh(size), args.topk)) for _ in range(repeats))
    batches = [stream.fresh(size) for _ in range(repeats)]
    with make_executor(args) as executor:
        served = executor.submit(run_large_requests, url, batches, args.topk, args.client_cpus).result(
            timeout=repeats * 150)
    latency = sorted(served["latencies"])
    median_raw, median_latency = raw[len(raw) // 2], latency[len(latency) // 2]
    print(f"  one {size}-query request: {median_latency:.2f} s (raw encode + search {median_raw:.2f} s, "
          f"above raw {median_latency - median_raw:+.2f} s), {len(served['errors'])} errors", flush=True)
    return {"queries": size, "repeats": repeats, "latency_s": latency, "raw_s": raw,
            "median_latency_s": median_latency, "median_raw_s": median_raw,
            "above_raw_s": median_latency - median_raw, "errors": len(served["errors"]),
            "error_samples": served["errors"][:5]}


def minimal_app(service):
    """The least a Flask route can do with the same encoder and index: parse, encode, search, look up the
    documents, dump JSON; no batcher, cache, metrics or limits, one worker thread. The floor a lone client's request is judged
    against (``--lone-floor``)."""
    from flask import Flask, Response, request

    retriever = service.batcher.retriever
    if not hasattr(retriever, "encoder"):
        raise SystemExit("--lone-floor needs a dense index (an encoder and a vector searcher)")
    app = Flask("minimal_retriever")

    @app.post("/retrieve")
    def retrieve():
        body = json.loads(request.get_data())
        vectors = retriever.encoder.encode_queries(body["queries"])
        _, positions = retriever.searcher.search(vectors, body["topk"])
        result = [service.corpus.documents([int(p) for p in row if p >= 0]) for row in positions]
        return Response(json.dumps({"result": result}), mimetype="application/json")

    return app


def measure_lone_floor(args: argparse.Namespace, service, stream: QueryStream) -> dict:
    """One client of one query against :func:`minimal_app` on the same CPUs, with the same client."""
    from retriever_server.http_server import ServingLimits, WaitressServer

    # one worker thread: torch always runs on the same thread, and nothing else is there to hand off to
    server = WaitressServer(minimal_app(service), host="127.0.0.1", port=0, limits=ServingLimits(threads=1))
    server.start_in_thread()
    try:
        spec = CellSpec(server.url, 1, 1, args.warmup, args.seconds, args.topk, stream.next_fresh, 0, 0.0,
                        args.seed, args.client_lib, os.getpid(), client_cpus=args.client_cpus)
        with make_executor(args) as executor:
            raw = executor.submit(run_cell, spec).result(timeout=args.warmup + args.seconds + 180)
    finally:
        server.stop()
    stream.next_fresh = raw["next_fresh"]
    floor = {"requests": len(raw["latencies"]), "errors": raw["errors"],
             "p50_ms": 1000 * percentile(raw["latencies"], 50), "p99_ms": 1000 * percentile(raw["latencies"], 99)}
    print(f"  minimal Flask route, one client of one query: p50 {floor['p50_ms']:.1f} ms", flush=True)
    return floor


def measure_fp32_raw_limit(service, stream: QueryStream, args: argparse.Namespace) -> dict | None:
    """With another encoder backend, the raw limit of the fp32 reference on the same index, in the same run
    (the ratio the backend is judged by); None when the service runs the reference itself."""
    from types import SimpleNamespace

    from retriever_server.encoders import TextEncoder

    retriever = service.batcher.retriever
    backend = getattr(getattr(retriever, "encoder", None), "backend", "torch")
    if backend == "torch":
        return None
    print(f"measuring the raw limit of the fp32 reference (the service runs {backend}) ...", flush=True)
    reference = TextEncoder(retriever.encoder.spec, device="cpu", batch_size=args.encoder_batch_size)
    raw = measure_raw_limit(SimpleNamespace(encoder=reference, searcher=retriever.searcher), stream,
                            args.raw_batches, args.raw_seconds, args.topk)
    print_raw(raw)
    return raw


def benchmark(args: argparse.Namespace, index_dir: Path) -> dict:
    """Load the service, measure the raw limit, serve over HTTP and run every cell."""
    from retriever_server.app import create_app
    from retriever_server.http_server import ServingLimits, WaitressServer
    from retriever_server.service import LoadOptions, RetrievalService

    options = LoadOptions(omp_threads=args.omp_threads, torch_threads=args.torch_threads,
                         encoder_batch_size=args.encoder_batch_size, encoder_backend=args.encoder_backend)
    batching = BatchingConfig(max_batch_queries=args.max_batch_queries, max_wait_ms=args.max_wait_ms,
                              max_return_wait_ms=args.max_return_wait_ms, trim_heap=not args.no_trim_heap)
    pin(args.server_cpus)  # before loading: the service sizes its thread pools from its affinity
    service = RetrievalService(index_dir, options, batching)
    service.load()
    server = None
    try:
        stream = QueryStream(0, 0, 0.0, args.seed)
        print("measuring the raw encoder + search limit ...", flush=True)
        raw = measure_raw_limit(service.batcher.retriever, stream, args.raw_batches, args.raw_seconds,
                                args.topk)
        print_raw(raw)
        fp32 = measure_fp32_raw_limit(service, stream, args)
        server = WaitressServer(create_app(service), host="127.0.0.1", port=0,
                                limits=ServingLimits(threads=args.http_threads))
        server.start_in_thread()
        print(f"serving on {server.url}; {len(cell_plan(args))} cells of "
              f"{args.warmup:g} s warm-up + {args.seconds:g} s", flush=True)
        def set_return_wait(wait_ms: float) -> None:
            service.batcher.config = dataclasses.replace(service.batcher.config, max_return_wait_ms=wait_ms)

        rows, stream.next_fresh = run_cells(args, server.url, raw["best_queries_per_s"], stream.next_fresh,
                                            set_return_wait)
        large = measure_large_request(args, server.url, service.batcher.retriever, stream) \
            if args.large_request else None
        floor = measure_lone_floor(args, service, stream) if args.lone_floor else None
        return {"index": describe_index(service), "threads": service.threads, "raw_limit": raw,
                "fp32_raw_limit": fp32, "cells": rows, "large_request": large, "lone_floor": floor,
                "repeat_fraction": args.repeat_fraction}
    finally:
        if server is not None:
            server.stop()
        service.close()


# ---------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------

def describe_machine(args: argparse.Namespace) -> dict:
    import faiss
    import torch

    cores = os.cpu_count() or 1
    usable = cores
    if hasattr(os, "sched_getaffinity"):  # before any pinning: the benchmark's own process may have moved
        usable = len(os.sched_getaffinity(0) | set(args.server_cpus) | set(args.client_cpus))
    return {"cpu": cpu_model(), "cores": cores, "usable_cores": usable, "ram_gib": _ram_gib(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "faiss": faiss.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "client_mode": args.client_mode, "client_lib": args.client_lib}


def _ram_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return float("nan")


def describe_index(service) -> dict:
    manifest = service.manifest
    return {"dir": str(service.index_dir), "passages": len(service.corpus), "kind": manifest.kind,
            "index_type": manifest.index["type"],
            "encoder": (manifest.encoder or {}).get("spec", {}).get("name"),
            "backend": service.batcher.retriever.description}


def print_raw(raw: dict) -> None:
    for size, row in raw["per_batch"].items():
        print(f"  batch {size:>4}: {row['queries_per_s']:7.0f} queries/s "
              f"(encode {row['encode_ms_per_batch']:.1f} ms + search {row['search_ms_per_batch']:.1f} ms "
              f"per batch, {row['batches']} batches; other processes {row['other_cpu_cores']:.2f} cores)")


def print_header(machine: dict, results: dict, args: argparse.Namespace) -> None:
    index, raw = results["index"], results["raw_limit"]
    print("\n## Retriever server throughput\n")
    print(f"- machine: {machine['cpu']}, {machine['cores']} cores ({machine['usable_cores']} usable), "
          f"{machine['ram_gib']} GiB RAM; python {machine['python']}, torch {machine['torch']} "
          f"({machine['torch_threads']} threads), faiss {machine['faiss']}; {machine['platform']}; "
          f"{machine['date']}")
    client = f"load generator: {args.client_lib} in a separate process" if args.client_mode == "process" \
        else f"load generator: {args.client_lib} threads inside the server process (shares its GIL)"
    if args.server_cpus:
        where = f"pinned to CPUs {list(args.client_cpus) or 'any'}; server pinned to CPUs {list(args.server_cpus)}"
        print(f"- {client}, {where}; server threads: {results['threads']}")
    else:
        print(f"- {client}; it shares the {machine['usable_cores']} cores with the server, so the server "
              "numbers are a lower bound on a machine where the client runs elsewhere")
    print(f"- index: {index['passages']} passages, {index['kind']} {index['index_type']}, encoder "
          f"{index['encoder']}, backend {index['backend']}")
    print(f"- server: max_wait_ms={args.max_wait_ms:g}, max_return_wait_ms={args.max_return_wait_ms:g}, "
          f"max_batch_queries={args.max_batch_queries}, "
          f"http threads={args.http_threads}, omp_threads={args.omp_threads or 'usable CPUs'}, "
          f"torch_threads={args.torch_threads or 'usable CPUs'}, encoder batch={args.encoder_batch_size}, "
          f"topk={args.topk}, repeat fraction={args.repeat_fraction:g}")
    print(f"- raw batched encoder+search limit: {raw['best_queries_per_s']:.0f} queries/s "
          f"(best of batches {', '.join(raw['per_batch'])}: batch {raw['best_batch']})")
    fp32 = results.get("fp32_raw_limit")
    if fp32:
        print(f"- the fp32 reference's raw limit, same run: {fp32['best_queries_per_s']:.0f} queries/s; the "
              f"backend's is {raw['best_queries_per_s'] / fp32['best_queries_per_s']:.2f}x")
    print()


def print_large(large: dict | None) -> None:
    if large is None:
        return
    print(f"\nOne {large['queries']}-query request (median of {large['repeats']}): "
          f"{large['median_latency_s']:.2f} s end to end; the raw encode + search of {large['queries']} fresh "
          f"queries in one batch: {large['median_raw_s']:.2f} s; above raw: {large['above_raw_s']:+.2f} s; "
          f"{large['errors']} errors.")


def print_lone_floor(results: dict) -> None:
    """A lone client's p50 with this server and with the minimal route, next to the raw one-query time."""
    floor = results["lone_floor"]
    ours = [row for row in results["cells"] if row["concurrency"] == 1 and row["queries_per_request"] == 1]
    if not floor or not ours:
        return
    one = results["raw_limit"]["per_batch"].get("1")
    raw_ms = one["encode_ms_per_batch"] + one["search_ms_per_batch"] if one else float("nan")
    servers = ", ".join(f"{row['p50_ms']:.1f} ms (return wait {row['return_wait_ms']:g} ms)" for row in ours)
    print(f"\nOne client of one query, p50: this server {servers}; a minimal Flask route around the same encoder "
          f"and index {floor['p50_ms']:.1f} ms; the raw encode + search {raw_ms:.1f} ms (mean). Server minus minimal "
          f"route {ours[0]['p50_ms'] - floor['p50_ms']:+.1f} ms, minimal route minus raw {floor['p50_ms'] - raw_ms:+.1f} ms"
          + ("" if not results["repeat_fraction"] else " (unfair to the minimal route, which has no embedding "
             "cache: compare with --repeat-fraction 0)"))


def queue_ms_avg(metrics: dict[str, float]) -> float:
    """Mean milliseconds a request waited for its batch, from the ``/metrics`` deltas."""
    return 1000 * metrics.get("ragr1_retriever_queue_seconds_sum", 0.0) \
        / max(1.0, metrics.get("ragr1_retriever_queue_seconds_count", 0.0))


def request_time_breakdown(metrics: dict[str, float], latencies: list[float]) -> dict[str, float]:
    """Where a request's time went, in mean milliseconds per request, from the server's ``/metrics`` deltas
    and the client's latencies: ``queue`` (waiting for its batch), ``encode`` and ``search`` (per batch: with
    one client a batch is one request), ``finish`` (the rest of the Flask handler: the hand-offs between
    threads, the document lookup and the JSON body) and ``http`` (what the client saw beyond the handler:
    waitress, the sockets and the client itself)."""
    requests_seen = metrics.get(RETRIEVE_SECONDS.format("count"), 0.0)
    batches = metrics.get("ragr1_retriever_batch_queries_count", 0.0)
    if not requests_seen or not batches or not latencies:
        return {}
    handler = 1000 * metrics.get(RETRIEVE_SECONDS.format("sum"), 0.0) / requests_seen
    queue_ms = queue_ms_avg(metrics)
    encode = 1000 * metrics.get("ragr1_retriever_encode_seconds_sum", 0.0) / batches
    search = 1000 * metrics.get("ragr1_retriever_search_seconds_sum", 0.0) / batches
    client = 1000 * sum(latencies) / len(latencies)
    return {"client": client, "handler": handler, "queue": queue_ms, "encode": encode, "search": search,
            "finish": handler - queue_ms - encode - search, "http": client - handler}


def print_breakdown(rows: list[dict]) -> None:
    """The time of a lone client's request, part by part (the cells of concurrency 1)."""
    for row in rows:
        parts = row.get("time_ms")
        if row["concurrency"] != 1 or not parts:
            continue
        print(f"\nOne client, {row['queries_per_request']} q/request (return wait {row['return_wait_ms']:g} ms), "
              f"mean {parts['client']:.2f} ms a request: "
              + ", ".join(f"{name} {parts[name]:.2f}" for name in ("queue", "encode", "search", "finish", "http"))
              + " ms (finish = the rest of the handler: thread hand-offs, document lookup, JSON; http = beyond "
              "the handler: waitress, sockets, the client)")


def print_table(rows: list[dict]) -> None:
    head = ["conc", "q/req", "return wait ms", "req/s", "q/s", "% raw", "p50 ms", "p99 ms", "errors", "avg batch",
            "cache hit", "encoded q/s", "batcher busy", "server CPU", "client CPU", "other CPU"]
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---:" for _ in head) + "|")
    for r in rows:
        client_cpu = "-" if r["client_cpu_cores"] is None else f"{r['client_cpu_cores']:.2f}"
        cells = [r["concurrency"], r["queries_per_request"], f"{r['return_wait_ms']:g}",
                 f"{r['requests_per_s']:.0f}",
                 f"{r['queries_per_s']:.0f}", f"{100 * r['raw_limit_fraction']:.0f}%", f"{r['p50_ms']:.1f}",
                 f"{r['p99_ms']:.1f}", r["errors"],
                 f"{r['avg_batch_queries']:.1f}", f"{100 * r['cache_hit_rate']:.0f}%",
                 f"{r['encoded_per_s']:.0f} ({100 * r['encoded_raw_fraction']:.0f}%)",
                 f"{100 * r['batcher_busy']:.0f}%", f"{r['server_cpu_cores']:.2f}", client_cpu,
                 f"{r['other_cpu_cores']:.2f}"]
        print("| " + " | ".join(str(c) for c in cells) + " |")
    print("\nq/s = queries/s answered; % raw = q/s / raw limit (can pass 100%: the raw limit encodes every "
          "query, the server takes repeats from its cache); avg batch = distinct queries per batch; "
          "encoded q/s = cache misses/s, i.e. queries the encoder ran (% of the raw limit); batcher busy = "
          "encode+search seconds / wall seconds; CPU in cores (1.00 = one core busy); other CPU = what other "
          "processes on the machine took meanwhile (should be ~0).")
    noisy = max((r["other_cpu_cores"] for r in rows), default=0.0)
    if noisy > 0.15:
        print(f"\nWARNING: other processes used up to {noisy:.2f} cores during the run; the numbers are "
              "unreliable, rerun on a quiet machine.")


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------

def default_client_lib() -> str:
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        return "requests"
    return "aiohttp"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    data = parser.add_argument_group("index")
    data.add_argument("--passages", type=int, default=100_000, help="synthetic corpus size")
    data.add_argument("--index-type", default="Flat", help="faiss index-factory string for the built index")
    data.add_argument("--encoder", default="minilm", help="encoder for the built index")
    data.add_argument("--workdir", default="/tmp/ragr1-bench", help="where the built index is cached")
    data.add_argument("--index", help="serve this existing index folder instead of building one")
    load = parser.add_argument_group("load")
    load.add_argument("--concurrency", type=int_list, default="1,8,32,64",
                      help="concurrent clients per cell")
    load.add_argument("--queries-per-request", type=int_list, default="1,3", help="queries in each request")
    load.add_argument("--repeat-fraction", type=float, default=0.3,
                      help="share of queries repeating earlier ones")
    load.add_argument("--seconds", type=float, default=8.0, help="measured seconds per cell")
    load.add_argument("--warmup", type=float, default=1.5, help="unmeasured seconds before each cell")
    load.add_argument("--topk", type=int, default=3, help="passages per query")
    load.add_argument("--client-mode", choices=("process", "thread"), default="process",
                      help="run the load generator in a child process or in threads of the server process")
    load.add_argument("--client-lib", choices=("aiohttp", "requests"), default=default_client_lib(),
                      help="HTTP client of the load generator")
    load.add_argument("--raw-batches", type=int_list, default="1,3,8,16,32,64,128,256",
                      help="batch sizes for the raw limit")
    load.add_argument("--raw-seconds", type=float, default=3.0, help="seconds per raw batch size")
    load.add_argument("--seed", type=int, default=1234, help="seed of the query stream")
    load.add_argument("--large-request", type=int, default=512,
                      help="after the cells, time one request of this many fresh queries (0: skip)")
    load.add_argument("--large-repeats", type=int, default=3, help="how many such requests (median reported)")
    load.add_argument("--lone-floor", action="store_true",
                      help="also time one client of one query against a minimal Flask route around the same "
                           "encoder and index (no batcher, cache, metrics or limits)")
    pinning = parser.add_argument_group("pinning (Linux)")
    pinning.add_argument("--pinned", action="store_true",
                         help="server on the first CPU this process may use, load generator on the second")
    pinning.add_argument("--server-cpus", type=cpu_list, default=(), help="pin the server to these CPUs")
    pinning.add_argument("--client-cpus", type=cpu_list, default=(),
                         help="pin the load generator to these CPUs")
    server = parser.add_argument_group("server (BatchingConfig / LoadOptions)")
    server.add_argument("--max-wait-ms", type=float, default=BatchingConfig.max_wait_ms,
                        help="batcher wait for more requests")
    server.add_argument("--max-return-wait-ms", type=float, default=BatchingConfig.max_return_wait_ms,
                        help="batcher wait for answered clients to send again (0: never)")
    server.add_argument("--return-wait-ab", action="store_true",
                        help="run each cell twice in a row: return wait off, then --max-return-wait-ms")
    server.add_argument("--max-batch-queries", type=int, default=BatchingConfig.max_batch_queries,
                        help="most queries in one batch")
    server.add_argument("--http-threads", type=int, default=128, help="waitress worker threads")
    server.add_argument("--omp-threads", type=int, default=0,
                        help="faiss OpenMP threads (0: the CPUs the server may use)")
    server.add_argument("--torch-threads", type=int, default=0,
                        help="torch intra-op threads (0: the CPUs the server may use)")
    server.add_argument("--encoder-batch-size", type=int, default=128, help="encoder forward-pass batch")
    server.add_argument("--encoder-backend", default="torch",
                        help="the server's encoder backend (torch, torch-bf16, torch-int8, onnx, onnx-int8, auto); "
                             "another than torch also measures the fp32 reference's raw limit")
    server.add_argument("--no-trim-heap", action="store_true", help="no malloc_trim between batches")
    parser.add_argument("--json", type=Path, help="also write the results here as JSON")
    args = parser.parse_args(argv)
    if not 0.0 <= args.repeat_fraction < 1.0:
        parser.error("--repeat-fraction must be in [0, 1)")
    if args.pinned:
        usable = sorted(os.sched_getaffinity(0))
        if len(usable) < 2:
            parser.error(f"--pinned needs two CPUs; this process may use {usable}")
        args.server_cpus, args.client_cpus = args.server_cpus or (usable[0],), args.client_cpus or (usable[1],)
    if set(args.server_cpus) & set(args.client_cpus):
        parser.error("--server-cpus and --client-cpus overlap")
    return args


def cpu_list(text: str) -> tuple[int, ...]:
    try:
        cpus = tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError:
        cpus = ()
    if not cpus or min(cpus) < 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated CPU numbers, got {text!r}")
    return cpus


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    results = benchmark(args, ensure_index(args))
    machine = describe_machine(args)
    print_header(machine, results, args)
    print_table(results["cells"])
    print_breakdown(results["cells"])
    print_large(results["large_request"])
    print_lone_floor(results)
    errors = sum(row["errors"] for row in results["cells"]) + (results["large_request"] or {}).get("errors", 0) \
        + (results["lone_floor"] or {}).get("errors", 0)
    print(f"\n{errors} failed requests; total run time {time.perf_counter() - started:.0f} s")
    if args.json:
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        args.json.write_text(json.dumps({"machine": machine, "settings": settings, **results}, indent=2))
        print(f"results written to {args.json}")
    for row in results["cells"]:
        for sample in row["error_samples"]:
            print(f"error (concurrency {row['concurrency']}, {row['queries_per_request']} q/req): {sample}",
                  file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
