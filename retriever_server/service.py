"""The retrieval service: loads an index folder after checking its manifest, then answers searches."""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
import time
from pathlib import Path

import numpy as np

from retriever_server.backends import DenseRetriever, LexicalRetriever, QueryEmbedder, Retriever
from retriever_server.batcher import BatchingConfig, DynamicBatcher
from retriever_server.bm25 import Bm25Searcher
from retriever_server.corpus import CORPUS_NAME, Corpus
from retriever_server.cpus import log_thread_counts, usable_cpus
from retriever_server.dense import (
    cuda_devices,
)
from retriever_server.encoder_backends import AUTO_BACKEND, REFERENCE_BACKEND
from retriever_server.encoder_choice import (
    MIN_SET_AGREEMENT,
    PROBE_QUERIES,
    choose,
    describe,
    probe_queries,
    run_trials,
    spread_positions,
)
from retriever_server.encoders import EncoderSpec, TextEncoder
from retriever_server.manifest import (
    PROBE_MIN_COSINE,
    PROBE_MIN_COSINE_LOW_PRECISION,
    PROBE_SENTENCE,
    Manifest,
    ManifestError,
    check_corpus,
    check_encoder,
    check_files,
)
from retriever_server.metrics import ServerMetrics
from retriever_server.plan import (
    GIB,
    available_memory,
    cuda_memory_of,
    human_bytes,
    leave_free,
    plan_index,
    require_placement,
)
from retriever_server.responses import DocumentJson, render_body
from retriever_server.searchers import LoadOptions, load_searcher, search_backend
from retriever_server.sharded import LocalShard, ShardedCorpus, ShardedRetriever
from retriever_server.sharding import read_shards

logger = logging.getLogger(__name__)


class RetrievalService:
    """Owns the corpus, the retriever and the batcher; reports its state for ``/health``."""

    def __init__(self, index_dir: str | os.PathLike, options: LoadOptions, batching: BatchingConfig,
                 metrics: ServerMetrics | None = None):
        self.index_dir = Path(index_dir)
        self.options = options
        self.batching = batching
        self.metrics = metrics or ServerMetrics()
        self.state = "loading"
        self.error: str | None = None
        self.started = time.time()
        self.manifest: Manifest | None = None
        self.corpus: Corpus | None = None
        self.batcher: DynamicBatcher | None = None
        self.document_json: DocumentJson | None = None
        self.threads: dict[str, int] | None = None
        self.encoder_trials: dict | None = None  # --encoder-backend auto: what was measured and chosen
        self._loading_status = lambda: None  # while Ray Serve deploys the shards: their states
        self._on_failure = None  # load_in_background's: also told when the connection to Ray is lost for good

    @property
    def ready(self) -> bool:
        return self.state == "ready" and self.problem is None

    @property
    def problem(self) -> str | None:
        """Why ``/retrieve`` cannot answer now (None when it can)."""
        if self.state == "ready":
            connection = self._ray_connection()
            return connection.problem() if connection is not None else None
        if self.state == "failed":
            return f"the index is not available: {self.error}"
        return f"the index is not ready ({self.state})"

    def _ray_connection(self):
        return self.options.deployer.connection() if self.options.deployer is not None else None

    def _ray_lost(self, problem: str) -> None:
        """The connection to Ray cannot come back: the service fails (``/retrieve`` answers 503 with the
        reason) and leaves Ray, then whoever runs it is told (the CLI stops serving and exits with status 1)."""
        if self.state == "failed":
            return
        self.state, self.error = "failed", problem
        self.options.deployer.leave()
        if self._on_failure is not None:
            self._on_failure(ConnectionError(problem))

    def load(self) -> None:
        """Check the manifest, load corpus, encoder and index, and start the batcher. Raises on mismatch."""
        try:
            manifest = Manifest.read(self.index_dir)
            self._check_memory(manifest)
            self.threads = _set_thread_counts(self.options)
            if manifest.kind == "sharded":
                retriever = self._load_sharded(manifest)
                corpus = ShardedCorpus(manifest.corpus["count"], retriever.cache)
            else:
                check_files(manifest, self.index_dir, checksums=self.options.verify_checksums)
                corpus_path = Path(self.options.corpus) if self.options.corpus else self.index_dir / CORPUS_NAME
                corpus = Corpus(corpus_path)
                check_corpus(manifest, corpus_path, len(corpus))
                retriever = self._load_retriever(manifest)
            if self.options.encoder_backend == AUTO_BACKEND and manifest.encoder:
                self._choose_encoder_backend(manifest, retriever, corpus)
        except Exception as err:
            self.state, self.error = "failed", str(err)
            raise
        self.manifest, self.corpus = manifest, corpus
        self.document_json = DocumentJson(corpus, int(self.options.document_cache_mib * 2**20))
        self.batcher = DynamicBatcher(retriever, self.batching, self.metrics, self.document_json.fragments)
        self.batcher.start()
        self.state = "ready"
        logger.info("loaded %d passages from %s (%s)", len(corpus), self.index_dir, retriever.description)

    def load_in_background(self, on_failure, on_ready=None) -> threading.Thread:
        self._on_failure = on_failure

        def run() -> None:
            try:
                self.load()
            except Exception as err:  # noqa: BLE001 - reported through /health and on_failure
                logger.error("could not load the index: %s", err)
                on_failure(err)
                return
            if on_ready is not None:
                on_ready()

        thread = threading.Thread(target=run, name="ragr1-loader", daemon=True)
        thread.start()
        return thread

    def _check_memory(self, manifest: Manifest) -> None:
        """Refuse, before anything is loaded, an index whose memory plan does not fit (PlacementError)."""
        if not self.options.check_memory:
            return
        reserve = int(self.options.reserve_memory_gib * GIB)
        batch = self.batching.max_batch_queries
        if self.options.deployer is not None:
            self.options.deployer.check_memory(self.index_dir, batch, reserve)
            return
        backend = search_backend(manifest, self.options)
        devices = list(self.options.search_devices) or cuda_devices()
        on_gpus = bool(devices) and all(device.startswith("cuda") for device in devices)
        if backend in ("bm25", "faiss") or (backend == "torch" and not on_gpus):
            plans = plan_index(self.index_dir, shard_device="cpu", batch_queries=batch)
            require_placement(plans, leave_free(available_memory("cpu"), reserve))
        elif backend == "torch" and manifest.kind != "sharded":  # rows split evenly over the GPUs
            plans = plan_index(self.index_dir, len(devices), "cuda", batch_queries=batch)
            require_placement(plans, leave_free(cuda_memory_of(devices), reserve), max_per_device=1)
        else:
            logger.info("memory plan skipped for %s in one process: plan it with `ragr1-retriever plan`", backend)
            return
        logger.info("memory plan: %s resident", human_bytes(sum(plan.resident_bytes for plan in plans)))

    def _load_retriever(self, manifest: Manifest) -> Retriever:
        if manifest.kind == "bm25":
            return LexicalRetriever(Bm25Searcher(self.index_dir, manifest.index), self.metrics)
        encoder = self._load_encoder(manifest)
        searcher = load_searcher(self.index_dir, manifest, self.options)
        if searcher.ntotal != manifest.corpus["count"]:
            raise ManifestError(f"the index holds {searcher.ntotal} vectors but the corpus has "
                                f"{manifest.corpus['count']} passages")
        return DenseRetriever(encoder, searcher, self.metrics, self.options.cache_size)

    def _load_encoder(self, manifest: Manifest, backend: str | None = None) -> TextEncoder:
        """The query encoder on ``backend`` (default: the options'; ``auto`` starts with the reference), checked
        against the manifest: the same model, and the same vector for the probe sentence (closely enough for
        a lower-precision backend)."""
        spec = EncoderSpec.from_dict(manifest.encoder["spec"])
        if self.options.encoder:
            spec = EncoderSpec.from_dict({**spec.to_dict(), "name": self.options.encoder})
        backend = backend or self.options.encoder_backend
        if backend == AUTO_BACKEND:
            backend = REFERENCE_BACKEND
        encoder = TextEncoder(spec, device=self.options.encoder_device, batch_size=self.options.encoder_batch_size,
                              backend=backend)
        check_encoder(manifest, spec.name, encoder.fingerprint, encoder.encode_queries([PROBE_SENTENCE])[0],
                      min_cosine=PROBE_MIN_COSINE if backend == REFERENCE_BACKEND else PROBE_MIN_COSINE_LOW_PRECISION)
        return encoder

    def _choose_encoder_backend(self, manifest: Manifest, retriever, corpus) -> None:
        """``--encoder-backend auto``: every backend measured against the reference on probe queries from
        this corpus and index; the fastest that keeps the reference's top-k is used (encoder_choice)."""
        queries = probe_queries([document["contents"] for document in corpus.documents(_probe_positions(retriever,
                                                                                                          corpus))])
        trials, encoders = run_trials(lambda backend: self._load_encoder(manifest, backend),
                                      lambda vectors, k: retriever.search_vectors(vectors, k)[1], queries,
                                      reference=retriever.embed.encoder)
        chosen = choose(trials)
        logger.info("%s", describe(trials, chosen, MIN_SET_AGREEMENT))
        retriever.use_encoder(encoders[chosen.backend])
        self.encoder_trials = {"chosen": chosen.backend, "probe_queries": len(queries),
                               "trials": [trial.as_dict() for trial in trials]}

    def _load_sharded(self, manifest: Manifest) -> ShardedRetriever:
        """Every shard loaded and checked on its own, in this process or as Ray Serve deployments."""
        infos = read_shards(self.index_dir)
        dense = manifest.index["kind"] == "dense"
        status = on_close = encoder = None
        if self.options.deployer is not None:
            deployment = self.options.deployer.deploy(
                self.index_dir, manifest, infos, self.options, self.metrics,
                on_status=lambda snapshot: setattr(self, "_loading_status", snapshot), on_lost=self._ray_lost)
            shards, encoder, where = deployment.shards, deployment.encoder, deployment.where
            status, on_close = deployment.status, deployment.close
            if encoder is not None:
                check_encoder(manifest, encoder.spec.name, encoder.fingerprint,
                              encoder.encode_queries([PROBE_SENTENCE])[0])
        else:
            loader = functools.partial(load_searcher, options=self.options)
            shards = [LocalShard(self.index_dir / info.dir, info, loader, checksums=self.options.verify_checksums)
                      for info in infos]
            where = "this process"
        if dense:
            embed = QueryEmbedder(encoder or self._load_encoder(manifest), self.metrics, self.options.cache_size)
        else:
            embed = None
        description = {"encoder": (manifest.encoder or {}).get("spec", {}).get("name"), "searcher": "sharded",
                       "shards_on": where}
        return ShardedRetriever(shards, manifest.corpus["count"], self.metrics, embed, description, status,
                                on_close)

    def search_body(self, queries: list[str], k: int, return_scores: bool) -> str:
        """The ``/retrieve`` response body for these queries, through the batcher."""
        answer = self.batcher.search(queries, k)
        return render_body(answer.positions.tolist(), answer.scores.tolist(), answer.fragments, return_scores)

    def search(self, queries: list[str], k: int) -> tuple[list[list[dict]], list[list[float]]]:
        """Documents and scores per query, through the batcher (for callers in Python)."""
        answer = self.batcher.search(queries, k)
        rows = [[(p, s) for p, s in zip(position_row, score_row) if p >= 0]
                for score_row, position_row in zip(answer.scores.tolist(), answer.positions.tolist())]
        documents = [[json.loads(answer.fragments[p]) for p, _ in row] for row in rows]
        return documents, [[round(float(s), 6) for _, s in row] for row in rows]

    def health(self) -> dict:
        manifest = self.manifest
        problem = self.problem if self.state == "ready" else None
        connection = self._ray_connection()
        return {
            "status": "unavailable" if problem else self.state,
            "ready": self.ready,
            "error": problem or self.error,
            "corpus_size": len(self.corpus) if self.corpus is not None else None,
            "index_type": manifest.index["type"] if manifest else None,
            "encoder": (manifest.encoder or {}).get("spec", {}).get("name") if manifest else None,
            "backend": self.batcher.retriever.description if self.batcher else None,
            "index_dir": str(self.index_dir),
            "shards": _shard_status(self.batcher.retriever) if self.batcher else self._loading_status(),
            "threads": self.threads,
            **({"encoder_backends": self.encoder_trials} if self.encoder_trials else {}),
            **({"ray": connection.describe()} if connection is not None else {}),
            "uptime_s": round(time.time() - self.started, 3),
        }

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.stop()
            close = getattr(self.batcher.retriever, "close", None)
            if close is not None:
                close()
        if self.options.deployer is not None:  # also when stopped while loading: Ray's processes end with us
            self.options.deployer.leave()


def _probe_positions(retriever, corpus) -> list[int]:
    """Passages to make probe queries from: spread over the corpus, or for a sharded index (whose documents
    are known once a search has returned them) those that random directions find."""
    if not isinstance(corpus, ShardedCorpus):
        return spread_positions(len(corpus))
    vectors = np.random.default_rng(0).standard_normal((PROBE_QUERIES, retriever.embed.encoder.dim))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    positions = retriever.search_vectors(vectors.astype(np.float32), 1)[1].ravel()
    return np.unique(positions[positions >= 0]).tolist()


def _shard_status(retriever) -> dict[str, str] | None:
    status = getattr(retriever, "status", None)
    return status() if callable(status) else None


def _set_thread_counts(options: LoadOptions) -> dict[str, int]:
    """torch's threads (the query encoder) and faiss's for large batches, from the CPUs this process may use."""
    import torch

    cpus = usable_cpus()
    torch.set_num_threads(options.torch_threads or cpus)
    counts = {"usable_cpus": cpus, "torch": torch.get_num_threads(), "faiss": options.omp_threads or cpus}
    log_thread_counts(cpus, counts["torch"], counts["faiss"])
    return counts
