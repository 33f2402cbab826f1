"""Response bodies joined from per-document JSON: the same bytes as ``json.dumps`` of the wire format, each
document encoded once while it stays in a cache bounded by bytes."""

from __future__ import annotations

import json
import random

from retriever_server.responses import DocumentJson, render_body

AWKWARD = ['plain', 'quote " and backslash \\', 'line\nbreak\ttab', 'ünïcødé “curly” 日本', '\x00\x1f', '']


class ListCorpus:
    def __init__(self, documents):
        self.rows, self.calls = documents, []

    def documents(self, positions):
        self.calls.append(list(positions))
        return [self.rows[p] for p in positions]


def _corpus(size: int, rng: random.Random) -> ListCorpus:
    return ListCorpus([{"id": f"{p}-{rng.choice(AWKWARD)}", "contents": " ".join(rng.choices(AWKWARD, k=4))}
                       for p in range(size)])


def _expected(corpus, positions, scores, return_scores):
    """The wire format written out by hand, as the original servers build it."""
    result = []
    for position_row, score_row in zip(positions, scores):
        hits = [(corpus.rows[p], round(s, 6)) for p, s in zip(position_row, score_row) if p >= 0]
        result.append([{"document": d, "score": s} for d, s in hits] if return_scores else [d for d, _ in hits])
    return json.dumps({"result": result})


def test_bodies_are_the_bytes_json_dumps_gives():
    rng = random.Random(7)
    corpus = _corpus(40, rng)
    documents = DocumentJson(corpus)
    for _ in range(50):
        queries, k = rng.randint(1, 5), rng.randint(1, 6)
        positions = [[rng.choice([-1, *range(40)]) for _ in range(k)] for _ in range(queries)]
        scores = [[rng.uniform(-50, 50) for _ in range(k)] for _ in range(queries)]
        fragments = documents.fragments([p for row in positions for p in row if p >= 0])
        for return_scores in (True, False):
            body = render_body(positions, scores, fragments, return_scores)
            assert body == _expected(corpus, positions, scores, return_scores)
            json.loads(body)


def test_non_finite_scores_become_null_not_invalid_json():
    corpus = _corpus(2, random.Random(1))
    fragments = DocumentJson(corpus).fragments([0, 1])
    body = render_body([[0, 1]], [[float("nan"), float("-inf")]], fragments, True)
    assert [hit["score"] for hit in json.loads(body)["result"][0]] == [None, None]


def test_each_document_is_looked_up_once_while_cached_and_the_cache_stays_in_its_bytes():
    corpus = _corpus(100, random.Random(3))
    sizes = [len(json.dumps(document)) for document in corpus.rows]
    documents = DocumentJson(corpus, max_bytes=sum(sizes[:10]))
    documents.fragments([1, 2, 2, 3])
    assert corpus.calls == [[1, 2, 3]]
    documents.fragments([3, 2, 1])
    assert corpus.calls == [[1, 2, 3]]  # all cached: no lookup at all
    documents.fragments([3, 4])
    assert corpus.calls[-1] == [4]
    documents.fragments(list(range(100)))
    assert documents.bytes <= documents.max_bytes
    assert documents.bytes == sum(sizes[p] for p in documents._entries)
    disabled = DocumentJson(corpus, max_bytes=0)
    disabled.fragments([5])
    disabled.fragments([5])
    assert corpus.calls[-2:] == [[5], [5]] and len(disabled) == 0
