"""Per-turn overhead of ``RagR1AgentLoop.run()``, without generation and retrieval time.

What it measures
----------------
The time the agent loop itself spends per generation round: decoding the generated tokens, parsing the
action, splitting the queries, laying out the ``<information>`` block, tokenizing it once (with the
per-query budget check), and the bookkeeping around it. Per trajectory::

    overhead per turn = (wall time of run() - time inside generate() - time inside retrieval) / rounds

The generation and retrieval times are the loop's own ``AgentLoopOutput.metrics`` (``generate_sequences``
and ``tool_calls``, the latter equal to ``extra_fields["ragr1/retrieval_ms"]``). The initial prompt
(verl's ``ct_build_initial_tokens``: chat template + tokenization, in verl's thread pool) is part of run()
and so of the overhead; it is also reported on its own, and the overhead without it. The issue's target is
<= 2 ms per turn.

Setup
-----
- The loop is configured by verl's real ``ppo_trainer`` config (``tests.ragr1_verl.rollout``) with the
  tiny offline Qwen2 tokenizer of ``tests.ragr1_verl.fakes`` (``--model-dir`` uses another local HF folder,
  e.g. a real Qwen2.5 tokenizer, instead). An ``AgentLoopWorker`` is built once, inside the running event
  loop, for the tokenizer and the registry; every trajectory then gets its own loop instance made as
  ``AgentLoopWorker._run_agent_loop`` makes it (``hydra.utils.instantiate``), and only ``run()`` is timed
  (the instantiation time is reported apart).
- The LLM is a fake with pre-tokenized turns: ``<think>`` of about 60 (Qwen) tokens, then
  ``<search> q1, q2, q3 </search>`` twice, then ``<answer>``: 3 rounds, 2 searches of 3 distinct queries.
  It sleeps ``--llm-latency-ms`` per call (subtracted with the rest of generate()) so that concurrent
  trajectories interleave as they do against a real server.
- The retriever is a small deterministic ``/retrieve`` server on 127.0.0.1, in a child process by default
  (so its threads do not take the GIL from the loop), answering ``topk`` passages of about 100 words per
  query. The real ``RetrievalClient`` talks to it over HTTP (coalescing, aiohttp); the round trip, which
  includes the client's ``coalesce_window_ms``, is subtracted but reported per search.
- Each concurrency level (``--concurrency``, default 1, 16, 64 trajectories in flight) runs
  ``--trajectories`` trajectories ``--repeats`` times after one unmeasured warm-up pass.

A breakdown of the loop's own time (decode, action parsing, observation layout, observation tokenization,
prompt build) comes from one extra instrumented pass at concurrency 1; ``--profile``
adds a cProfile run of the concurrency-1 case and prints the 15 functions with the most cumulative time
(the event loop's own frames left out).

Caveat: the tiny test tokenizer (``build_tiny_qwen2``, at most 600 tokens; a few hundred are learnt) makes
about four times more tokens from the same text than Qwen's tokenizer does (~1.3 tokens per English word);
observations then exceed ``max_obs_tokens_per_query`` and get truncated where Qwen's would not, and
token-proportional costs are overstated. ``--tokenizer dense`` trains, offline, a byte-level BPE of the same
shape on the benchmark's own vocabulary instead, so that words become 1-2 tokens as with Qwen's;
``--model-dir`` uses a real local tokenizer.

Run ``python benchmarks/bench_agent_loop.py`` from the repository root; with the defaults it takes about
half a minute on a 2-core machine. ``--json PATH`` writes the results as JSON. It talks only to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import datetime
import json
import logging
import multiprocessing
import os
import platform
import pstats
import statistics
import sys
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

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

TARGET_MS_PER_TURN = 2.0

# ---------------------------------------------------------------------------------------------------------
# Deterministic text: questions, think text, queries and ~100-word passages
# ---------------------------------------------------------------------------------------------------------

WORDS = (
    "ancient", "harbour", "council", "granite", "festival", "merchant", "river", "northern", "library",
    "railway", "founded", "century", "painter", "island", "village", "treaty", "cathedral", "engineer",
    "valley", "museum", "winter", "copper", "market", "empire", "garden", "bridge", "scholar", "mountain",
    "province", "orchestra", "lighthouse", "dynasty", "glacier", "monastery", "printing", "vineyard",
    "observatory", "canal", "fortress", "parliament", "textile", "harvest", "pilgrim", "silver", "charter",
    "expedition", "telescope", "republic", "mill", "estuary", "theatre", "archive", "colony", "mineral",
    "senate", "frontier", "chapel", "bishop", "festival", "shipyard", "quarry", "forest", "meadow", "tower",
    "the", "of", "and", "in", "was", "by", "with", "for", "to", "from", "its", "after", "during", "which",
    "is", "as", "on", "at", "an", "first", "later", "known", "built", "named", "became", "largest", "oldest",
)
SUBJECTS = ("observatory", "lighthouse", "textile mill", "botanical garden", "clock tower", "railway station",
            "river port", "abbey", "printing house", "glassworks", "salt mine", "opera house", "stone bridge",
            "windmill", "shipyard", "university")
PLACES = ("Ashbrook", "Belmere", "Corwick", "Dunhaven", "Elmstead", "Fenford", "Glenwick", "Halmere")
ASPECTS = ("founding year", "founder", "architect", "height", "first director", "current owner")


def _words(seed: str, count: int) -> str:
    """``count`` words drawn deterministically from :data:`WORDS` (a linear congruential stream)."""
    state = zlib.crc32(seed.encode())
    picked = []
    for _ in range(count):
        state = (state * 1_103_515_245 + 12_345) & 0x7FFFFFFF
        picked.append(WORDS[(state >> 8) % len(WORDS)])
    return " ".join(picked)


def make_passage(query: str, rank: int, words: int) -> dict:
    """A Search-R1 style document: a quoted title line, then about ``words`` words of text."""
    title = f"{query.title()} ({rank})"
    text = _words(f"{query}#{rank}", words).capitalize() + "."
    return {"id": f"{zlib.crc32(query.encode()):08x}-{rank}", "contents": f'"{title}"\n{text}'}


def question(number: int) -> str:
    subject, place = SUBJECTS[number % len(SUBJECTS)], PLACES[(number // len(SUBJECTS)) % len(PLACES)]
    return f"Who was the first director of the {subject} in {place}, case {number}"


def search_queries(trajectory: int, round_number: int, count: int = 3) -> list[str]:
    """Distinct queries per (trajectory, round), so the client's coalescing cannot deduplicate them."""
    queries = []
    for slot in range(count):
        n = trajectory * 7 + round_number * 3 + slot
        queries.append(f"{ASPECTS[n % len(ASPECTS)]} of the {SUBJECTS[n % len(SUBJECTS)]} in "
                       f"{PLACES[n % len(PLACES)]} {trajectory}-{round_number}")
    return queries


def script_turns(trajectory: int, think_words: int, searches: int = 2) -> list[str]:
    """The model's turns of one trajectory: ``searches`` searches of 3 queries, then an answer."""
    turns = []
    for round_number in range(searches):
        think = _words(f"think {trajectory} {round_number}", think_words)
        queries = ", ".join(search_queries(trajectory, round_number))
        turns.append(f"<think> {think} </think>\n<search> {queries} </search>")
    think = _words(f"think {trajectory} answer", think_words)
    turns.append(f"<think> {think} </think>\n<answer> Agnes Brandt </answer>")
    return turns


# ---------------------------------------------------------------------------------------------------------
# The loopback retriever (child process or thread; imports nothing heavy)
# ---------------------------------------------------------------------------------------------------------

def _make_server(passage_words: int) -> ThreadingHTTPServer:
    cache: dict[tuple[str, int], list[dict]] = {}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as aiohttp expects from a real server

        def do_POST(self):  # noqa: N802 (the http.server API)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            topk = int(body.get("topk", 3))
            result = []
            for query in body["queries"]:
                docs = cache.get((query, topk))
                if docs is None:
                    docs = cache[(query, topk)] = [make_passage(query, rank, passage_words)
                                                   for rank in range(1, topk + 1)]
                result.append(docs)
            data = json.dumps({"result": result}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    return server


def serve_in_child(passage_words: int, port_out, stop_event) -> None:
    """Child-process entry point: serve until ``stop_event`` is set, after sending the port."""
    server = _make_server(passage_words)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port_out.send(server.server_address[1])
    stop_event.wait()
    server.shutdown()
    server.server_close()


class LoopbackRetriever:
    """The deterministic ``/retrieve`` server, in a spawned child process or in a thread of this one."""

    def __init__(self, passage_words: int, mode: str):
        self.passage_words, self.mode = passage_words, mode
        self.port = 0
        self._process = self._stop = self._server = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/retrieve"

    @property
    def pid(self) -> int | None:
        """The child process serving, or None when it runs in a thread of this process."""
        return self._process.pid if self._process is not None else None

    def __enter__(self) -> LoopbackRetriever:
        if self.mode == "thread":
            self._server = _make_server(self.passage_words)
            threading.Thread(target=self._server.serve_forever, daemon=True).start()
            self.port = self._server.server_address[1]
            return self
        context = multiprocessing.get_context("spawn")
        receive, send = context.Pipe(duplex=False)
        self._stop = context.Event()
        self._process = context.Process(target=serve_in_child, args=(self.passage_words, send, self._stop),
                                        daemon=True)
        self._process.start()
        if not receive.poll(60):
            raise RuntimeError("the retriever child process did not start")
        self.port = receive.recv()
        return self

    def __exit__(self, *exc_info) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._process is not None:
            self._stop.set()
            self._process.join(10)
            if self._process.is_alive():
                self._process.terminate()


# ---------------------------------------------------------------------------------------------------------
# The fake LLM: one per trajectory, turns tokenized beforehand
# ---------------------------------------------------------------------------------------------------------

class FakeLLM:
    """Stands in for verl's ``LLMServerClient``: returns the next pre-tokenized turn after ``latency_s``."""

    def __init__(self, turns: list[list[int]], latency_s: float):
        self.turns, self.latency_s = turns, latency_s
        self.calls = 0
        self.busy_s = 0.0

    async def generate(self, request_id: str, *, prompt_ids: list[int], sampling_params: dict[str, Any],
                       **kwargs: Any):
        from verl.workers.rollout.replica import TokenOutput

        started = time.perf_counter()
        if self.latency_s > 0:
            await asyncio.sleep(self.latency_s)
        ids = self.turns[self.calls] if self.calls < len(self.turns) else []
        self.calls += 1
        ids = ids[:sampling_params.get("max_tokens", len(ids))]
        output = TokenOutput(token_ids=ids, log_probs=[-0.5] * len(ids), stop_reason="completed")
        self.busy_s += time.perf_counter() - started
        return output


# ---------------------------------------------------------------------------------------------------------
# Running trajectories
# ---------------------------------------------------------------------------------------------------------

@dataclass
class TrajectoryTiming:
    wall_s: float
    generation_s: float
    retrieval_s: float
    prompt_s: float
    init_s: float
    rounds: int
    searches: int
    answered: bool
    invalid_actions: int
    truncated: bool
    response_tokens: int
    observation_tokens: int
    llm_busy_s: float

    @property
    def overhead_s(self) -> float:
        return self.wall_s - self.generation_s - self.retrieval_s


@dataclass
class Harness:
    """What every trajectory needs: the worker's pieces, the config and the pre-tokenized scripts."""

    worker: Any
    config: Any
    scripts: list[list[list[int]]]
    latency_s: float
    sampling_params: dict[str, Any] = field(default_factory=dict)
    profiler: cProfile.Profile | None = None  # when set, enabled around each run() (concurrency 1 only)

    def make_loop(self, llm: FakeLLM):
        import hydra
        from verl.experimental.agent_loop.agent_loop import DictConfigWrap, ToolListWrap, _agent_loop_registry

        return hydra.utils.instantiate(
            config=_agent_loop_registry["ragr1_agent"],
            trainer_config=DictConfigWrap(config=self.config),
            server_manager=llm,
            tokenizer=self.worker.tokenizer,
            processor=self.worker.processor,
            hf_model_type=self.worker.hf_model_type,
            dataset_cls=self.worker.dataset_cls,
            data_config=DictConfigWrap(self.config.data),
            tools=ToolListWrap(self.worker.tools),
        )

    async def trajectory(self, number: int) -> TrajectoryTiming:
        llm = FakeLLM(self.scripts[number % len(self.scripts)], self.latency_s)
        started = time.perf_counter()
        loop = self.make_loop(llm)
        init_s = time.perf_counter() - started
        prompt_clock = _time_prompt_build(loop)
        q = question(number)
        kwargs = {"raw_prompt": [{"role": "user", "content": q}], "extra_info": {"question": q},
                  "index": number, "data_source": "bench"}
        if self.profiler is not None:
            self.profiler.enable()
        started = time.perf_counter()
        try:
            output = await loop.run(dict(self.sampling_params), **kwargs)
        finally:
            wall_s = time.perf_counter() - started
            if self.profiler is not None:
                self.profiler.disable()
        extra = output.extra_fields
        return TrajectoryTiming(
            wall_s=wall_s, generation_s=output.metrics.generate_sequences,
            retrieval_s=output.metrics.tool_calls,
            prompt_s=prompt_clock[0], init_s=init_s, rounds=int(extra["ragr1/turns"]),
            searches=int(extra["ragr1/searches"]), answered=bool(extra["ragr1/answered"]),
            invalid_actions=int(extra["ragr1/invalid_actions"]), truncated=bool(extra["ragr1/truncated"]),
            response_tokens=len(output.response_ids), observation_tokens=output.response_mask.count(0),
            llm_busy_s=llm.busy_s)

    async def batch(self, count: int, concurrency: int, first: int = 0) -> list[TrajectoryTiming]:
        """``count`` trajectories with at most ``concurrency`` running at once."""
        gate = asyncio.Semaphore(concurrency)

        async def one(number: int) -> TrajectoryTiming:
            async with gate:
                return await self.trajectory(number)

        return list(await asyncio.gather(*(one(first + n) for n in range(count))))


def _time_prompt_build(loop) -> list[float]:
    """Wrap the instance's ``ct_build_initial_tokens`` (verl's prompt build) to time it.

    Returns a one-element list that holds the seconds spent in it once run() has returned.
    """
    clock = [0.0]
    original = loop.ct_build_initial_tokens

    async def timed(*args, **kwargs):
        started = time.perf_counter()
        try:
            return await original(*args, **kwargs)
        finally:
            clock[0] += time.perf_counter() - started

    loop.ct_build_initial_tokens = timed
    return clock


def summarize(concurrency: int, timings: list[TrajectoryTiming], elapsed_s: float) -> dict:
    rounds = sum(t.rounds for t in timings)
    searches = sum(t.searches for t in timings)
    per_turn = [1000 * t.overhead_s / t.rounds for t in timings if t.rounds]
    per_turn_no_prompt = [1000 * (t.overhead_s - t.prompt_s) / t.rounds for t in timings if t.rounds]
    per_search = [1000 * t.retrieval_s / t.searches for t in timings if t.searches]
    return {
        "concurrency": concurrency,
        "trajectories": len(timings),
        "turns": rounds,
        "searches": searches,
        "overhead_ms_per_turn": 1000 * sum(t.overhead_s for t in timings) / rounds,
        "overhead_ms_per_turn_mean": statistics.fmean(per_turn),
        "overhead_ms_per_turn_p50": percentile(per_turn, 50),
        "overhead_ms_per_turn_p95": percentile(per_turn, 95),
        "overhead_no_prompt_ms_per_turn_mean": statistics.fmean(per_turn_no_prompt),
        "overhead_no_prompt_ms_per_turn_p95": percentile(per_turn_no_prompt, 95),
        "prompt_build_ms_mean": 1000 * statistics.fmean(t.prompt_s for t in timings),
        "init_ms_mean": 1000 * statistics.fmean(t.init_s for t in timings),
        "retrieval_ms_per_search_mean": statistics.fmean(per_search) if per_search else 0.0,
        "retrieval_ms_per_search_p95": percentile(per_search, 95) if per_search else 0.0,
        "generation_ms_per_turn_mean": 1000 * sum(t.generation_s for t in timings) / rounds,
        "llm_busy_ms_per_turn_mean": 1000 * sum(t.llm_busy_s for t in timings) / rounds,
        "response_tokens_mean": statistics.fmean(t.response_tokens for t in timings),
        "observation_tokens_per_search": sum(t.observation_tokens for t in timings) / max(1, searches),
        "not_answered": sum(not t.answered for t in timings),
        "invalid_actions": sum(t.invalid_actions for t in timings),
        "truncated": sum(t.truncated for t in timings),
        "trajectories_per_s": len(timings) / elapsed_s,
    }


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile, linear interpolation between the closest ranks."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


# ---------------------------------------------------------------------------------------------------------
# Breakdown (instrumented pass) and profile
# ---------------------------------------------------------------------------------------------------------

BREAKDOWN_PARTS = ("decode generated tokens", "parse action + split queries",
                   "lay out observation (text + unit ranges)",
                   "tokenize observation + per-query budget check",
                   "other encodes (reminders, failures)")


async def breakdown(harness: Harness, count: int) -> dict:
    """One pass at concurrency 1 with the loop's steps wrapped in timers: milliseconds per turn per step."""
    from ragr1_verl import agent_loop
    from ragr1_verl.protocol import observation


    spent = dict.fromkeys(BREAKDOWN_PARTS, 0.0)
    calls = dict.fromkeys(BREAKDOWN_PARTS, 0)

    def timed(function, part):
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spent[part] += time.perf_counter() - started
                calls[part] += 1
        return wrapper

    state = agent_loop._TokenizerState
    patches = [(state, "decode", BREAKDOWN_PARTS[0]),
               (agent_loop, "parse_action", BREAKDOWN_PARTS[1]),  # the names the rollout calls
               (agent_loop, "split_queries", BREAKDOWN_PARTS[1]),
               (observation, "_layout", BREAKDOWN_PARTS[2]),
               (agent_loop, "observation_ids", BREAKDOWN_PARTS[3]),
               (state, "encode", BREAKDOWN_PARTS[4])]
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    for owner, name, part in patches:
        setattr(owner, name, timed(getattr(owner, name), part))
    try:
        timings = await harness.batch(count, 1, first=10_000)
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)
    # observation_ids lays the block out (and calls encode after a cut): count each second once
    spent[BREAKDOWN_PARTS[3]] -= spent[BREAKDOWN_PARTS[2]] + spent[BREAKDOWN_PARTS[4]]
    rounds = sum(t.rounds for t in timings)
    overhead = sum(t.overhead_s for t in timings)
    prompt = sum(t.prompt_s for t in timings)
    parts = {part: {"ms_per_turn": 1000 * spent[part] / rounds, "calls_per_turn": calls[part] / rounds}
             for part in BREAKDOWN_PARTS}
    parts["prompt build (verl ct_build_initial_tokens)"] = {"ms_per_turn": 1000 * prompt / rounds,
                                                             "calls_per_turn": len(timings) / rounds}
    rest = overhead - prompt - sum(spent.values())
    parts["everything else"] = {"ms_per_turn": 1000 * rest / rounds, "calls_per_turn": None}
    return {"trajectories": len(timings), "turns": rounds, "overhead_ms_per_turn": 1000 * overhead / rounds,
            "parts": parts}


_EVENT_LOOP_FILES = ("asyncio/", "selectors", "cProfile", "bench_agent_loop", "threading", "contextvars")
_EVENT_LOOP_NAMES = ("epoll", "_contextvars.Context", "_asyncio.")


async def profile(harness: Harness, count: int, top: int) -> dict:
    """cProfile over ``count`` trajectories at concurrency 1; the ``top`` functions by cumulative time."""
    profiler = harness.profiler = cProfile.Profile()
    try:
        timings = await harness.batch(count, 1, first=20_000)
    finally:
        harness.profiler = None
    rounds = sum(t.rounds for t in timings)
    stats = pstats.Stats(profiler)
    rows = []
    entries = stats.stats.items()  # type: ignore[attr-defined]
    for (filename, line, name), (_, ncalls, tottime, cumtime, _) in entries:
        if any(part in filename for part in _EVENT_LOOP_FILES) or any(p in name for p in _EVENT_LOOP_NAMES):
            continue
        rows.append({"function": f"{_short(filename)}:{line}({name})", "calls": ncalls,
                     "tottime_ms_per_turn": 1000 * tottime / rounds,
                     "cumtime_ms_per_turn": 1000 * cumtime / rounds})
    rows.sort(key=lambda row: row["cumtime_ms_per_turn"], reverse=True)
    by_self = sorted(rows, key=lambda row: row["tottime_ms_per_turn"], reverse=True)
    return {"trajectories": len(timings), "turns": rounds,
            "overhead_ms_per_turn_profiled": 1000 * sum(t.overhead_s for t in timings) / rounds,
            "top_cumulative": rows[:top], "top_self": by_self[:top]}


def _short(filename: str) -> str:
    for marker in ("site-packages/", "/work/main/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


# ---------------------------------------------------------------------------------------------------------
# Setup and the whole run
# ---------------------------------------------------------------------------------------------------------

def build_dense_qwen2(folder: Path, vocab_size: int = 8000) -> Path:
    """The tiny model folder, its tokenizer retrained on the benchmark's vocabulary (Qwen-like density)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config

    from ragr1_verl.protocol.prompts import MQ_PROMPT_TEMPLATE
    from tests.ragr1_verl.fakes import CHAT_TEMPLATE, TRAINING_TEXT, build_tiny_qwen2

    build_tiny_qwen2(folder)
    corpus = [*TRAINING_TEXT, MQ_PROMPT_TEMPLATE, " ".join(WORDS), " ".join(w.capitalize() for w in WORDS),
              " ".join(SUBJECTS), " ".join(PLACES), " ".join(ASPECTS), "0123456789 - ( ) : , . \" { } [ ]"]
    for number in range(200):
        corpus += [question(number), *script_turns(number, 45)]
        corpus += [json.dumps(make_passage(query, 1, 100)) for query in search_queries(number, 0)]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size,
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus * 5, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    config = Qwen2Config.from_pretrained(folder)
    config.vocab_size = len(fast)
    config.eos_token_id, config.pad_token_id = fast.eos_token_id, fast.pad_token_id
    config.save_pretrained(folder)
    return folder


def compose_config(args: argparse.Namespace, model_dir: Path, retriever_url: str):
    from tests.ragr1_verl.rollout import compose_trainer_config

    ragr1 = {"retriever": {"url": retriever_url, "coalesce_window_ms": args.coalesce_window_ms,
                           "max_retries": 1, "backoff_base_s": 0.01},
             "topk": args.topk, "mode": "mq", "max_turns": 4, "prompt_template": "default",
             "max_obs_tokens_per_query": args.max_obs_tokens_per_query}
    return compose_trainer_config(model_dir, ragr1=ragr1, prompt_length=args.prompt_length,
                                  response_length=args.response_length)


async def _close_clients(config) -> None:
    from ragr1_verl import retrieval_client

    close_all = getattr(retrieval_client, "close_shared_clients", None)
    if close_all is not None:
        await close_all()
        return
    from ragr1_verl.agent_loop import config_for

    await retrieval_client.shared_client(config_for(config)[0].retriever).close()


async def benchmark(args: argparse.Namespace, model_dir: Path, retriever_url: str,
                    server_pid: int | None) -> dict:
    from verl.experimental.agent_loop.agent_loop import AgentLoopWorker

    config = compose_config(args, model_dir, retriever_url)
    worker = AgentLoopWorker(config, llm_client=None)  # inside the running loop, as verl builds it
    tokenizer = worker.tokenizer
    count = args.trajectories
    scripts = [[tokenizer.encode(text, add_special_tokens=False)
                for text in script_turns(n, args.think_words)] for n in range(count)]
    rollout = config.actor_rollout_ref.rollout
    sampling_params = {"temperature": rollout.temperature, "top_p": rollout.top_p, "top_k": rollout.top_k,
                       "repetition_penalty": 1.0, "logprobs": rollout.calculate_log_probs}
    harness = Harness(worker, config, scripts, args.llm_latency_ms / 1000, sampling_params)
    sample = _sample_sizes(tokenizer, args)
    try:
        await harness.batch(min(count, 16), min(count, 16), first=30_000)  # warm-up: session, caches
        rows = []
        for concurrency in args.concurrency:
            timings, elapsed, cpu, server_cpu, machine_cpu = [], 0.0, 0.0, 0.0, 0.0
            for repeat in range(args.repeats):
                started, cpu_started = time.perf_counter(), time.process_time()
                server_started, machine_started = process_cpu_seconds(server_pid), machine_busy_seconds()
                timings += await harness.batch(count, concurrency, first=repeat * count)
                elapsed += time.perf_counter() - started
                cpu += time.process_time() - cpu_started
                server_cpu += process_cpu_seconds(server_pid) - server_started
                machine_cpu += machine_busy_seconds() - machine_started
            row = summarize(concurrency, timings, elapsed)
            row["process_cpu_ms_per_turn"] = 1000 * cpu / row["turns"]
            row["other_cpu_cores"] = max(0.0, machine_cpu - cpu - server_cpu) / elapsed
            rows.append(row)
            print(f"  concurrency {concurrency:3d}: {row['overhead_ms_per_turn_mean']:.2f} ms/turn overhead "
                  f"(p95 {row['overhead_ms_per_turn_p95']:.2f}), retrieval "
                  f"{row['retrieval_ms_per_search_mean']:.1f} ms/search, {row['turns']} turns", flush=True)
        parts = await breakdown(harness, min(count, 32))
        profiled = await profile(harness, min(count, 32), args.profile_top) if args.profile else None
    finally:
        await _close_clients(config)
    return {"sample": sample, "rows": rows, "breakdown": parts, "profile": profiled}


def _sample_sizes(tokenizer, args: argparse.Namespace) -> dict:
    """Token counts of one scripted turn and of one query's documents, with this tokenizer."""
    turn = script_turns(0, args.think_words)[0]
    query = search_queries(0, 0)[0]
    docs = "\n".join(f"Doc {rank}: {make_passage(query, rank, args.passage_words)['contents']}"
                     for rank in range(1, args.topk + 1))
    return {"search_turn_tokens": len(tokenizer.encode(turn, add_special_tokens=False)),
            "search_turn_words": len(turn.split()),
            "docs_per_query_tokens": len(tokenizer.encode(docs, add_special_tokens=False)),
            "docs_per_query_words": len(docs.split()),
            "vocab_size": len(tokenizer)}


# ---------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------

def describe_machine(args: argparse.Namespace, model_dir: Path) -> dict:
    import tokenizers
    import torch
    import transformers
    import verl

    cores = os.cpu_count() or 1
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    return {"cpu": cpu_model(), "cores": cores, "usable_cores": usable, "python": platform.python_version(),
            "torch": torch.__version__, "verl": verl.__version__, "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__, "platform": platform.platform(),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "tokenizer": describe_tokenizer(args)}


def describe_tokenizer(args: argparse.Namespace) -> str:
    if args.model_dir is not None:
        return str(args.model_dir)
    if args.tokenizer == "dense":
        return "dense: a byte-level BPE trained offline on the benchmark's own words (Qwen-like tokens/word)"
    return "tiny offline test tokenizer of tests.ragr1_verl.fakes.build_tiny_qwen2"


def print_header(machine: dict, results: dict, args: argparse.Namespace) -> None:
    sample = results["sample"]
    print("\n## RagR1AgentLoop.run() overhead per turn (generation and retrieval excluded)\n")
    print(f"- machine: {machine['cpu']}, {machine['cores']} cores ({machine['usable_cores']} usable); "
          f"python {machine['python']}, torch {machine['torch']}, verl {machine['verl']}, "
          f"transformers {machine['transformers']}, tokenizers {machine['tokenizers']}; "
          f"{machine['platform']}; {machine['date']}")
    print(f"- tokenizer: {machine['tokenizer']}; vocabulary {sample['vocab_size']} tokens")
    print(f"- per trajectory: 3 rounds (2 searches x 3 queries, then an answer); think text "
          f"{args.think_words} words; a search turn is {sample['search_turn_words']} words = "
          f"{sample['search_turn_tokens']} tokens; topk={args.topk} passages of ~{args.passage_words} words "
          f"per query = {sample['docs_per_query_words']} words = {sample['docs_per_query_tokens']} tokens "
          f"per query (cut at {args.max_obs_tokens_per_query})")
    print(f"- fake LLM latency {args.llm_latency_ms:g} ms per call; retriever on 127.0.0.1 "
          f"({args.server_mode}), client coalesce window {args.coalesce_window_ms:g} ms; "
          f"{args.trajectories} trajectories x {args.repeats} repeats per concurrency level, after a warm-up")
    ratio = sample["docs_per_query_tokens"] / sample["docs_per_query_words"]
    if args.model_dir is None and args.tokenizer == "tiny":
        print(f"- CAVEAT: the tiny test tokenizer ({sample['vocab_size']} tokens learnt of a 600-token "
              f"budget) makes {ratio:.1f} tokens per word here, several times more than Qwen's tokenizer "
              "(~1.3 per English word), so token-proportional costs (decode, per-query truncation, "
              "observation tokenization) are overstated and the per-query truncation runs where Qwen's "
              "tokens would not reach the cap. Try --tokenizer dense (Qwen-like token counts) or "
              "--model-dir (a real tokenizer).")
    elif args.model_dir is None:
        print(f"- note: the dense tokenizer makes {ratio:.2f} tokens per word here (Qwen: ~1.3 on English "
              "prose); a tokenizer with a 150k vocabulary may encode a little slower per token than this "
              "one.")
    print()


def print_table(rows: list[dict], server_mode: str) -> None:
    head = ["conc", "traj", "turns", "overhead ms/turn", "p50", "p95", "w/o prompt ms/turn",
            "w/o prompt p95", "prompt ms/traj", "init ms/traj", "retrieval ms/search", "retr p95",
            f"<= {TARGET_MS_PER_TURN:g} ms", "traj/s", "CPU ms/turn", "other CPU"]
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---:" for _ in head) + "|")
    for r in rows:
        verdict = "yes" if r["overhead_ms_per_turn_mean"] <= TARGET_MS_PER_TURN else "NO"
        cells = [r["concurrency"], r["trajectories"], r["turns"], f"{r['overhead_ms_per_turn_mean']:.2f}",
                 f"{r['overhead_ms_per_turn_p50']:.2f}", f"{r['overhead_ms_per_turn_p95']:.2f}",
                 f"{r['overhead_no_prompt_ms_per_turn_mean']:.2f}",
                 f"{r['overhead_no_prompt_ms_per_turn_p95']:.2f}",
                 f"{r['prompt_build_ms_mean']:.2f}", f"{r['init_ms_mean']:.2f}",
                 f"{r['retrieval_ms_per_search_mean']:.2f}", f"{r['retrieval_ms_per_search_p95']:.2f}",
                 verdict, f"{r['trajectories_per_s']:.0f}", f"{r['process_cpu_ms_per_turn']:.2f}",
                 f"{r['other_cpu_cores']:.2f}"]
        print("| " + " | ".join(str(c) for c in cells) + " |")
    server_cpu = " and the retriever's threads" if server_mode == "thread" else ""
    print("\noverhead = (run() wall - generate() - retrieval) / generation rounds, per trajectory (mean, "
          "p50, p95 over trajectories); w/o prompt = the same without verl's initial prompt build (chat "
          "template + tokenization in verl's thread pool, queued behind the other trajectories' at high "
          "concurrency); init = hydra.utils.instantiate of the loop (per trajectory, outside run()); "
          "retrieval = RetrievalClient round trip per search, including the coalesce window and, at high "
          "concurrency, the wait for the busy event loop; CPU = this process's CPU time per turn (all "
          f"threads: event loop, fake LLM, client, verl's prompt build{server_cpu}), which bounds the "
          "turns/s one worker process can sustain; other CPU = cores that other processes on the machine "
          "used meanwhile (should be ~0).")
    noisy = max((r["other_cpu_cores"] for r in rows), default=0.0)
    if noisy > 0.15:
        print(f"\nWARNING: other processes used up to {noisy:.2f} cores during the run; the numbers are "
              "unreliable, rerun on a quiet machine.")
    for r in rows:
        if r["not_answered"] or r["invalid_actions"] or r["truncated"]:
            print(f"\nWARNING: concurrency {r['concurrency']}: {r['not_answered']} trajectories not "
                  f"answered, {r['invalid_actions']} invalid actions, {r['truncated']} truncated: the "
                  "script did not run as intended (raise --response-length?).")
    if rows:
        r = rows[0]
        print(f"\nper turn: fake generate() {r['generation_ms_per_turn_mean']:.1f} ms "
              f"(its own busy time {r['llm_busy_ms_per_turn_mean']:.1f} ms); "
              f"{r['response_tokens_mean']:.0f} response tokens per trajectory, "
              f"{r['observation_tokens_per_search']:.0f} observation tokens per search.")


def print_breakdown(parts: dict) -> None:
    print(f"\n### Where the overhead goes (instrumented pass, concurrency 1, {parts['trajectories']} "
          f"trajectories, {parts['overhead_ms_per_turn']:.2f} ms/turn with the timers)\n")
    print("| step | ms/turn | calls/turn |")
    print("|---|---:|---:|")
    for name, part in parts["parts"].items():
        calls = "-" if part["calls_per_turn"] is None else f"{part['calls_per_turn']:.2f}"
        print(f"| {name} | {part['ms_per_turn']:.3f} | {calls} |")


def print_profile(profiled: dict) -> None:
    print(f"\n### cProfile of run(), concurrency 1, {profiled['trajectories']} trajectories "
          f"({profiled['turns']} turns; {profiled['overhead_ms_per_turn_profiled']:.2f} ms/turn overhead "
          "under the profiler; asyncio frames left out; verl's prompt build runs in a thread and is not "
          "seen)\n")
    for title, key in (("by cumulative time", "top_cumulative"), ("by own time", "top_self")):
        print(f"{title}:\n")
        print("| function | calls | cumulative ms/turn | own ms/turn |")
        print("|---|---:|---:|---:|")
        for row in profiled[key]:
            print(f"| {row['function']} | {row['calls']} | {row['cumtime_ms_per_turn']:.3f} | "
                  f"{row['tottime_ms_per_turn']:.3f} |")
        print()


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    run = parser.add_argument_group("run")
    run.add_argument("--trajectories", type=int, default=64,
                     help="trajectories per repeat and concurrency level")
    run.add_argument("--repeats", type=int, default=3, help="passes per concurrency level")
    run.add_argument("--concurrency", type=int_list, default="1,16,64", help="trajectories in flight at once")
    run.add_argument("--llm-latency-ms", type=float, default=10.0,
                     help="the fake LLM's sleep per call (subtracted; makes trajectories interleave)")
    run.add_argument("--server-mode", choices=("process", "thread"), default="process",
                     help="run the loopback retriever in a child process or in a thread of this one")
    run.add_argument("--profile", action="store_true", help="also cProfile the concurrency-1 case")
    run.add_argument("--profile-top", type=int, default=15, help="functions listed by --profile")
    content = parser.add_argument_group("content")
    content.add_argument("--think-words", type=int, default=45,
                         help="words of <think> text per turn (~60 Qwen tokens)")
    content.add_argument("--passage-words", type=int, default=100, help="words per retrieved passage")
    content.add_argument("--topk", type=int, default=3, help="passages per query")
    content.add_argument("--max-obs-tokens-per-query", type=int, default=1000,
                         help="ragr1.max_obs_tokens_per_query")
    content.add_argument("--coalesce-window-ms", type=float, default=2.0,
                         help="ragr1.retriever.coalesce_window_ms")
    content.add_argument("--prompt-length", type=int, default=2048, help="rollout.prompt_length")
    content.add_argument("--response-length", type=int, default=16384, help="rollout.response_length")
    content.add_argument("--tokenizer", choices=("tiny", "dense"), default="tiny",
                         help="tiny: the tests' 600-token tokenizer; dense: one trained on the benchmark's "
                         "words")
    content.add_argument("--model-dir", type=Path,
                         help="a local HF model folder (tokenizer + config.json) instead of a built one")
    parser.add_argument("--json", type=Path, help="also write the results here as JSON")
    args = parser.parse_args(argv)
    if args.trajectories < 1 or args.repeats < 1:
        parser.error("--trajectories and --repeats must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bench-agent-loop-") as folder:
        if args.model_dir is not None:
            model_dir = args.model_dir
        elif args.tokenizer == "dense":
            model_dir = build_dense_qwen2(Path(folder))
        else:
            from tests.ragr1_verl.fakes import build_tiny_qwen2

            model_dir = build_tiny_qwen2(Path(folder))
        with LoopbackRetriever(args.passage_words, args.server_mode) as retriever:
            print(f"retriever on {retriever.url} ({args.server_mode}); measuring ...", flush=True)
            results = asyncio.run(benchmark(args, model_dir, retriever.url, retriever.pid))
        machine = describe_machine(args, model_dir)
    print_header(machine, results, args)
    print_table(results["rows"], args.server_mode)
    print_breakdown(results["breakdown"])
    if results["profile"] is not None:
        print_profile(results["profile"])
    rows = results["rows"]
    worst = max(rows, key=lambda row: row["overhead_ms_per_turn_mean"])
    verdict = "within" if worst["overhead_ms_per_turn_mean"] <= TARGET_MS_PER_TURN else "ABOVE"
    first = rows[0]
    print(f"\nmean overhead: {first['overhead_ms_per_turn_mean']:.2f} ms/turn at concurrency "
          f"{first['concurrency']} ({first['overhead_no_prompt_ms_per_turn_mean']:.2f} without verl's "
          f"prompt build); worst {worst['overhead_ms_per_turn_mean']:.2f} ms/turn at concurrency "
          f"{worst['concurrency']} ({worst['overhead_no_prompt_ms_per_turn_mean']:.2f} without it): "
          f"{verdict} the {TARGET_MS_PER_TURN:g} ms/turn target; total run time "
          f"{time.perf_counter() - started:.0f} s")
    if args.json:
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        args.json.write_text(json.dumps({"machine": machine, "settings": settings, **results}, indent=2))
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
