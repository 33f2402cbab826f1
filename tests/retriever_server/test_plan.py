"""The memory plan: sizes read from real built and sharded indexes (dense minilm Flat and BM25), shape
estimates for indexes not built yet, free memory, first-fit placement and its problems, the printed table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from retriever_server.builder import BuildOptions, build_index
from retriever_server.dense import FAISS_INDEX_NAME
from retriever_server.manifest import Manifest
from retriever_server.plan import (
    CUDA_CONTEXT_BYTES,
    GIB,
    DeviceMemory,
    PlacementError,
    assumed_devices,
    available_memory,
    check_placement,
    format_plan,
    human_bytes,
    plan_from_shape,
    plan_index,
    require_placement,
)
from retriever_server.sharding import shard_index

PASSAGES = 40
NPY_HEADER = 128  # numpy's .npy header of a 1-d array, per file
FAISS_HEADER_MARGIN = 256  # faiss's per-file header (type tag, dimension, counts, metric)


def _write_corpus(path: Path) -> None:
    words = ["river", "bridge", "capital", "tower", "harbour", "market", "castle", "forest"]
    with open(path, "w", encoding="utf-8") as handle:
        for number in range(PASSAGES):
            text = " ".join(words[(number + k) % len(words)] for k in range(3 + number % 5))
            handle.write(json.dumps({"id": str(number), "contents": f'"Title {number}"\n{text} {number}'}) + "\n")


@pytest.fixture(scope="session")
def built(tmp_path_factory) -> dict[str, Path]:
    """Dense (minilm, Flat) and BM25 indexes of one corpus, each whole and cut into 3 shards."""
    root = tmp_path_factory.mktemp("plan")
    _write_corpus(root / "corpus.jsonl")
    folders = {}
    for kind in ("dense", "bm25"):
        whole = root / kind
        build_index(BuildOptions(corpus=root / "corpus.jsonl", out_dir=whole, kind=kind, encoder="minilm",
                                 index_type="Flat", show_progress=False))
        shard_index(whole, root / f"{kind}-3", 3)
        folders[kind], folders[f"{kind}-3"] = whole, root / f"{kind}-3"
    return folders


def test_dense_shards_on_cpu_add_up_to_the_whole_index_file(built):
    whole_file = (built["dense"] / FAISS_INDEX_NAME).stat().st_size
    plans = plan_index(built["dense-3"], shard_device="cpu")
    assert [plan.number for plan in plans] == [0, 1, 2]
    assert sum(plan.passages for plan in plans) == Manifest.read(built["dense"]).corpus["count"] == PASSAGES
    assert abs(sum(plan.vector_bytes for plan in plans) - whole_file) <= 3 * FAISS_HEADER_MARGIN
    # Flat fp32 on CPU: 4 bytes per component plus a header; ids are held as well.
    assert all(0 <= plan.vector_bytes - plan.passages * 384 * 4 <= FAISS_HEADER_MARGIN for plan in plans)
    assert all(plan.resident_bytes == plan.vector_bytes + 8 * plan.passages for plan in plans)
    assert all(plan.corpus_bytes > 0 and plan.resident_bytes < plan.vector_bytes + plan.corpus_bytes
               for plan in plans)


def test_hypothetical_slices_of_the_whole_match_the_real_shards(built):
    real = plan_index(built["dense-3"], shard_device="cpu")
    guessed = plan_index(built["dense"], num_shards=3, shard_device="cpu")
    assert [plan.passages for plan in guessed] == [plan.passages for plan in real]
    for mine, theirs in zip(guessed, real):
        assert abs(mine.vector_bytes - theirs.vector_bytes) <= FAISS_HEADER_MARGIN
    assert [plan.passages for plan in plan_index(built["dense"])] == [PASSAGES]


def test_dense_shards_on_cuda_hold_fp16_vectors_and_a_score_matrix(built):
    plans = plan_index(built["dense-3"], shard_device="cuda", batch_queries=64)
    for plan in plans:
        fp16 = (built["dense-3"] / f"shard-{plan.number:05d}" / "embeddings" / "shard-00000.npy").stat().st_size
        assert plan.search == "torch" and plan.vector_bytes == plan.passages * 384 * 2 == fp16 - NPY_HEADER
        assert plan.workspace_bytes == CUDA_CONTEXT_BYTES + 64 * plan.passages * 2
        assert plan.resident_bytes == plan.vector_bytes + plan.workspace_bytes  # no per-passage ids on the GPU


def test_bm25_shards_slice_the_rows_and_repeat_the_per_term_array(built):
    files = Manifest.read(built["bm25"]).files
    indptr = files["bm25/indptr.csc.index.npy"]["size"]
    rows = sum(entry["size"] for name, entry in files.items() if name.endswith(".npy")) - indptr
    real = plan_index(built["bm25-3"], shard_device="cpu")
    guessed = plan_index(built["bm25"], num_shards=3)
    assert all(plan.search == "bm25s" for plan in real + guessed)
    assert sum(plan.passages for plan in real) == PASSAGES
    assert abs(sum(plan.vector_bytes for plan in real) - (rows + 3 * indptr)) <= 6 * NPY_HEADER
    assert abs(sum(plan.vector_bytes for plan in guessed) - (rows + 3 * indptr)) <= 3
    with pytest.raises(ValueError, match="BM25 index searches on CPU"):
        plan_index(built["bm25-3"], shard_device="cuda")


def test_a_sharded_folder_is_planned_with_its_own_number_of_shards(built):
    with pytest.raises(ValueError, match="cut into 3 shards, not 4"):
        plan_index(built["dense-3"], num_shards=4)


def test_shape_of_kilt_on_eight_gpus():
    plans = plan_from_shape(29_000_000, 1024, "Flat", num_shards=8, shard_device="cuda")
    assert sum(plan.vector_bytes for plan in plans) == 2 * 1024 * 29_000_000
    assert sum(plan.passages for plan in plans) == 29_000_000 and len(plans) == 8
    assert sum(plan.corpus_bytes for plan in plans) == 700 * 29_000_000
    assert all(plan.search == "torch" and plan.device == "cuda" for plan in plans)


def test_shape_sizes_per_index_type():
    dim, count = 768, 1_000_000
    assert plan_from_shape(count, dim, "Flat", shard_device="cpu")[0].vector_bytes == 4 * dim * count
    hnsw = plan_from_shape(count, dim, "HNSW32", shard_device="cpu")[0]
    assert hnsw.vector_bytes == (4 * dim + 32 * 2 * 4) * count
    pq = plan_from_shape(count, dim, "IVF4096,PQ64", shard_device="cpu")[0]
    assert pq.vector_bytes == 64 * count + 4096 * dim * 4 + 256 * dim * 4 and pq.id_bytes == 8 * count
    assert plan_from_shape(count, dim, "SQ8", shard_device="cpu")[0].vector_bytes == dim * count + 2 * dim * 4
    gpu_pq = plan_from_shape(count, dim, "IVF4096,PQ64", shard_device="cuda")[0]
    assert gpu_pq.search == "faiss-gpu" and gpu_pq.resident_bytes > gpu_pq.vector_bytes + gpu_pq.id_bytes


@pytest.mark.parametrize("index_type", ["Flat", "SQ8", "SQfp16", "SQ8,RFlat"])
def test_the_planned_bytes_of_flat_and_scalar_quantized_indexes_are_what_faiss_writes(tmp_path, index_type):
    import faiss

    dim, count = 64, 4000
    vectors = np.random.default_rng(0).standard_normal((count, dim)).astype(np.float32)
    index = faiss.index_factory(dim, index_type, faiss.METRIC_INNER_PRODUCT)
    index.train(vectors)
    index.add(vectors)
    faiss.write_index(index, str(tmp_path / "index.faiss"))
    planned = plan_from_shape(count, dim, index_type, shard_device="cpu")[0].vector_bytes
    assert planned == pytest.approx((tmp_path / "index.faiss").stat().st_size, rel=0.05)


def test_unknown_or_impossible_index_types_are_refused():
    with pytest.raises(ValueError, match=r"'LSH'.*Flat.*HNSW.*PQ.*SQ8"):
        plan_from_shape(1000, 64, "LSH")
    with pytest.raises(ValueError, match="faiss-gpu cannot hold"):
        plan_from_shape(1000, 64, "HNSW32", shard_device="cuda")


def test_placement_refuses_shards_that_do_not_fit_and_names_the_shortfall():
    plans = plan_from_shape(29_000_000, 1024, "Flat", num_shards=8, shard_device="cuda")
    needs = plans[0].resident_bytes
    problems = check_placement(plans, assumed_devices("cuda", 8, 8.0))
    assert len(problems) == 8
    assert problems[0] == (f"shard 0 needs {human_bytes(needs)} on cuda but the most free on any device is "
                           f"8.0 GiB (short by {human_bytes(needs - 8 * GIB)})")
    # Two shards share a 24 GiB GPU; the fifth finds only what the first four left.
    problems = check_placement(plans[:5], assumed_devices("cuda", 2, 24.0))
    assert problems == [f"shard 4 needs {human_bytes(needs)} on cuda but the most free on any device is "
                        f"{human_bytes(24 * GIB - 2 * needs)} (short by {human_bytes(3 * needs - 24 * GIB)})"]
    assert "already hold 1 shard(s)" in check_placement(plans[:3], assumed_devices("cuda", 2, 80.0),
                                                        max_per_device=1)[0]
    with pytest.raises(PlacementError, match="shard 4 needs"):
        require_placement(plans[:5], assumed_devices("cuda", 2, 24.0))


def test_placement_accepts_shards_that_fit(built):
    assert check_placement(plan_from_shape(29_000_000, 1024, num_shards=8), assumed_devices("cuda", 8, 24.0),
                           max_per_device=1) == []
    plans = plan_index(built["dense-3"], shard_device="cpu")
    require_placement(plans, [DeviceMemory("host", sum(plan.resident_bytes for plan in plans))])


def test_free_memory_of_this_host_and_its_gpus():
    [host] = available_memory("cpu")
    total = int(next(line for line in open("/proc/meminfo") if line.startswith("MemTotal")).split()[1]) * 1024
    assert 0 < host.free_bytes <= total
    assert all(device.free_bytes > 0 for device in available_memory("cuda"))  # none on a machine without CUDA


def test_free_memory_of_ray_nodes():
    nodes = [{"NodeID": "a1", "Alive": True, "NodeManagerAddress": "10.0.0.1",
              "Resources": {"CPU": 16.0, "GPU": 2.0, "memory": 64 * GIB, "node:10.0.0.1": 1.0}},
             {"NodeID": "b2", "Alive": True, "NodeManagerAddress": "10.0.0.2",
              "Resources": {"CPU": 8.0, "memory": 32 * GIB}},
             {"NodeID": "c3", "Alive": False, "NodeManagerAddress": "10.0.0.3", "Resources": {}}]
    assert available_memory("cpu", nodes) == [DeviceMemory("ray node 10.0.0.1", 64 * GIB),
                                              DeviceMemory("ray node 10.0.0.2", 32 * GIB)]
    unknown = available_memory("cuda", nodes)
    assert unknown == [DeviceMemory("ray node 10.0.0.1: 2 GPU(s)", None)]
    assert "--gpu-memory-gib" in check_placement(plan_from_shape(1000, 64), unknown)[0]
    assert available_memory("cuda", nodes, gpu_memory_gib=80) == [
        DeviceMemory("ray node 10.0.0.1 gpu 0", 80 * GIB), DeviceMemory("ray node 10.0.0.1 gpu 1", 80 * GIB)]


def test_format_plan_lists_every_shard_and_the_verdict(built):
    plans = plan_index(built["dense-3"], shard_device="cpu")
    text = format_plan(plans, [DeviceMemory("host", 64 * GIB)])
    assert all(f"\n| {plan.number} | {plan.passages:,} |" in text for plan in plans)
    assert f"| total | {PASSAGES:,} |" in text and "host: 64.0 GiB free" in text
    assert "not required to be resident" in text and text.endswith("fits: every shard is placed")
    shapes = plan_from_shape(21_000_000, 768, num_shards=8, shard_device="cuda")
    text = format_plan(shapes, assumed_devices("cuda", 1, 24.0))
    assert "does not fit:" in text and "shard 3 needs 6.8 GiB on cuda" in text and "| 7 | 2,625,000 |" in text


def test_the_service_refuses_an_index_that_does_not_fit_before_loading_anything(built, tmp_path):
    from retriever_server.batcher import BatchingConfig
    from retriever_server.service import LoadOptions, RetrievalService

    # An encoder and a corpus that do not exist: had either been loaded first, their error would show.
    options = LoadOptions(encoder=str(tmp_path / "no-encoder"), corpus=str(tmp_path / "no-corpus.arrow"),
                          reserve_memory_gib=1e6)
    for folder in (built["dense"], built["dense-3"], built["bm25-3"]):
        service = RetrievalService(folder, options, BatchingConfig())
        with pytest.raises(PlacementError, match=r"shard 0 needs .* on cpu but the most free .* \(short by "):
            service.load()
        assert service.state == "failed" and "does not fit" in service.error and service.batcher is None
    loaded = RetrievalService(built["bm25-3"], LoadOptions(reserve_memory_gib=1e6, check_memory=False),
                              BatchingConfig())
    loaded.load()  # the check can be skipped
    assert loaded.ready
    loaded.close()


def _plan_cli(*args: str):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "retriever_server.cli", "plan", *args], capture_output=True,
                          text=True, timeout=120)


def test_plan_command_for_kilt_on_eight_gpus():
    shape = ["--passages", "29000000", "--dim", "1024", "--shards", "8", "--shard-device", "cuda"]
    fits = _plan_cli(*shape, "--devices", "8", "--free-gib", "24")
    assert fits.returncode == 0, fits.stderr
    assert "| 7 | 3,625,000 |" in fits.stdout and fits.stdout.rstrip().endswith("fits: every shard is placed")
    short = _plan_cli(*shape, "--devices", "8", "--free-gib", "10")
    assert short.returncode == 1
    assert "does not fit:" in short.stdout and "shard 0 needs" in short.stdout
    too_few = _plan_cli(*shape, "--devices", "7", "--free-gib", "80")
    assert too_few.returncode == 1 and "already hold 1 shard(s)" in too_few.stdout
    bad = _plan_cli("--passages", "1000", "--devices", "1", "--free-gib", "1")
    assert bad.returncode != 0 and "--passages needs --dim" in bad.stderr


def test_plan_command_for_a_built_index_on_this_host(built):
    result = _plan_cli("--index", str(built["dense-3"]))
    assert result.returncode == 0, result.stderr
    assert "| 2 |" in result.stdout and "- host:" in result.stdout
    reserved = _plan_cli("--index", str(built["dense"]), "--shards", "2", "--reserve-memory-gib", "1000000")
    assert reserved.returncode == 1 and "reserved" in reserved.stdout and "shard 1 needs" in reserved.stdout
