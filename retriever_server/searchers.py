"""How one index folder is searched in a process: the load options and the searcher they choose.

The serving process (:mod:`retriever_server.service`) and each shard replica on Ray
(:mod:`retriever_server.ray_serve`) load their searchers here, with the same options.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from retriever_server.bm25 import Bm25Searcher
from retriever_server.cpus import usable_cpus
from retriever_server.dense import (
    EXACT_INDEX_TYPES,
    FaissSearcher,
    TorchExactSearcher,
    cuda_devices,
    faiss_gpu_available,
)
from retriever_server.manifest import Manifest, ManifestError
from retriever_server.sharded import ShardDeployer

SEARCH_BACKENDS = ("auto", "faiss", "faiss-gpu", "torch")


@dataclass(frozen=True)
class LoadOptions:
    """How to load an index (CLI flags of ``ragr1-retriever serve`` with the same names)."""

    encoder: str | None = None  # default: the encoder named in the manifest
    encoder_device: str = "auto"
    encoder_backend: str = "torch"  # fp32 reference; "auto": the fastest that keeps its results (encoder_choice)
    encoder_batch_size: int = 128
    search_backend: str = "auto"
    search_devices: tuple[str, ...] = ()  # torch backend; default: every visible GPU
    omp_threads: int = 0  # 0: the CPUs this process may use (affinity and cgroup quota, see cpus.py)
    torch_threads: int = 0  # 0: the same
    nprobe: int | None = None
    ef_search: int | None = None
    rerank_factor: int | None = None  # a "...,RFlat" index: candidates per result re-ranked in fp32
    corpus: str | None = None  # default: corpus.arrow in the index folder
    verify_checksums: bool = False
    cache_size: int = 100_000
    document_cache_mib: float = 64.0  # JSON text of recently returned documents (responses.py)
    mmap_index: bool = True  # faiss codes memory-mapped from the index file rather than read into memory
    check_memory: bool = True  # refuse, before loading, an index whose plan does not fit (see plan.py)
    reserve_memory_gib: float = 0.0  # memory on each device to keep free for other processes
    deployer: ShardDeployer | None = None  # serves a sharded index's shards elsewhere (ray_serve.RayDeployer)



def search_backend(manifest: Manifest, options: LoadOptions) -> str:
    """What searches an (unsharded) index folder in this process: "bm25", "torch", "faiss-gpu" or "faiss"."""
    if manifest.kind == "bm25":
        return "bm25"
    if options.search_backend != "auto":
        return options.search_backend
    if manifest.index["type"] in EXACT_INDEX_TYPES and cuda_devices():
        return "torch"
    return "faiss-gpu" if faiss_gpu_available() else "faiss"


def load_searcher(index_dir: Path, manifest: Manifest, options: LoadOptions):
    """The searcher of one (unsharded) index folder, on the backend the options choose."""
    backend = search_backend(manifest, options)
    if backend == "bm25":
        return Bm25Searcher(index_dir, manifest.index)
    exact = manifest.index["type"] in EXACT_INDEX_TYPES
    if backend == "torch":
        if not exact:
            raise ManifestError(f"the torch backend does exact search; this index is {manifest.index['type']}")
        devices = list(options.search_devices) or cuda_devices() or ["cpu"]
        return TorchExactSearcher.load(index_dir, devices)
    if backend == "faiss-gpu" and not faiss_gpu_available():
        raise ManifestError("--search-backend faiss-gpu needs faiss-gpu and a visible GPU")
    omp_threads = options.omp_threads or usable_cpus()
    return FaissSearcher.load(index_dir, use_gpu=backend == "faiss-gpu", mmap=options.mmap_index,
                              omp_threads=omp_threads,
                              nprobe=options.nprobe, ef_search=options.ef_search,
                              rerank_factor=options.rerank_factor)
