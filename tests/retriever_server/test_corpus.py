import gzip
import json

import pytest

from retriever_server.corpus import (
    Corpus,
    CorpusFormatError,
    iter_passages,
    render_contents,
    write_corpus_arrow,
)


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_jsonl_contents_and_title_text_rows(tmp_path):
    path = _write(tmp_path / "c.jsonl", "\n".join([
        json.dumps({"id": 0, "contents": '"Paris"\nCapital of France.'}),
        "",
        json.dumps({"id": "b", "title": "Berlin", "text": "Capital of Germany."}),
    ]))
    passages = list(iter_passages(path))
    assert [p.id for p in passages] == ["0", "b"]
    assert passages[0].contents == '"Paris"\nCapital of France.'
    assert passages[1].contents == render_contents("Berlin", "Capital of Germany.")


def test_tsv_with_dpr_header_and_two_column_kilt(tmp_path):
    dpr = _write(tmp_path / "psgs.tsv", 'id\ttext\ttitle\n1\t"A river, long."\tNile\n2\tA city.\tRome\n')
    assert [(p.id, p.contents) for p in iter_passages(dpr)] == [
        ("1", render_contents("Nile", "A river, long.")), ("2", render_contents("Rome", "A city."))]
    kilt = _write(tmp_path / "kilt.tsv", "7\tNile   The Nile is a river.\n8\tRome   Rome is a city.\n")
    assert [(p.id, p.contents) for p in iter_passages(kilt)] == [
        ("7", "Nile   The Nile is a river."), ("8", "Rome   Rome is a city.")]


def test_gzip_corpus(tmp_path):
    path = tmp_path / "c.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write(json.dumps({"id": "x", "contents": "text"}) + "\n")
    assert [p.id for p in iter_passages(path)] == ["x"]


@pytest.mark.parametrize("line, field", [
    ('{"id": 1, "contents": "ok"', "<row>"),
    ('["a"]', "<row>"),
    ('{"contents": "no id"}', "id"),
    ('{"id": null, "contents": "x"}', "id"),
    ('{"id": 3, "contents": 5}', "contents"),
    ('{"id": 3, "body": "x"}', "contents"),
])
def test_malformed_jsonl_names_file_line_and_field(tmp_path, line, field):
    path = _write(tmp_path / "bad.jsonl", json.dumps({"id": 0, "contents": "fine"}) + "\n" + line + "\n")
    with pytest.raises(CorpusFormatError) as caught:
        list(iter_passages(path))
    assert (caught.value.path, caught.value.line, caught.value.field) == (str(path), 2, field)
    assert f"{path}, line 2, field '{field}'" in str(caught.value)


def test_tsv_with_wrong_column_count(tmp_path):
    path = _write(tmp_path / "bad.tsv", "1\tok\n2\ta\tb\tc\n")
    with pytest.raises(CorpusFormatError, match="line 2"):
        list(iter_passages(path))


def test_unknown_extension_and_missing_file(tmp_path):
    with pytest.raises(CorpusFormatError, match="unknown corpus format"):
        iter_passages(_write(tmp_path / "c.csv", "x"))
    with pytest.raises(FileNotFoundError):
        iter_passages(tmp_path / "absent.jsonl")


def test_arrow_round_trip_by_position(tmp_path):
    rows = [{"id": f"p{i}", "contents": f"passage {i} \u00e9"} for i in range(20_000)]
    source = _write(tmp_path / "c.jsonl", "\n".join(json.dumps(r) for r in rows))
    assert write_corpus_arrow(source, tmp_path / "corpus.arrow") == 20_000
    corpus = Corpus(tmp_path / "corpus.arrow")
    assert len(corpus) == 20_000
    assert corpus.documents([19_999, 0, 8192]) == [rows[19_999], rows[0], rows[8192]]
    # Across the record batches (8,192 rows each), repeated and out of order, in one call.
    picked = [8191, 8192, 16383, 16384, 3, 8191, 19_999]
    assert corpus.documents(picked) == [rows[i] for i in picked]
    with pytest.raises(IndexError):
        corpus.documents([20_000])
    chunks = list(corpus.iter_batches(7_000))
    assert [start for start, _ in chunks] == [0, 7_000, 14_000]
    assert sum(len(texts) for _, texts in chunks) == 20_000 and chunks[1][1][0] == rows[7_000]["contents"]


@pytest.mark.parametrize("content, problem", [
    ('{"id": 1, "contents": "a"}\n{"id": 1, "contents": "b"}\n', "duplicate id"),
    ('{"id": 1, "contents": "a"}\n{"id": 2\n', "not valid JSON"),
    ("\n\n", "no passages"),
])
def test_failed_conversion_leaves_no_file(tmp_path, content, problem):
    source = _write(tmp_path / "c.jsonl", content)
    with pytest.raises(CorpusFormatError, match=problem):
        write_corpus_arrow(source, tmp_path / "corpus.arrow")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl"]
