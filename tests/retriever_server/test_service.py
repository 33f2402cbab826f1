"""The server refuses to run with an encoder, corpus or file that does not match its index."""

import json
import shutil

import pytest

from retriever_server.batcher import BatchingConfig
from retriever_server.corpus import write_corpus_arrow
from retriever_server.demo import DEMO_CORPUS
from retriever_server.encoders import resolve_model_path
from retriever_server.manifest import ManifestError
from retriever_server.service import LoadOptions, RetrievalService


@pytest.fixture
def index_copy(demo_index, tmp_path):
    target = tmp_path / "index"
    shutil.copytree(demo_index, target)
    return target


def _load(index_dir, **options):
    service = RetrievalService(index_dir, LoadOptions(**options), BatchingConfig())
    try:
        service.load()
    finally:
        service.close()
    return service


@pytest.fixture(scope="module")
def other_encoder(tmp_path_factory):
    """A different (randomly initialised) BERT encoder sharing MiniLM's tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path_factory.mktemp("other-encoder")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_encoder_override_must_match_the_index(index_copy, other_encoder):
    with pytest.raises(ManifestError) as caught:
        _load(index_copy, encoder=str(other_encoder))
    message = str(caught.value)
    assert "encoder mismatch" in message and "'minilm'" in message and str(other_encoder) in message


def test_same_model_in_another_folder_is_accepted(index_copy, tmp_path):
    moved = tmp_path / "minilm-copy"
    shutil.copytree(resolve_model_path("minilm"), moved)
    assert _load(index_copy, encoder=str(moved)).state == "ready"


def test_changed_pooling_is_caught_by_the_probe_sentence(index_copy):
    manifest = json.loads((index_copy / "manifest.json").read_text())
    manifest["encoder"]["spec"]["pooling"] = "cls"
    (index_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="encodes the probe sentence differently"):
        _load(index_copy)


def test_corpus_of_another_size_is_refused_and_both_are_named(index_copy, tmp_path):
    other = tmp_path / "other.jsonl"
    other.write_text('{"id": "1", "contents": "only one passage"}\n')
    write_corpus_arrow(other, tmp_path / "other.arrow")
    with pytest.raises(ManifestError) as caught:
        _load(index_copy, corpus=str(tmp_path / "other.arrow"))
    message = str(caught.value)
    demo_size = sum(1 for line in DEMO_CORPUS.read_text(encoding="utf-8").splitlines() if line.strip())
    assert "corpus mismatch" in message and f"{demo_size} passages" in message and "other.arrow" in message


def test_files_changed_after_the_build_are_refused(index_copy):
    index_file = index_copy / "index.faiss"
    index_file.write_bytes(index_file.read_bytes()[:-10])
    with pytest.raises(ManifestError, match="changed after the index was built"):
        _load(index_copy)


def test_checksums_catch_same_size_changes(index_copy):
    corpus_file = index_copy / "corpus.arrow"
    data = bytearray(corpus_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    corpus_file.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="sha256"):
        _load(index_copy, verify_checksums=True)


def test_unfinished_build_is_refused(index_copy):
    (index_copy / "manifest.json").unlink()
    service = RetrievalService(index_copy, LoadOptions(), BatchingConfig())
    with pytest.raises(ManifestError, match="ragr1-index build"):
        service.load()
    assert service.health()["status"] == "failed" and "manifest.json" in service.health()["error"]


def test_the_faiss_index_is_memory_mapped_and_searches_the_same(demo_index):
    import numpy as np

    from retriever_server.dense import FAISS_INDEX_NAME, FaissSearcher

    read = FaissSearcher.load(demo_index, use_gpu=False, mmap=False, omp_threads=1)
    mapped = FaissSearcher.load(demo_index, use_gpu=False, mmap=True, omp_threads=1)
    with open("/proc/self/maps", encoding="utf-8") as maps:
        assert str((demo_index / FAISS_INDEX_NAME).resolve()) in maps.read(), "the codes should map the file"
    queries = np.random.default_rng(0).standard_normal((16, read.index.d)).astype(np.float32)
    (scores, ids), (want_scores, want_ids) = mapped.search(queries, 5), read.search(queries, 5)
    assert (ids == want_ids).all() and np.allclose(scores, want_scores)
