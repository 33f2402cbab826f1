"""Retrieval backends: query strings in, ``(scores, positions)`` out. Called by the batcher's one thread."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Protocol

import numpy as np

from retriever_server.bm25 import Bm25Searcher
from retriever_server.encoders import TextEncoder
from retriever_server.metrics import ServerMetrics

logger = logging.getLogger(__name__)


class Retriever(Protocol):
    ntotal: int
    description: dict

    def search(self, queries: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` ``(scores, positions)`` per query; position -1 marks a missing hit."""


class EmbeddingCache:
    """A least-recently-used map from query text to its embedding (RL rollouts repeat queries)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._entries: OrderedDict[str, np.ndarray] = OrderedDict()

    def get(self, query: str) -> np.ndarray | None:
        vector = self._entries.get(query)
        if vector is not None:
            self._entries.move_to_end(query)
        return vector

    def put(self, query: str, vector: np.ndarray) -> None:
        if self.capacity <= 0:
            return
        self._entries[query] = vector
        self._entries.move_to_end(query)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


class QueryEmbedder:
    """Query strings to vectors through the encoder, with an LRU cache of query embeddings."""

    def __init__(self, encoder: TextEncoder, metrics: ServerMetrics, cache_size: int):
        self.encoder = encoder
        self.metrics = metrics
        self.cache = EmbeddingCache(cache_size)

    def use(self, encoder: TextEncoder) -> None:
        """Encode with ``encoder`` from now on (same model, another backend); cached vectors are dropped."""
        self.encoder = encoder
        self.cache = EmbeddingCache(self.cache.capacity)

    def __call__(self, queries: list[str]) -> np.ndarray:
        vectors: list[np.ndarray | None] = [self.cache.get(q) for q in queries]
        missing = [i for i, v in enumerate(vectors) if v is None]
        self.metrics.cache_hits.inc(len(queries) - len(missing))
        self.metrics.cache_misses.inc(len(missing))
        if missing:
            started = time.perf_counter()
            fresh = self.encoder.encode_queries([queries[i] for i in missing])
            self.metrics.encode_seconds.observe(time.perf_counter() - started)
            for i, vector in zip(missing, fresh):
                vectors[i] = vector
                self.cache.put(queries[i], vector)
        return np.stack(vectors).astype(np.float32, copy=False)


class DenseRetriever:
    """Encoder + vector searcher, with an LRU cache of query embeddings."""

    def __init__(self, encoder: TextEncoder, searcher, metrics: ServerMetrics, cache_size: int):
        self.encoder = encoder
        self.searcher = searcher
        self.metrics = metrics
        self.embed = QueryEmbedder(encoder, metrics, cache_size)
        self.ntotal = searcher.ntotal
        self.description = {"encoder": encoder.spec.name, "encoder_device": str(encoder.device),
                            "encoder_backend": encoder.backend, "search_device": searcher.device,
                            "searcher": type(searcher).__name__}

    @property
    def cache(self) -> EmbeddingCache:
        return self.embed.cache

    def use_encoder(self, encoder: TextEncoder) -> None:
        self.encoder = encoder
        self.embed.use(encoder)
        self.description = {**self.description, "encoder_backend": encoder.backend}

    def search(self, queries: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.search_vectors(self.embed(queries), k)

    def search_vectors(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        started = time.perf_counter()
        result = self.searcher.search(vectors, k)
        self.metrics.search_seconds.observe(time.perf_counter() - started)
        return result


class LexicalRetriever:
    """BM25 over the corpus text."""

    def __init__(self, searcher: Bm25Searcher, metrics: ServerMetrics):
        self.searcher = searcher
        self.metrics = metrics
        self.ntotal = searcher.ntotal
        self.description = {"encoder": None, "search_device": "cpu", "searcher": "bm25"}

    def search(self, queries: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        started = time.perf_counter()
        result = self.searcher.search_texts(queries, k)
        self.metrics.search_seconds.observe(time.perf_counter() - started)
        return result
