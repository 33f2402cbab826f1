"""Memory plan of a (sharded) index, computed from manifests and shapes before anything is loaded.

Every shard has a :class:`ShardPlan`: its passages, the bytes of its vectors, of its int64 ids, of its
search workspace, and of its memory-mapped ``corpus.arrow``. ``resident_bytes`` is what must fit in the
free memory of the device that searches the shard:

* ``cuda`` with an exact index (``Flat``): the torch backend keeps the fp16 embeddings on the GPU
  (``passages * dim * 2``) and, per batch, a ``[batch, passages]`` fp16 score matrix; positions are
  computed per batch, so no per-passage ids sit on the GPU.
* ``cuda`` with another index type: faiss-gpu holds the index (its file size) and its ids, plus the
  temporary memory its ``StandardGpuResources`` reserve.
* ``cpu``: faiss reads the whole index file into memory (``Flat`` is ``passages * dim * 4``), plus ids.
  BM25 shards always search on CPU.

The corpus is memory-mapped: its pages are page cache that the kernel may drop, so it is reported but not
part of ``resident_bytes``. :func:`check_placement` places the shards on the devices that
:func:`available_memory` reports (first fit, largest shard first) and names every shard that does not fit.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from retriever_server.bm25 import BM25_DIR
from retriever_server.corpus import CORPUS_NAME
from retriever_server.dense import EXACT_INDEX_TYPES, FAISS_INDEX_NAME
from retriever_server.manifest import Manifest
from retriever_server.sharding import read_shards, shard_bounds

logger = logging.getLogger(__name__)

KIB, MIB, GIB = 1024, 1024 ** 2, 1024 ** 3
ID_BYTES = 8  # int64 per passage: faiss labels / IVF list ids, and the position arrays around them
DEFAULT_BATCH_QUERIES = 512  # `ragr1-retriever serve --max-batch-queries`: a shard gets the whole batch
CUDA_CONTEXT_BYTES = 512 * MIB  # about a CUDA context's size: each shard replica is a process with its own
FAISS_GPU_TEMP_BYTES = 1536 * MIB  # faiss-gpu's default temporary memory on a GPU of more than 8 GiB
SHARD_DEVICES = ("cpu", "cuda")
SUPPORTED_SHAPE_TYPES = ("Flat", "IDMap,Flat", "HNSW<M>[,Flat]", "IVF<n>,Flat", "IVF<n>,PQ<m>[x<bits>]",
                         "SQ8", "SQfp16", "SQ8,RFlat", "IVF<n>,SQ8")
_BM25_PER_TERM_PREFIX = "indptr"  # one entry per vocabulary term: every BM25 shard holds it whole


@dataclass(frozen=True)
class ShardPlan:
    """The memory one shard needs. ``search``: "torch" (exact fp16 on GPU), "faiss", "faiss-gpu", "bm25s"."""

    number: int
    passages: int
    vector_bytes: int
    id_bytes: int
    corpus_bytes: int
    device: str
    search: str = "faiss"
    workspace_bytes: int = 0

    @property
    def ids_resident(self) -> bool:
        return self.search != "torch"

    @property
    def resident_bytes(self) -> int:
        """What must sit in the device's memory; the memory-mapped corpus is not part of it."""
        return self.vector_bytes + (self.id_bytes if self.ids_resident else 0) + self.workspace_bytes


@dataclass(frozen=True)
class DeviceMemory:
    """Free memory of one device: a GPU, a host, or a Ray node. ``free_bytes`` None: unknown."""

    name: str
    free_bytes: int | None


class PlacementError(RuntimeError):
    """The shards do not fit in the free memory of the devices; the message names each shard that does not."""


# --- plans of built indexes --------------------------------------------------------------------------


@dataclass(frozen=True)
class _FolderSizes:
    """Byte sizes of an index folder's served files, from its manifest (nothing is opened)."""

    corpus: int
    faiss: int
    bm25_rows: int  # grows with the passages: scores and document ids of the term-document matrix
    bm25_terms: int  # one entry per term: repeated in full in every shard

    @classmethod
    def of(cls, manifest: Manifest) -> _FolderSizes:
        sizes = {name: int(entry["size"]) for name, entry in manifest.files.items()}
        bm25 = {name: size for name, size in sizes.items()
                if name.startswith(f"{BM25_DIR}/") and name.endswith(".npy")}
        per_term = sum(size for name, size in bm25.items()
                       if Path(name).name.startswith(_BM25_PER_TERM_PREFIX))
        return cls(corpus=sizes.get(CORPUS_NAME, 0), faiss=sizes.get(FAISS_INDEX_NAME, 0),
                   bm25_rows=sum(bm25.values()) - per_term, bm25_terms=per_term)

    def share(self, count: int, total: int) -> _FolderSizes:
        """The sizes of a contiguous slice of ``count`` of ``total`` passages, in proportion."""
        return _FolderSizes(corpus=self.corpus * count // total, faiss=self.faiss * count // total,
                            bm25_rows=self.bm25_rows * count // total, bm25_terms=self.bm25_terms)


def plan_index(index_dir: str | os.PathLike, num_shards: int | None = None, shard_device: str = "cpu", *,
               batch_queries: int = DEFAULT_BATCH_QUERIES) -> list[ShardPlan]:
    """One plan per shard of a sharded folder, or per hypothetical contiguous slice of an unsharded one."""
    manifest = Manifest.read(index_dir)
    if manifest.kind != "sharded":
        plans = _hypothetical_plans(manifest, num_shards or 1, shard_device, batch_queries)
    else:
        infos = read_shards(index_dir)
        if num_shards not in (None, len(infos)):
            raise ValueError(f"{index_dir} is cut into {len(infos)} shards, not {num_shards}: plan the "
                             "unsharded index to try another number of shards")
        plans = [_measured_plan(Path(index_dir, info.dir), info.number, shard_device, batch_queries)
                 for info in infos]
    logger.info("planned %d shard(s) of %s on %s: %s resident in all", len(plans), index_dir, shard_device,
                human_bytes(sum(plan.resident_bytes for plan in plans)))
    return plans


def _measured_plan(shard_dir: Path, number: int, device: str, batch_queries: int) -> ShardPlan:
    manifest = Manifest.read(shard_dir)
    return _plan_of(manifest, number, int(manifest.corpus["count"]), _FolderSizes.of(manifest), device,
                    batch_queries)


def _hypothetical_plans(manifest: Manifest, num_shards: int, device: str,
                        batch_queries: int) -> list[ShardPlan]:
    total = int(manifest.corpus["count"])
    sizes = _FolderSizes.of(manifest)
    return [_plan_of(manifest, number, count, sizes.share(count, total), device, batch_queries)
            for number, (_, count) in enumerate(shard_bounds(total, num_shards))]


def _plan_of(manifest: Manifest, number: int, passages: int, sizes: _FolderSizes, device: str,
             batch_queries: int) -> ShardPlan:
    search = _search_kind(manifest.kind, manifest.index.get("type", ""), device)
    if search == "torch":  # the fp16 embeddings go to the GPU as they are; the faiss file is not read
        vectors = passages * int((manifest.encoder or {})["dim"]) * 2
    elif search == "bm25s":
        vectors = sizes.bm25_rows + sizes.bm25_terms
    else:
        vectors = sizes.faiss
    return ShardPlan(number, passages, vectors, ID_BYTES * passages, sizes.corpus, device, search,
                     _workspace_bytes(search, passages, batch_queries))


def _search_kind(kind: str, index_type: str, device: str) -> str:
    """The searcher a shard replica loads on ``device`` (as ``ray_serve`` chooses the backend)."""
    if device not in SHARD_DEVICES:
        raise ValueError(f"shard device must be one of {', '.join(SHARD_DEVICES)}, got {device!r}")
    if kind == "bm25":
        if device != "cpu":
            raise ValueError("a BM25 index searches on CPU: plan it with shard device cpu")
        return "bm25s"
    if device == "cpu":
        return "faiss"
    return "torch" if index_type in EXACT_INDEX_TYPES else "faiss-gpu"


def _workspace_bytes(search: str, passages: int, batch_queries: int) -> int:
    if search == "torch":
        # `queries @ block.T` materialises a [batch, passages] fp16 score matrix before topk.
        return CUDA_CONTEXT_BYTES + batch_queries * passages * 2
    if search == "faiss-gpu":
        return CUDA_CONTEXT_BYTES + FAISS_GPU_TEMP_BYTES
    # faiss on CPU scores in blocks of 4096 queries x 1024 vectors (16 MiB); bm25s per query: negligible.
    return 0


# --- plans of indexes not built yet ------------------------------------------------------------------


def plan_from_shape(passages: int, dim: int, index_type: str = "Flat", num_shards: int = 1,
                    shard_device: str = "cuda", corpus_bytes_per_passage: int = 700, *,
                    batch_queries: int = DEFAULT_BATCH_QUERIES) -> list[ShardPlan]:
    """Plans of ``num_shards`` contiguous slices of a dense index of ``passages`` vectors of ``dim``."""
    if passages < 1 or dim < 1:
        raise ValueError(f"passages and dim must be positive, got {passages} and {dim}")
    per_vector, per_shard = _shape_bytes(index_type, dim, shard_device)
    search = _search_kind("dense", index_type, shard_device)
    return [ShardPlan(number, count, per_shard + per_vector * count, ID_BYTES * count,
                      corpus_bytes_per_passage * count, shard_device, search,
                      _workspace_bytes(search, count, batch_queries))
            for number, (_, count) in enumerate(shard_bounds(passages, num_shards))]


def _shape_bytes(index_type: str, dim: int, device: str) -> tuple[int, int]:
    """``(bytes per vector, bytes per shard)`` of a faiss factory string; the latter is what training
    learned (centroids, codebooks), which every shard keeps whole."""
    spec = index_type.replace(" ", "")
    if spec in EXACT_INDEX_TYPES:
        return (2 * dim if device == "cuda" else 4 * dim), 0
    if match := re.fullmatch(r"HNSW(\d+)(,Flat)?", spec):
        if device == "cuda":
            raise ValueError(f"faiss-gpu cannot hold an {index_type} index: plan it with shard device cpu")
        return 4 * dim + int(match[1]) * 2 * 4, 0  # level 0 links: 2*M int32 neighbours per vector
    if match := re.fullmatch(r"IVF(\d+),(Flat|SQ8|PQ(\d+)(?:x(\d+))?)", spec):
        centroids = int(match[1]) * dim * 4
        if match[2] == "Flat":
            return 4 * dim, centroids
        if match[2] == "SQ8":
            return dim, centroids + 2 * dim * 4
        subquantizers, bits = int(match[3]), int(match[4] or 8)
        return (subquantizers * bits + 7) // 8, centroids + (2 ** bits) * dim * 4
    if spec == "SQ8":
        return dim, 2 * dim * 4  # one byte per component; per-component min and range
    if spec == "SQfp16":
        return 2 * dim, 0
    if spec == "SQ8,RFlat":
        return dim + 4 * dim, 2 * dim * 4  # SQ8 codes plus the fp32 copy its candidates are re-ranked with
    raise ValueError(f"unsupported index type {index_type!r}: supported are "
                     f"{', '.join(SUPPORTED_SHAPE_TYPES)}")


# --- free memory -------------------------------------------------------------------------------------


def available_memory(shard_device: str, ray_nodes: list[dict] | None = None,
                     gpu_memory_gib: float | None = None) -> list[DeviceMemory]:
    """Free memory of every device a shard could go to: this host or its visible GPUs, or, given
    ``ray.nodes()``, the cluster's nodes (``gpu_memory_gib`` per GPU, as Ray does not report GPU memory)."""
    if shard_device not in SHARD_DEVICES:
        raise ValueError(f"shard device must be one of {', '.join(SHARD_DEVICES)}, got {shard_device!r}")
    if ray_nodes is not None:
        return _ray_memory(shard_device, ray_nodes, gpu_memory_gib)
    if shard_device == "cpu":
        return [DeviceMemory("host", _host_available_bytes())]
    return _cuda_memory()


def leave_free(devices: Sequence[DeviceMemory], reserve_bytes: int) -> list[DeviceMemory]:
    """The devices with ``reserve_bytes`` each kept for other processes (a trainer on the same node)."""
    if reserve_bytes <= 0:
        return list(devices)
    return [DeviceMemory(f"{device.name} less {human_bytes(reserve_bytes)} reserved",
                         None if device.free_bytes is None else max(0, device.free_bytes - reserve_bytes))
            for device in devices]


def assumed_devices(shard_device: str, count: int, free_gib: float) -> list[DeviceMemory]:
    """``count`` devices with ``free_gib`` free each: to plan for machines other than this one."""
    return [DeviceMemory(f"{shard_device}:{number} (assumed)", int(free_gib * GIB))
            for number in range(count)]


def _host_available_bytes() -> int:
    """MemAvailable (free plus reclaimable page cache), the kernel's own estimate of what can be allocated."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * KIB
    except OSError:
        pass
    try:
        import psutil
    except ImportError:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")  # free pages only: an underestimate
    return int(psutil.virtual_memory().available)


def _cuda_memory() -> list[DeviceMemory]:
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    devices = []
    for number in range(torch.cuda.device_count()):
        free, _ = torch.cuda.mem_get_info(number)
        devices.append(DeviceMemory(f"cuda:{number} ({torch.cuda.get_device_name(number)})", int(free)))
    return devices


def cuda_memory_of(devices: Sequence[str]) -> list[DeviceMemory]:
    """Free memory of the named CUDA devices ("cuda", "cuda:3"), in the order given."""
    by_number = {int(device.name.split(" ")[0].split(":")[1]): device for device in _cuda_memory()}
    chosen = []
    for name in devices:
        number = int(name.split(":")[1]) if ":" in name else 0
        if number not in by_number:
            raise ValueError(f"{name} is not a visible CUDA device")
        chosen.append(by_number[number])
    return chosen


def _ray_memory(shard_device: str, nodes: list[dict], gpu_memory_gib: float | None) -> list[DeviceMemory]:
    """Ray's "memory" resource (bytes) is what it will schedule on a node, set when the node started: not
    live free memory. Ray reports GPU counts but not GPU memory."""
    devices = []
    for node in nodes:
        if not node.get("Alive"):
            continue
        address = node.get("NodeManagerAddress") or node.get("NodeID", "?")
        resources = node.get("Resources") or {}
        if shard_device == "cpu":
            memory = resources.get("memory")
            devices.append(DeviceMemory(f"ray node {address}", int(memory) if memory is not None else None))
            continue
        gpus = int(resources.get("GPU", 0))
        if gpus and gpu_memory_gib is None:
            devices.append(DeviceMemory(f"ray node {address}: {gpus} GPU(s)", None))
        elif gpus:
            devices += [DeviceMemory(f"ray node {address} gpu {number}", int(gpu_memory_gib * GIB))
                        for number in range(gpus)]
    return devices


# --- placement ---------------------------------------------------------------------------------------


def place(plans: Sequence[ShardPlan], devices: Sequence[DeviceMemory], *, max_per_device: int | None = None
          ) -> tuple[dict[int, str], list[str]]:
    """First-fit-decreasing placement: ``({shard number: device name}, problems)``. ``max_per_device=1``
    models Ray's one GPU per shard replica."""
    if not plans:
        return {}, []
    unknown = [device.name for device in devices if device.free_bytes is None]
    if unknown:
        gpu = plans[0].device == "cuda"
        hint = ": Ray reports GPU counts, not GPU memory; pass --gpu-memory-gib" if gpu else ""
        return {}, [f"free memory unknown on {', '.join(unknown)}{hint}"]
    if not devices:
        return {}, [f"no {plans[0].device} device to place {len(plans)} shard(s) on"]
    free = [int(device.free_bytes) for device in devices]
    held = [0] * len(devices)
    where: dict[int, str] = {}
    problems = []
    for plan in sorted(plans, key=lambda p: (-p.resident_bytes, p.number)):
        open_slots = [i for i in range(len(devices)) if max_per_device is None or held[i] < max_per_device]
        slot = next((i for i in open_slots if free[i] >= plan.resident_bytes), None)
        if slot is None:
            problems.append(_shortfall(plan, [free[i] for i in open_slots], len(devices), max_per_device))
            continue
        free[slot] -= plan.resident_bytes
        held[slot] += 1
        where[plan.number] = devices[slot].name
    return where, problems


def _shortfall(plan: ShardPlan, open_free: list[int], device_count: int, max_per_device: int | None) -> str:
    needs = f"shard {plan.number} needs {human_bytes(plan.resident_bytes)} on {plan.device}"
    if not open_free:
        return (f"{needs} but all {device_count} device(s) already hold {max_per_device} shard(s) each "
                "(one GPU per shard replica): add devices or use fewer shards")
    most = max(open_free)
    return (f"{needs} but the most free on any device is {human_bytes(most)} "
            f"(short by {human_bytes(plan.resident_bytes - most)})")


def check_placement(plans: Sequence[ShardPlan], devices: Sequence[DeviceMemory], *,
                    max_per_device: int | None = None) -> list[str]:
    """Problems of placing the shards on the devices; empty when every shard fits."""
    return place(plans, devices, max_per_device=max_per_device)[1]


def require_placement(plans: Sequence[ShardPlan], devices: Sequence[DeviceMemory], *,
                      max_per_device: int | None = None) -> None:
    """Raise :class:`PlacementError` naming every shard that does not fit."""
    problems = check_placement(plans, devices, max_per_device=max_per_device)
    if problems:
        raise PlacementError("the index does not fit: " + "; ".join(problems))


# --- report ------------------------------------------------------------------------------------------


def human_bytes(size: int) -> str:
    """GiB with one decimal; MiB (or KiB, bytes) for what is smaller than a GiB."""
    for unit, name in ((GIB, "GiB"), (MIB, "MiB"), (KIB, "KiB")):
        if abs(size) >= unit:
            return f"{size / unit:.1f} {name}"
    return f"{size} B"


def format_plan(plans: Sequence[ShardPlan], devices: Sequence[DeviceMemory], *,
                max_per_device: int | None = None) -> str:
    """A markdown table of the shards, the devices with their free memory, then "fits" or the problems."""
    where, problems = place(plans, devices, max_per_device=max_per_device)
    lines = ["| shard | passages | vectors | ids | workspace | corpus mmap | resident | device |",
             "|---:|---:|---:|---:|---:|---:|---:|---|"]
    for plan in plans:
        ids = human_bytes(plan.id_bytes) if plan.ids_resident else "not held"
        lines.append(f"| {plan.number} | {plan.passages:,} | {human_bytes(plan.vector_bytes)} | {ids} | "
                     f"{human_bytes(plan.workspace_bytes)} | {human_bytes(plan.corpus_bytes)} | "
                     f"{human_bytes(plan.resident_bytes)} | {plan.device} ({plan.search}) -> "
                     f"{where.get(plan.number, 'not placed')} |")
    lines.append(_total_row(plans))
    lines += ["", *_notes(plans), "", "devices:"]
    lines += [f"- {device.name}: {_free_text(device)}" for device in devices] or ["- none"]
    lines.append("")
    if problems:
        lines += ["does not fit:", *[f"- {problem}" for problem in problems]]
    else:
        lines.append("fits: every shard is placed")
    return "\n".join(lines)


def _free_text(device: DeviceMemory) -> str:
    return "free memory unknown" if device.free_bytes is None else f"{human_bytes(device.free_bytes)} free"


def _total_row(plans: Sequence[ShardPlan]) -> str:
    held = [plan.id_bytes for plan in plans if plan.ids_resident]
    ids = human_bytes(sum(held)) if held else "not held"
    return (f"| total | {sum(p.passages for p in plans):,} | "
            f"{human_bytes(sum(p.vector_bytes for p in plans))} | "
            f"{ids} | {human_bytes(sum(p.workspace_bytes for p in plans))} | "
            f"{human_bytes(sum(p.corpus_bytes for p in plans))} | "
            f"{human_bytes(sum(p.resident_bytes for p in plans))} | |")


def _notes(plans: Sequence[ShardPlan]) -> list[str]:
    notes = ["resident = vectors + ids + workspace: what must fit in the free memory of the shard's device.",
             "corpus mmap: corpus.arrow is memory-mapped, so its pages are page cache on the host; reported, "
             "not required to be resident (searches read only the hits' rows)."]
    searches = {plan.search for plan in plans}
    if "torch" in searches:
        largest = max(plan.vector_bytes for plan in plans if plan.search == "torch")
        total = sum(plan.vector_bytes for plan in plans if plan.search == "torch")
        notes.append("torch (exact fp16 on GPU): workspace = CUDA context + a [batch x passages] fp16 score "
                     "matrix per batch of queries (serve --max-batch-queries); ids are computed per batch.")
        notes.append("loading: each GPU shard's fp16 vectors pass through host memory once "
                     f"({human_bytes(largest)} for the largest shard, {human_bytes(total)} if all shards "
                     "load at once on one node).")
    if "faiss-gpu" in searches:
        notes.append("faiss-gpu: workspace = CUDA context + faiss's default temporary memory (1.5 GiB).")
    if "bm25s" in searches:
        notes.append("bm25s memory-maps its arrays; they are counted as resident because every query reads "
                     "the columns of its terms.")
    return notes
