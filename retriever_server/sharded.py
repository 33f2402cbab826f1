"""Scatter-gather over index shards: each shard's top-k, merged into the global top-k.

A shard is anything with ``search(payload, k) -> per query [(score, global position, document), ...]``:
a :class:`LocalShard` (a shard folder loaded in this process) or a Ray Serve replica
(:mod:`retriever_server.ray_serve`). :class:`ShardedRetriever` encodes the queries once (dense indexes),
asks every shard in parallel, and merges by score, ties broken by global position, so that an exact index
gives the ids of the unsharded index. A shard that cannot answer fails the whole search with
:class:`ShardUnavailable`, naming it: a top-k without one shard's passages is never presented as complete.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from retriever_server.corpus import CORPUS_NAME, Corpus
from retriever_server.manifest import Manifest, ManifestError, check_corpus, check_files
from retriever_server.metrics import ServerMetrics
from retriever_server.sharding import ShardInfo

logger = logging.getLogger(__name__)

Hit = tuple[float, int, dict]  # score, global position, {"id", "contents"}


class ShardUnavailable(RuntimeError):
    """A shard could not answer; ``/retrieve`` answers 503 naming it."""

    expected = True  # an outage, not a bug: the batcher logs one line, not a traceback

    def __init__(self, shard: int | str, reason: str):
        what = f"index shard {shard}" if isinstance(shard, int) and shard >= 0 else \
            "the index shards" if isinstance(shard, int) else f"the query {shard}"
        super().__init__(f"{what} is unavailable: {reason}")
        self.shard = shard


class Shard(Protocol):
    info: ShardInfo

    def search(self, payload: np.ndarray | list[str], k: int) -> list[list[Hit]]:
        """Per query, this shard's top-k hits with global positions and their documents."""


def hits_from_arrays(scores: np.ndarray, positions: np.ndarray, corpus: Corpus, start: int) -> list[list[Hit]]:
    """A searcher's ``(scores, local positions)`` rows as hits with global positions and documents."""
    found = [[(float(score), int(position)) for score, position in zip(score_row, position_row) if position >= 0]
             for score_row, position_row in zip(scores.tolist(), positions.tolist())]
    documents = iter(corpus.documents([position for row in found for _, position in row]))
    return [[(score, start + position, next(documents)) for score, position in row] for row in found]


class LocalShard:
    """A shard folder searched in this process: its own manifest, corpus and searcher."""

    def __init__(self, shard_dir: Path, info: ShardInfo, load_searcher: Callable[[Path, Manifest], object],
                 *, checksums: bool = False):
        manifest = Manifest.read(shard_dir)
        check_files(manifest, shard_dir, checksums=checksums)
        self.corpus = Corpus(shard_dir / CORPUS_NAME)
        check_corpus(manifest, shard_dir / CORPUS_NAME, len(self.corpus))
        if (manifest.shard or {}).get("start") != info.start:
            raise ManifestError(f"{shard_dir} is not shard {info.number} of this index (it starts at "
                                f"{(manifest.shard or {}).get('start')}, the index says {info.start})")
        self.info, self.manifest = info, manifest
        self.searcher = load_searcher(shard_dir, manifest)

    def search(self, payload: np.ndarray | list[str], k: int) -> list[list[Hit]]:
        if isinstance(payload, np.ndarray):
            scores, positions = self.searcher.search(payload, k)
        else:
            scores, positions = self.searcher.search_texts(payload, k)
        return hits_from_arrays(scores, positions, self.corpus, self.info.start)


def merge_hits(per_shard: Sequence[list[list[Hit]]], k: int) -> list[list[Hit]]:
    """Per query, the best ``k`` of all shards' hits: highest score first, then lowest global position."""
    queries = len(per_shard[0]) if per_shard else 0
    return [heapq.nsmallest(k, (hit for shard in per_shard for hit in shard[row]), key=lambda h: (-h[0], h[1]))
            for row in range(queries)]


class DocumentCache:
    """The documents of recent hits by global position, for ``RetrievalService.search`` to look up.

    Hits arrive with their documents; the service asks for them right after, by position. Bounded, so the
    front never holds the corpus.
    """

    def __init__(self, capacity: int = 200_000):
        self.capacity = capacity
        self._entries: OrderedDict[int, dict] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, hits: list[list[Hit]]) -> None:
        with self._lock:
            for row in hits:
                for _, position, document in row:
                    self._entries[position] = document
                    self._entries.move_to_end(position)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def get(self, position: int) -> dict | None:
        with self._lock:
            return self._entries.get(position)


@dataclass
class ShardedCorpus:
    """What :class:`RetrievalService` needs of a corpus, over shards: its size and documents by position."""

    total: int
    cache: DocumentCache

    def __len__(self) -> int:
        return self.total

    def documents(self, positions: list[int]) -> list[dict]:
        documents = [self.cache.get(position) for position in positions]
        missing = [position for position, document in zip(positions, documents) if document is None]
        if missing:  # evicted between the search and this lookup: only under extreme load
            raise ShardUnavailable(-1, f"documents of {len(missing)} hits were evicted before they were read; retry")
        return documents  # type: ignore[return-value]


class ShardedRetriever:
    """The batcher's retriever over shards: one encode, a parallel scatter, a merge."""

    def __init__(self, shards: Sequence[Shard], total: int, metrics: ServerMetrics,
                 embed: Callable[[list[str]], np.ndarray] | None, description: dict,
                 status: Callable[[], dict[str, str]] | None = None, on_close: Callable[[], None] | None = None):
        self.shards = list(shards)
        self.status = status or (lambda: {f"shard-{shard.info.number}": "HEALTHY" for shard in self.shards})
        self._on_close = on_close
        self.ntotal = total
        self.metrics = metrics
        self.embed = embed  # None for BM25: the shards take the query texts
        self.description = {**description, "shards": len(self.shards)}
        self.cache = DocumentCache()
        self._pool = ThreadPoolExecutor(max_workers=len(self.shards), thread_name_prefix="ragr1-scatter")

    def search(self, queries: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.search_vectors(self.embed(queries) if self.embed is not None else list(queries), k)

    def use_encoder(self, encoder) -> None:
        self.embed.use(encoder)
        self.description = {**self.description, "encoder_backend": encoder.backend}

    def search_vectors(self, payload: np.ndarray | list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """The merged top-k of every shard for query vectors (or, for BM25, query texts)."""
        started = time.perf_counter()
        futures = [(shard, self._pool.submit(shard.search, payload, k)) for shard in self.shards]
        per_shard = [self._result(shard, future) for shard, future in futures]
        merged = merge_hits(per_shard, k)
        self.metrics.search_seconds.observe(time.perf_counter() - started)
        self.cache.put(merged)
        scores = np.full((len(payload), k), -np.inf, dtype=np.float32)
        positions = np.full((len(payload), k), -1, dtype=np.int64)
        for row, hits in enumerate(merged):
            scores[row, :len(hits)] = [hit[0] for hit in hits]
            positions[row, :len(hits)] = [hit[1] for hit in hits]
        return scores, positions

    @staticmethod
    def _result(shard: Shard, future) -> list[list[Hit]]:
        try:
            return future.result()
        except ShardUnavailable:
            raise
        except Exception as err:  # noqa: BLE001 - whatever a shard raised, the search names the shard
            raise ShardUnavailable(shard.info.number, f"{type(err).__name__}: {err}") from err

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._on_close is not None:
            self._on_close()


@dataclass(frozen=True)
class ShardDeployment:
    """A sharded index's shards served outside this process, as a :class:`ShardDeployer` started them."""

    shards: list[Shard]
    encoder: Any  # a query encoder served beside them (``encode_queries``, ``spec``, ``fingerprint``), or None
    status: Callable[[], dict[str, str]]  # each deployment's state, for /health
    close: Callable[[], None]  # removes the deployments and leaves their cluster
    where: str  # where they run, for /health and the log


class ShardDeployer(Protocol):
    """What serves shards outside this process (:class:`retriever_server.ray_serve.RayDeployer`), passed in
    through the load options so that the service never imports a cluster framework."""

    def connection(self) -> Any:
        """The live connection (``problem()``: why it cannot serve now, or None; ``describe()``), or None."""

    def check_memory(self, index_dir: Path, batch_queries: int, reserve_bytes: int) -> None:
        """Raise ``PlacementError`` before any deployment when the shard replicas do not fit."""

    def deploy(self, index_dir: Path, manifest: Manifest, infos: list[ShardInfo], options: Any,
               metrics: ServerMetrics, on_status: Callable[[Callable[[], dict[str, str]]], None],
               on_lost: Callable[[str], None]) -> ShardDeployment:
        """Start the shards (``on_status`` gets the status function as soon as it exists; ``on_lost`` is told
        when the connection cannot come back)."""

    def leave(self) -> None:
        """Leave the cluster (a no-op when not connected)."""
