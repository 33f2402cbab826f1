"""Sharded index folders served in one process: every shard a complete index, the merged top-k equal to the
unsharded index's for exact and trained index types and for BM25; ``ragr1-index shard`` and
``build --num-shards``; a tampered sharded manifest is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest

from retriever_server.batcher import BatchingConfig
from retriever_server.builder import BuildOptions, build_index
from retriever_server.demo import load_demo_questions
from retriever_server.index_cli import main as index_main
from retriever_server.manifest import Manifest, ManifestError
from retriever_server.service import LoadOptions, RetrievalService
from retriever_server.sharded import merge_hits
from retriever_server.sharding import read_shards, shard_bounds, shard_index
from tests.retriever_server.helpers import write_generated_corpus

QUESTIONS = [question["question"] for question in load_demo_questions()]


def _search(index_dir, queries, k=5):
    service = RetrievalService(index_dir, LoadOptions(), BatchingConfig())
    service.load()
    try:
        documents, scores = service.search(queries, k)
    finally:
        service.close()
    return [[document["id"] for document in row] for row in documents], scores


def _assert_same(got, expected):
    """Same scores; same ids except in the order of equal scores or a tie at the cut-off."""
    for ids, scores, want_ids, want_scores in zip(*got, *expected):
        assert np.allclose(scores, want_scores, atol=1e-4)
        last = round(want_scores[-1], 4) if want_scores else None
        for score in {round(s, 4) for s in want_scores} - {last}:
            assert {i for i, s in zip(want_ids, want_scores) if round(s, 4) == score} == \
                {i for i, s in zip(ids, scores) if round(s, 4) == score}


def test_shard_bounds_cover_the_corpus_in_near_equal_slices():
    assert shard_bounds(10, 3) == [(0, 3), (3, 3), (6, 4)]
    assert sum(count for _, count in shard_bounds(322, 7)) == 322
    with pytest.raises(ValueError):
        shard_bounds(3, 4)


def test_merge_keeps_the_best_hits_and_breaks_ties_by_position():
    first = [[(0.9, 0, {"id": "a"}), (0.5, 1, {"id": "b"})]]
    second = [[(0.9, 7, {"id": "h"}), (0.7, 8, {"id": "i"})]]
    assert [hit[1] for hit in merge_hits([second, first], 3)[0]] == [0, 7, 8]


@pytest.mark.parametrize("kind", ["dense", "bm25"])
def test_demo_index_in_three_shards_answers_like_the_whole(kind, demo_index, demo_bm25_index, tmp_path):
    whole = demo_index if kind == "dense" else demo_bm25_index
    shard_index(whole, tmp_path / "sharded", 3)
    for info in read_shards(tmp_path / "sharded"):  # each shard is an index folder of its own
        manifest = Manifest.read(tmp_path / "sharded" / info.dir)
        assert manifest.kind == kind and manifest.shard["start"] == info.start
        assert manifest.corpus["count"] == info.count
    _assert_same(_search(tmp_path / "sharded", QUESTIONS), _search(whole, QUESTIONS))


@pytest.fixture(scope="module")
def generated_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharding")
    write_generated_corpus(root / "corpus.jsonl", 400)
    return root / "corpus.jsonl"


@pytest.mark.parametrize("index_type", ["HNSW32", "IVF4,Flat", "SQ8"])
def test_trained_and_graph_index_types_shard_too(generated_corpus, tmp_path, index_type):
    whole = tmp_path / "whole"
    build_index(BuildOptions(corpus=generated_corpus, out_dir=whole, index_type=index_type, train_size=400,
                             show_progress=False))
    shard_index(whole, tmp_path / "sharded", 2)
    queries = [f"passage number {n}" for n in range(0, 400, 37)]
    got, expected = _search(tmp_path / "sharded", queries, k=3), _search(whole, queries, k=3)
    if index_type == "SQ8":  # exact scan over the same codes
        _assert_same(got, expected)
    else:  # approximate: the slices are searched with the whole index's training; compare the best hit
        agree = sum(a[:1] == b[:1] for a, b in zip(got[0], expected[0]))
        assert agree >= len(queries) - 1, (got[0], expected[0])


def test_the_cli_shards_and_builds_sharded(generated_corpus, tmp_path):
    assert index_main(["build", "--kind", "bm25", "--corpus", str(generated_corpus), "--out", str(tmp_path / "b"),
                       "--num-shards", "2"]) == 0
    assert [info.count for info in read_shards(tmp_path / "b")] == [200, 200]
    assert Manifest.read(tmp_path / "b" / "full").kind == "bm25"
    assert index_main(["shard", "--index", str(tmp_path / "b" / "full"), "--out", str(tmp_path / "c"),
                       "--num-shards", "4"]) == 0
    assert len(read_shards(tmp_path / "c")) == 4
    assert index_main(["shard", "--index", str(tmp_path / "c"), "--out", str(tmp_path / "d"),
                       "--num-shards", "2"]) == 2  # sharded already: an error, not a crash


def test_a_gap_between_shards_is_refused(demo_bm25_index, tmp_path):
    shard_index(demo_bm25_index, tmp_path / "sharded", 2)
    path = tmp_path / "sharded" / "manifest.json"
    data = json.loads(path.read_text())
    data["shards"][1]["start"] += 1
    path.write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="starts at"):
        read_shards(tmp_path / "sharded")
    service = RetrievalService(tmp_path / "sharded", LoadOptions(), BatchingConfig())
    with pytest.raises(ManifestError):
        service.load()
    assert service.state == "failed"
