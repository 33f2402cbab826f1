"""Prometheus metrics of one server instance (its own registry, so tests can run several servers)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServerMetrics:
    """Counters and histograms exposed at ``GET /metrics`` in the Prometheus text format."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("ragr1_retriever_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.request_seconds = Histogram("ragr1_retriever_request_seconds", "HTTP request latency",
                                         ["endpoint"], buckets=_SECONDS_BUCKETS, registry=r)
        self.errors = Counter("ragr1_retriever_errors", "Rejected or failed requests by kind", ["kind"], registry=r)
        self.queries = Counter("ragr1_retriever_queries", "Queries received in /retrieve requests", registry=r)
        self.batches = Counter("ragr1_retriever_batches", "Search batches run", registry=r)
        self.batch_requests = Histogram("ragr1_retriever_batch_requests", "Requests coalesced into one batch",
                                        buckets=_SIZE_BUCKETS, registry=r)
        self.batch_queries = Histogram("ragr1_retriever_batch_queries", "Distinct queries searched per batch",
                                       buckets=_SIZE_BUCKETS, registry=r)
        self.deduplicated = Counter("ragr1_retriever_deduplicated_queries",
                                    "Queries answered by an identical query in the same batch", registry=r)
        self.cache_hits = Counter("ragr1_retriever_cache_hits", "Query embeddings found in the cache", registry=r)
        self.cache_misses = Counter("ragr1_retriever_cache_misses", "Query embeddings computed", registry=r)
        self.queue_seconds = Histogram("ragr1_retriever_queue_seconds", "Time a request waited for its batch",
                                       buckets=_SECONDS_BUCKETS, registry=r)
        self.encode_seconds = Histogram("ragr1_retriever_encode_seconds", "Query encoding time per batch",
                                        buckets=_SECONDS_BUCKETS, registry=r)
        self.search_seconds = Histogram("ragr1_retriever_search_seconds", "Index search time per batch",
                                        buckets=_SECONDS_BUCKETS, registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
