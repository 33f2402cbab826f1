import json
import shutil

import numpy as np
import pytest

from retriever_server.builder import BuildError, BuildOptions, build_index
from retriever_server.corpus import Corpus
from retriever_server.dense import FaissSearcher, TorchExactSearcher, embedding_shards
from retriever_server.encoders import TextEncoder, infer_encoder_spec
from retriever_server.manifest import Manifest
from tests.retriever_server.helpers import write_generated_corpus

COUNT = 1200


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("generated")
    contents = write_generated_corpus(root / "corpus.jsonl", COUNT)
    flat = root / "flat"
    build_index(BuildOptions(corpus=root / "corpus.jsonl", out_dir=flat, shard_size=500, show_progress=False))
    return root, flat, contents


def test_dense_build_writes_fp16_shards_index_and_manifest(generated):
    root, flat, contents = generated
    manifest = Manifest.read(flat)
    assert manifest.kind == "dense"
    assert manifest.corpus["count"] == COUNT and manifest.index["ntotal"] == COUNT
    assert manifest.encoder["spec"]["name"] == "minilm" and manifest.encoder["dim"] == 384
    assert len(manifest.encoder["probe_embedding"]) == 384
    shards = embedding_shards(flat)
    assert [len(np.load(s, allow_pickle=False)) for s in shards] == [500, 500, 200]
    assert all(np.load(s, allow_pickle=False).dtype == np.float16 for s in shards)
    assert set(manifest.files) == {"corpus.arrow", "index.faiss"} | {f"embeddings/{s.name}" for s in shards}
    assert Corpus(flat / "corpus.arrow").documents([5])[0]["contents"] == contents[5]


def test_interrupted_build_resumes_without_redoing_finished_shards(generated, tmp_path, monkeypatch):
    root, flat, _ = generated
    out = tmp_path / "resumed"
    calls = []
    real_encode = TextEncoder.encode_passages

    def failing_after_first_shard(self, texts):
        calls.append(len(texts))
        if sum(calls) > 500:
            raise KeyboardInterrupt("simulated interruption")
        return real_encode(self, texts)

    monkeypatch.setattr(TextEncoder, "encode_passages", failing_after_first_shard)
    options = BuildOptions(corpus=root / "corpus.jsonl", out_dir=out, shard_size=500, batch_size=100,
                           show_progress=False)
    with pytest.raises(KeyboardInterrupt):
        build_index(options)
    assert not (out / "manifest.json").exists()
    assert [s.name for s in embedding_shards(out)] == ["shard-00000.npy"]
    assert not list(out.rglob("*.partial*"))

    calls.clear()
    monkeypatch.setattr(TextEncoder, "encode_passages", lambda self, texts: calls.append(len(texts)) or
                        real_encode(self, texts))
    build_index(options)
    assert sum(calls) == COUNT - 500
    for ours, reference in zip(embedding_shards(out), embedding_shards(flat)):
        np.testing.assert_allclose(np.load(ours).astype(np.float32), np.load(reference).astype(np.float32),
                                   atol=2e-3)


def test_resume_refuses_a_different_encoder_setup(generated, tmp_path):
    root, _, _ = generated
    out = tmp_path / "partial"
    out.mkdir()
    (out / "build.json").write_text(json.dumps({"kind": "dense", "source_sha256": "0" * 64, "shard_size": 500,
                                                "encoder": None}))
    with pytest.raises(BuildError, match="different source_sha256, encoder"):
        build_index(BuildOptions(corpus=root / "corpus.jsonl", out_dir=out, shard_size=500, show_progress=False))


def test_finished_index_is_not_overwritten_by_accident(generated):
    root, flat, _ = generated
    with pytest.raises(BuildError, match="--overwrite"):
        build_index(BuildOptions(corpus=root / "corpus.jsonl", out_dir=flat, show_progress=False))


def _queries(encoder: TextEncoder) -> np.ndarray:
    texts = [f"the {s} of {p} known for {t}" for s, p, t in zip(
        ["harbour", "library", "canal", "museum", "glacier"] * 20, ["Brisca", "Norvik", "Oakhelm", "Jorrin"] * 25,
        ["salt trade", "a clock tower", "rare orchids", "glass making", "winter fairs"] * 20)]
    return encoder.encode_queries(texts)


@pytest.mark.slow
@pytest.mark.parametrize("index_type, options, min_recall", [
    ("HNSW32", {"ef_search": 64}, 0.95),
    ("IVF16,Flat", {"nprobe": 4}, 0.8),
    ("SQ8", {}, 0.95),
    ("SQfp16", {}, 0.99),  # half the bytes of Flat
    ("SQ8,RFlat", {"rerank_factor": 4}, 0.99),  # SQ8's candidates re-ranked with the fp32 vectors
    ("IVF16,PQ96x4", {"nprobe": 16}, 0.6),  # 48 bytes a vector, as PQ48 with 8 bits, which trains for minutes
])
def test_index_types_recall_against_flat(generated, tmp_path, index_type, options, min_recall):
    root, flat, _ = generated
    out = tmp_path / index_type.replace(",", "_")
    out.mkdir()
    for name in ("corpus.arrow", "build.json"):
        shutil.copy(flat / name, out / name)
    shutil.copytree(flat / "embeddings", out / "embeddings")
    build_index(BuildOptions(corpus=root / "corpus.jsonl", out_dir=out, shard_size=500, index_type=index_type,
                             train_size=COUNT, show_progress=False))
    encoder = TextEncoder(infer_encoder_spec("minilm"), device="cpu")
    queries = _queries(encoder)
    _, exact = FaissSearcher.load(flat, use_gpu=False, omp_threads=1).search(queries, 3)
    _, approx = FaissSearcher.load(out, use_gpu=False, omp_threads=1, **options).search(queries, 3)
    recall = np.mean([len(set(a) & set(e)) / 3 for a, e in zip(approx, exact)])
    assert recall >= min_recall, f"{index_type} recall@3 {recall:.3f}"


def test_torch_exact_search_sharded_matches_faiss_flat(generated):
    _, flat, _ = generated
    encoder = TextEncoder(infer_encoder_spec("minilm"), device="cpu")
    queries = _queries(encoder)
    faiss_scores, faiss_ids = FaissSearcher.load(flat, use_gpu=False, omp_threads=1).search(queries, 5)
    torch_scores, torch_ids = TorchExactSearcher.load(flat, ["cpu", "cpu", "cpu"]).search(queries, 5)
    np.testing.assert_allclose(torch_scores, faiss_scores, atol=1e-4)
    agree = np.mean([set(a) == set(b) for a, b in zip(torch_ids, faiss_ids)])
    assert agree > 0.97  # ties between equal scores may order differently


def test_bm25_build(generated, tmp_path):
    root, _, _ = generated
    manifest = build_index(BuildOptions(corpus=root / "corpus.jsonl", out_dir=tmp_path / "bm25", kind="bm25",
                                        show_progress=False))
    assert manifest.kind == "bm25" and manifest.index["ntotal"] == COUNT and manifest.encoder is None
    assert any(name.startswith("bm25/") for name in manifest.files)
    assert not (tmp_path / "bm25" / "bm25.partial").exists()


class _ThresholdProbe:
    """A stand-in faiss index that records the BLAS threshold faiss would read during its search."""

    ntotal, d = 10, 384

    def __init__(self):
        self.seen: list[int] = []

    def search(self, vectors, k):
        import faiss

        self.seen.append(faiss.cvar.distance_compute_blas_threshold)
        return np.zeros((len(vectors), k), np.float32), np.zeros((len(vectors), k), np.int64)


def test_a_flat_scan_path_follows_the_batch_size_whatever_faiss_compares():
    """During a search, a lone query takes the direct scan and a batch the BLAS path, whether faiss compares
    its threshold with the query count (older releases) or with queries x dimension (1.15): a setting in
    query counts, as this project once wrote, sent even one 384-d query down the BLAS path under the newer
    rule. After the search, faiss's own setting is back, for the rest of the process (k-means in a build)."""
    import faiss

    from retriever_server.dense import BLAS_MIN_QUERIES

    probe = _ThresholdProbe()
    searcher = FaissSearcher(probe, omp_threads=1)
    before = faiss.cvar.distance_compute_blas_threshold
    sizes = [1, BLAS_MIN_QUERIES - 1, BLAS_MIN_QUERIES, 64]
    for size in sizes:
        searcher.search(np.zeros((size, probe.d), np.float32), 3)
        assert faiss.cvar.distance_compute_blas_threshold == before
    direct = [(size < threshold, size * probe.d < threshold) for size, threshold in zip(sizes, probe.seen)]
    assert direct == [(True, True), (True, True), (False, False), (False, False)]  # (old rule, new rule)


def test_one_query_at_a_time_finds_what_a_batch_finds(generated):
    """A few queries take faiss's direct scan, a batch its BLAS path (dense.BLAS_MIN_QUERIES): same passages."""
    from retriever_server.dense import BLAS_MIN_QUERIES

    _, flat, _ = generated
    searcher = FaissSearcher.load(flat, use_gpu=False, omp_threads=1)
    queries = _queries(TextEncoder(infer_encoder_spec("minilm"), device="cpu"))
    assert len(queries) >= BLAS_MIN_QUERIES
    _, batched = searcher.search(queries, 3)
    alone = np.concatenate([searcher.search(queries[row:row + 1], 3)[1] for row in range(len(queries))])
    np.testing.assert_array_equal(alone, batched)
