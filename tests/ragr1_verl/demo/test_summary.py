"""``eval/summary.json``: a run's evaluations in one small file, read back with errors that name the field."""

import json
import os

import pytest

from ragr1_verl.demo.summary import (
    KEPT_FIELDS,
    ModelEvaluation,
    RunSummary,
    SummaryError,
    read_summary,
    write_summary,
)


def _records(count):
    return tuple({"id": f"demo/{n}", "question": f"q{n}?", "em": float(n % 2), "f1": 0.5, "searches": n,
                  "queries": 2 * n, "format_ok": 1.0, "trajectory": "x" * 1000} for n in range(count))


def test_it_keeps_what_the_tables_need_and_reads_it_back(tmp_path):
    path = tmp_path / "eval" / "summary.json"
    written = RunSummary({"mode": "sq", "preset": "full"},
                         {"sft": ModelEvaluation(_records(3), 12.34), "rl-seed0": ModelEvaluation(_records(2), 7.0)})
    write_summary(path, written)
    summary = read_summary(path)
    assert summary.run == {"mode": "sq", "preset": "full"} and list(summary.models) == ["sft", "rl-seed0"]
    assert summary.models["sft"].seconds == 12.3
    assert [dict(record) for record in summary.models["sft"].records] == [
        {name: record[name] for name in KEPT_FIELDS} for record in _records(3)]  # no id, no trajectory
    assert path.stat().st_size < 1000
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # as any file the user writes, not private


@pytest.mark.parametrize(("change", "message"), [
    (lambda doc: doc.update(format=2), 'expected "format": 1'),
    (lambda doc: doc.update(run=[]), '"run" must be an object'),
    (lambda doc: doc["models"].update(sft=[]), "models.sft: must be an object"),
    (lambda doc: doc["models"]["sft"].update(seconds=-1), "models.sft.seconds: must be a number >= 0"),
    (lambda doc: doc["models"]["sft"]["records"][1].pop("em"), "models.sft.records[1].em: expected a number"),
    (lambda doc: doc["models"]["sft"]["records"][0].update(question=3), "models.sft.records[0].question"),
    (lambda doc: doc["models"]["sft"]["records"][2].update(f1=float("nan")), "records[2].f1: expected a number"),
])
def test_a_damaged_file_is_refused_naming_the_file_and_the_field(tmp_path, change, message):
    path = tmp_path / "summary.json"
    write_summary(path, RunSummary({"mode": "mq"}, {"sft": ModelEvaluation(_records(3), 1.0)}))
    document = json.loads(path.read_text())
    change(document)
    path.write_text(json.dumps(document))
    with pytest.raises(SummaryError, match=str(path)) as error:
        read_summary(path)
    assert message in str(error.value)


def test_not_json_is_refused_with_the_files_name(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text("{half a file")
    with pytest.raises(SummaryError, match=f"{path}: not a readable JSON file"):
        read_summary(path)


def test_a_write_that_fails_leaves_the_earlier_file_and_no_stray_one(tmp_path):
    path = tmp_path / "summary.json"
    write_summary(path, RunSummary({"mode": "mq"}, {"sft": ModelEvaluation(_records(2), 1.0)}))
    before = path.read_text()
    with pytest.raises(TypeError):  # a run.json value JSON cannot hold
        write_summary(path, RunSummary({"mode": object()}, {"sft": ModelEvaluation(_records(3), 1.0)}))
    assert path.read_text() == before and [item.name for item in tmp_path.iterdir()] == ["summary.json"]
