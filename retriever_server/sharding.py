"""Sharded indexes: N contiguous slices of a built index, each a complete index folder of its own.

``shard_index(index_dir, out_dir, N)`` cuts a finished index (dense of any faiss type, or BM25) without
re-encoding anything: shard ``i`` holds passages ``[start_i, start_i + count_i)`` as its own
``corpus.arrow``, embeddings, faiss index (the parent's trained index, emptied and refilled with the slice)
or BM25 matrix, and its own ``manifest.json`` with a ``shard`` entry, so each shard loads and is checked on
its own. The parent folder is then ``manifest.json`` of kind ``sharded`` listing the shards.

BM25 shards keep the whole corpus's statistics: the parent's precomputed term-document scores (document
frequencies and average length over the whole corpus) are sliced by document, so a shard scores each
passage exactly as the unsharded index does, and the merged top-k equals the unsharded one.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from retriever_server.bm25 import BM25_DIR
from retriever_server.corpus import CORPUS_NAME, CORPUS_SCHEMA
from retriever_server.dense import EMBEDDINGS_DIR, FAISS_INDEX_NAME, iter_embedding_shards
from retriever_server.manifest import MANIFEST_NAME, Manifest, ManifestError, check_files, describe_file

logger = logging.getLogger(__name__)

SHARD_DIR_FORMAT = "shard-{:05d}"
_BM25_MATRIX = ("data", "indices", "indptr")


@dataclass(frozen=True)
class ShardInfo:
    """One shard of a sharded index: its folder (relative to the parent) and its global passage range."""

    dir: str
    number: int
    start: int
    count: int

    @classmethod
    def from_dict(cls, data: dict) -> ShardInfo:
        return cls(data["dir"], int(data["number"]), int(data["start"]), int(data["count"]))


def shard_bounds(total: int, num_shards: int) -> list[tuple[int, int]]:
    """``num_shards`` contiguous ``(start, count)`` ranges covering ``total`` passages, sizes within one."""
    if not 1 <= num_shards <= total:
        raise ValueError(f"cannot cut {total} passages into {num_shards} shards")
    edges = np.linspace(0, total, num_shards + 1).astype(np.int64)
    return [(int(low), int(high - low)) for low, high in zip(edges[:-1], edges[1:])]


def read_shards(index_dir: str | os.PathLike) -> list[ShardInfo]:
    """The shards of a sharded index folder, checked to cover its corpus without gap or overlap."""
    manifest = Manifest.read(index_dir)
    if manifest.kind != "sharded":
        raise ManifestError(f"{index_dir} is a {manifest.kind} index, not a sharded one")
    shards = [ShardInfo.from_dict(entry) for entry in manifest.shards or []]
    position = 0
    for shard in shards:
        if shard.start != position:
            raise ManifestError(f"{index_dir}: shard {shard.number} starts at {shard.start}, expected {position}")
        position += shard.count
    if not shards or position != manifest.corpus["count"]:
        raise ManifestError(f"{index_dir}: the shards cover {position} of {manifest.corpus['count']} passages")
    return shards


def shard_index(index_dir: str | os.PathLike, out_dir: str | os.PathLike, num_shards: int,
                overwrite: bool = False) -> Manifest:
    """Cut the finished index in ``index_dir`` into ``num_shards`` shard folders under ``out_dir``."""
    index_dir, out_dir = Path(index_dir), Path(out_dir)
    parent = Manifest.read(index_dir)
    if parent.kind == "sharded":
        raise ManifestError(f"{index_dir} is sharded already")
    check_files(parent, index_dir, checksums=False)
    if (out_dir / MANIFEST_NAME).exists() and not overwrite:
        raise ManifestError(f"{out_dir} already holds an index; pass --overwrite to replace it")
    out_dir.mkdir(parents=True, exist_ok=True)
    table = pa.ipc.open_file(pa.memory_map(str(index_dir / CORPUS_NAME), "r")).read_all()
    entries = []
    for number, (start, count) in enumerate(shard_bounds(table.num_rows, num_shards)):
        shard = ShardInfo(SHARD_DIR_FORMAT.format(number), number, start, count)
        _write_shard(index_dir, out_dir, parent, shard, table.slice(start, count), num_shards)
        entries.append(shard.__dict__)
        logger.info("shard %d of %d: passages %d to %d", number + 1, num_shards, start, start + count - 1)
    sharded = Manifest(kind="sharded", corpus=dict(parent.corpus), encoder=copy.deepcopy(parent.encoder),
                       index={**parent.index, "kind": parent.kind, "num_shards": num_shards}, shards=entries,
                       builder=parent.builder)
    sharded.write(out_dir)  # last: a folder without it is an unfinished sharding
    return sharded


def _write_shard(index_dir: Path, out_dir: Path, parent: Manifest, shard: ShardInfo, rows: pa.Table,
                 num_shards: int) -> None:
    final = out_dir / shard.dir
    partial = out_dir / f"{shard.dir}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    with pa.OSFile(str(partial / CORPUS_NAME), "wb") as sink, pa.ipc.new_file(sink, CORPUS_SCHEMA) as writer:
        writer.write_table(rows.select(["id", "contents"]))
    if parent.kind == "dense":
        _write_dense_shard(index_dir, partial, shard)
    else:
        _write_bm25_shard(index_dir, partial, shard)
    manifest = copy.deepcopy(parent)
    manifest.corpus = {**parent.corpus, "count": shard.count}
    manifest.index = {**parent.index, "ntotal": shard.count}
    manifest.shard = {"number": shard.number, "of": num_shards, "start": shard.start, "count": shard.count}
    manifest.files = {name: describe_file(partial / name) for name in _files_of(partial)}
    manifest.write(partial)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)


def _write_dense_shard(index_dir: Path, shard_dir: Path, shard: ShardInfo) -> None:
    import faiss

    vectors = _embedding_rows(index_dir, shard.start, shard.start + shard.count)
    (shard_dir / EMBEDDINGS_DIR).mkdir()
    np.save(shard_dir / EMBEDDINGS_DIR / "shard-00000.npy", vectors, allow_pickle=False)
    index = faiss.read_index(str(index_dir / FAISS_INDEX_NAME))
    index.reset()  # keeps what training learned (IVF centroids, PQ codebooks): only the vectors go
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    faiss.write_index(index, str(shard_dir / FAISS_INDEX_NAME))


def _embedding_rows(index_dir: Path, low: int, high: int) -> np.ndarray:
    parts, offset = [], 0
    for block in iter_embedding_shards(index_dir):
        first, last = max(low, offset), min(high, offset + len(block))
        if first < last:
            parts.append(np.asarray(block[first - offset:last - offset]))
        offset += len(block)
    return np.concatenate(parts)


def _write_bm25_shard(index_dir: Path, shard_dir: Path, shard: ShardInfo) -> None:
    source, target = index_dir / BM25_DIR, shard_dir / BM25_DIR
    target.mkdir()
    matrix = {name: np.load(source / f"{name}.csc.index.npy", allow_pickle=False) for name in _BM25_MATRIX}
    # Columns are terms, rows are documents: keep the rows of this shard, renumbered from 0.
    keep = (matrix["indices"] >= shard.start) & (matrix["indices"] < shard.start + shard.count)
    kept_before = np.concatenate([[0], np.cumsum(keep, dtype=np.int64)])
    sliced = {"data": matrix["data"][keep], "indices": (matrix["indices"][keep] - shard.start).astype(
        matrix["indices"].dtype), "indptr": kept_before[matrix["indptr"]].astype(matrix["indptr"].dtype)}
    for name, values in sliced.items():
        np.save(target / f"{name}.csc.index.npy", values, allow_pickle=False)
    params = json.loads((source / "params.index.json").read_text())
    (target / "params.index.json").write_text(json.dumps({**params, "num_docs": shard.count}, indent=4))
    written = {f"{name}.csc.index.npy" for name in _BM25_MATRIX} | {"params.index.json"}
    for path in source.iterdir():  # the vocabulary and anything else bm25s saved: the same for every shard
        if path.is_file() and path.name not in written:
            shutil.copy(path, target / path.name)


def _files_of(shard_dir: Path) -> list[str]:
    return sorted(str(path.relative_to(shard_dir)) for path in shard_dir.rglob("*")
                  if path.is_file() and path.name != MANIFEST_NAME)
