"""Reading question files and staging outputs: errors name file and row, failures leave nothing behind."""

from __future__ import annotations

import pytest

from ragr1_verl.records import DataError, read_records, staged_output


@pytest.mark.parametrize("content, message", [
    (b'{"q": 1}\n{"q": "\xff"}\n', "row 2: not UTF-8 text"),
    (b'{"q": 1}\n\n{"q": \n', "row 3: not valid JSON"),
    (b'{"q": 1}\n[1, 2]\n', "row 2: expected a JSON object, got list"),
])
def test_a_bad_jsonl_line_is_named(tmp_path, content, message):
    path = tmp_path / "questions.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=f"^{path}, {message}"):
        read_records(path)


def test_json_files_may_hold_a_list_or_a_data_list(tmp_path):
    (tmp_path / "a.json").write_text('[{"q": 1}]')
    (tmp_path / "b.json").write_text('{"data": [{"q": 2}]}')
    assert read_records(tmp_path / "a.json") + read_records(tmp_path / "b.json") == [{"q": 1}, {"q": 2}]
    with pytest.raises(DataError, match="unknown file type"):
        (tmp_path / "c.tsv").write_text("q\n")
        read_records(tmp_path / "c.tsv")


def test_a_failed_command_changes_nothing_in_the_output_folder(tmp_path):
    out = tmp_path / "out"
    with staged_output(out) as staging:
        (staging / "train.parquet").write_text("first")
    with pytest.raises(RuntimeError), staged_output(out) as staging:
        (staging / "train.parquet").write_text("second")
        (staging / "test.parquet").write_text("second")
        raise RuntimeError("interrupted")
    assert sorted(path.name for path in out.iterdir()) == ["train.parquet"]
    assert (out / "train.parquet").read_text() == "first"
