"""Dense vector search: faiss indexes (CPU or faiss-gpu) and an exact fp16 search in torch over GPUs.

All searchers take float32 query vectors ``[n, d]`` and return ``(scores, positions)`` arrays ``[n, k]``
(inner product; -1 marks a missing hit when the index holds fewer than ``k`` vectors).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

EMBEDDINGS_DIR = "embeddings"
FAISS_INDEX_NAME = "index.faiss"
EXACT_INDEX_TYPES = ("Flat", "IDMap,Flat")
# From this many queries a flat scan takes faiss's BLAS path (one matrix product); below, its direct scan.
# 100k x 384 on one core (AMD EPYC, 2026-12-07): 1 query 16 ms direct vs 34 ms BLAS, 3 about equal, 8
# 125 ms direct vs 40 ms BLAS.
BLAS_MIN_QUERIES = 3
# faiss decides with distance_compute_blas_threshold, compared with the query count in older releases (default
# 20) and with queries x dimension in faiss 1.15.1 (default 128,000: every batch of up to 333 384-d queries takes
# the direct path). These two values choose the same path under either rule, so the searcher sets one of them
# around each search.
DIRECT_SCAN_THRESHOLD = 2**31 - 1
BLAS_SCAN_THRESHOLD = 0


def faiss_gpu_available() -> bool:
    import faiss

    return hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0


def embedding_shards(index_dir: str | os.PathLike) -> list[Path]:
    return sorted(Path(index_dir, EMBEDDINGS_DIR).glob("shard-*.npy"))


def iter_embedding_shards(index_dir: str | os.PathLike) -> Iterator[np.ndarray]:
    """The fp16 embedding shards of an index, memory-mapped, in position order."""
    for shard in embedding_shards(index_dir):
        yield np.load(shard, mmap_mode="r", allow_pickle=False)


def build_faiss_index(index_type: str, dim: int, shards: Iterable[np.ndarray], *, train_size: int = 200_000,
                      seed: int = 0):
    """Build a faiss index from an index-factory string (``Flat``, ``HNSW32``, ``IVF4096,PQ64``, ``SQ8``...).

    Indexes that need training are trained on a uniform sample of up to ``train_size`` vectors.
    """
    import faiss

    index = faiss.index_factory(dim, index_type, faiss.METRIC_INNER_PRODUCT)
    shards = list(shards)
    if not index.is_trained:
        sample = _training_sample(shards, train_size, seed)
        logger.info("training %s on %d vectors", index_type, len(sample))
        index.train(sample)
    for shard in shards:
        index.add(np.ascontiguousarray(shard, dtype=np.float32))
    return index


def _training_sample(shards: list[np.ndarray], train_size: int, seed: int) -> np.ndarray:
    total = sum(len(s) for s in shards)
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(total, size=min(train_size, total), replace=False))
    offsets = np.cumsum([0] + [len(s) for s in shards])
    parts = []
    for number, shard in enumerate(shards):
        local = chosen[(chosen >= offsets[number]) & (chosen < offsets[number + 1])] - offsets[number]
        if len(local):
            parts.append(np.asarray(shard[local], dtype=np.float32))
    return np.ascontiguousarray(np.concatenate(parts, axis=0))


class FaissSearcher:
    """A faiss index with explicit thread control for small and large batches."""

    def __init__(self, index, *, omp_threads: int, small_batch: int = 16, nprobe: int | None = None,
                 ef_search: int | None = None, rerank_factor: int | None = None, on_gpu: bool = False):
        import faiss

        self._faiss = faiss
        self.index = index
        self.ntotal = int(index.ntotal)
        self.omp_threads = omp_threads
        self.small_batch = small_batch
        self.device = "cuda" if on_gpu else "cpu"
        space = faiss.GpuParameterSpace() if on_gpu else faiss.ParameterSpace()
        # k_factor_rf: candidates per result an IndexRefine (e.g. "SQ8,RFlat") re-ranks with its fp32 copy
        for name, value in (("nprobe", nprobe), ("efSearch", ef_search), ("k_factor_rf", rerank_factor)):
            if value is not None:
                _set_search_parameter(space, index, name, value)

    @classmethod
    def load(cls, index_dir: str | os.PathLike, *, use_gpu: bool, mmap: bool = True, **options) -> FaissSearcher:
        """``mmap``: map the index's codes (Flat, SQ, PQ, IVF lists, HNSW storage) from the file instead of
        reading them into memory; the pages are then page cache, shared and droppable, and loading is instant."""
        import faiss

        flags = _mmap_flags(faiss) if mmap else 0
        index = faiss.read_index(str(Path(index_dir, FAISS_INDEX_NAME)), flags)
        if flags:
            logger.info("faiss index memory-mapped from %s", Path(index_dir, FAISS_INDEX_NAME))
        if use_gpu:
            cloner = faiss.GpuMultipleClonerOptions()
            cloner.shard, cloner.useFloat16 = True, True
            index = faiss.index_cpu_to_all_gpus(index, co=cloner)
            logger.info("faiss index sharded over %d GPUs (fp16)", faiss.get_num_gpus())
        return cls(index, on_gpu=use_gpu, **options)

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        threads = 1 if len(vectors) < self.small_batch else self.omp_threads
        self._faiss.omp_set_num_threads(threads)
        with flat_scan_path(self._faiss, len(vectors)):
            return self.index.search(np.ascontiguousarray(vectors, dtype=np.float32), k)


@contextlib.contextmanager
def flat_scan_path(faiss, queries: int) -> Iterator[None]:
    """Within the block, a flat scan of ``queries`` queries takes faiss's direct path (below
    ``BLAS_MIN_QUERIES``) or its BLAS path; faiss's setting is put back after it, so other faiss work in the
    process (k-means in an index build) keeps its own. The setting is process-wide: a search in another thread
    at the same time would take this block's path."""
    saved = faiss.cvar.distance_compute_blas_threshold
    small = queries < BLAS_MIN_QUERIES
    faiss.cvar.distance_compute_blas_threshold = DIRECT_SCAN_THRESHOLD if small else BLAS_SCAN_THRESHOLD
    try:
        yield
    finally:
        faiss.cvar.distance_compute_blas_threshold = saved


def _mmap_flags(faiss) -> int:
    """IO_FLAG_MMAP_IFC maps IndexFlatCodes-based storage (faiss 1.9+); an older faiss reads as before."""
    if not hasattr(faiss, "IO_FLAG_MMAP_IFC"):
        return 0
    return faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY


def _set_search_parameter(space, index, name: str, value: int) -> None:
    try:
        space.set_index_parameter(index, name, value)
    except RuntimeError:
        logger.warning("%s=%d does not apply to a %s index; ignored", name, value, type(index).__name__)


class TorchExactSearcher:
    """Exact inner-product search with the embeddings in torch, row-sharded over devices.

    On GPUs the shards are fp16 (half the memory of faiss's fp32 flat index, no faiss-gpu needed); on CPU
    they are float32 because CPU half-precision matmul is slow.
    """

    def __init__(self, shards: Iterable[np.ndarray], devices: list[str]):
        import torch

        self._torch = torch
        self.devices = [torch.device(d) for d in devices]
        self.dtype = torch.float16 if self.devices[0].type == "cuda" else torch.float32
        shards = list(shards)
        offsets = np.cumsum([0] + [len(s) for s in shards])
        total = int(offsets[-1])
        bounds = np.linspace(0, total, len(self.devices) + 1).astype(np.int64)
        self._blocks = []
        # One device block at a time on the host: a 21M x 768 fp16 corpus never sits in RAM twice.
        for number, device in enumerate(self.devices):
            host = _gather_rows(shards, offsets, int(bounds[number]), int(bounds[number + 1]))
            self._blocks.append((int(bounds[number]), torch.from_numpy(host).to(device=device, dtype=self.dtype)))
        self.ntotal = int(total)
        self.device = self.devices[0].type
        logger.info("exact torch search over %d vectors on %s (%s)", total, devices, self.dtype)

    @classmethod
    def load(cls, index_dir: str | os.PathLike, devices: list[str]) -> TorchExactSearcher:
        return cls(iter_embedding_shards(index_dir), devices)

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        torch = self._torch
        all_scores, all_positions = [], []
        with torch.inference_mode():
            for offset, block in self._blocks:
                queries = torch.from_numpy(np.ascontiguousarray(vectors)).to(block.device, self.dtype)
                scores = queries @ block.T
                top = torch.topk(scores, min(k, block.shape[0]), dim=1)
                all_scores.append(top.values.float().cpu())
                all_positions.append(top.indices.cpu() + offset)
        scores = torch.cat(all_scores, dim=1)
        positions = torch.cat(all_positions, dim=1)
        best = torch.topk(scores, min(k, scores.shape[1]), dim=1)
        out_scores = np.full((len(vectors), k), -np.inf, dtype=np.float32)
        out_positions = np.full((len(vectors), k), -1, dtype=np.int64)
        out_scores[:, :best.values.shape[1]] = best.values.numpy()
        out_positions[:, :best.values.shape[1]] = torch.gather(positions, 1, best.indices).numpy()
        return out_scores, out_positions


def _gather_rows(shards: list[np.ndarray], offsets: np.ndarray, low: int, high: int) -> np.ndarray:
    """Rows ``[low, high)`` of the concatenated shards, copied into one writable array."""
    parts = []
    for shard, start in zip(shards, offsets[:-1]):
        first, last = max(low, int(start)), min(high, int(start) + len(shard))
        if first < last:
            parts.append(shard[first - start:last - start])
    return np.concatenate(parts) if parts else np.zeros((0, shards[0].shape[1]), dtype=shards[0].dtype)


def cuda_devices() -> list[str]:
    try:
        import torch
    except ImportError:
        return []
    return [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
