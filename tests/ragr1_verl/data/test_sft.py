"""``ragr1-data sft``: sft-generate trajectories and RAG-R1's released layouts to the exact SFT parquet
schema, hold-out by question, prefix folding of the paper's samples, and errors that name file, row and
field and leave nothing behind."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ragr1_verl.data import cli
from ragr1_verl.data.sft import ORIGIN_GENERATED, ORIGIN_RELEASED, parquet_schema
from ragr1_verl.sft.dataset import RagR1SFTDataset

FIXTURES = Path(__file__).parent / "fixtures"
TRAJECTORIES = FIXTURES / "sft_trajectories.jsonl"
ALPACA = FIXTURES / "sft_released_alpaca.json"
SHAREGPT = FIXTURES / "sft_released_sharegpt.json"


def teacher_lines() -> list[dict]:
    return [json.loads(line) for line in TRAJECTORIES.read_text().splitlines()]


@pytest.fixture
def sft(monkeypatch, caplog):
    """``ragr1-data`` with only this subcommand registered (the siblings are tested on their own)."""
    monkeypatch.setattr(cli, "SUBCOMMAND_MODULES", ("ragr1_verl.data.sft",))
    caplog.set_level(logging.INFO, logger="ragr1_verl.data")

    def main(*argv: str) -> int:
        return cli.main(["sft", *map(str, argv)])

    return main


def read(out: Path, split: str) -> list[dict]:
    return pq.read_table(out / f"{split}.parquet").to_pylist()


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# ----------------------------------------------------------------------------------- sft-generate input


def test_trajectories_become_the_exact_parquet_schema(sft, tmp_path):
    assert sft("--input", TRAJECTORIES, "--out", tmp_path, "--val-fraction", "0.25", "--seed", "1") == 0

    for split in ("train", "test"):
        assert pq.read_schema(tmp_path / f"{split}.parquet").equals(parquet_schema(), check_metadata=False)
    train, test = read(tmp_path, "train"), read(tmp_path, "test")
    assert len(test) == 1 and len(train) == 3  # hp-4 (em 0) is left out
    by_id = {row["extra_info"]["id"]: row for row in train + test}
    assert sorted(by_id) == ["hp-1", "hp-2", "hp-3", "hp-5"]

    source = {line["id"]: line for line in teacher_lines()}["hp-3"]
    assert by_id["hp-3"] == {
        "data_source": "hotpotqa", "prompt": source["messages"], "trajectory": source["trajectory"],
        "question": source["question"], "golden_answers": ["Gustave Eiffel"],
        "extra_info": {"index": by_id["hp-3"]["extra_info"]["index"],
                       "split": by_id["hp-3"]["extra_info"]["split"], "id": "hp-3",
                       "origin": ORIGIN_GENERATED, "searches": 2, "sample_kinds": [2, 4, 3]}}
    assert [row["extra_info"]["index"] for row in train] == [0, 1, 2]
    assert {row["extra_info"]["split"] for row in train} == {"train"}
    assert test[0]["extra_info"]["split"] == "test"


def test_the_hold_out_is_seeded_and_keeps_a_questions_trajectories_together(sft, tmp_path):
    lines = teacher_lines()
    again = [dict(line, id=line["id"] + "-again") for line in lines]
    path = write_jsonl(tmp_path / "twice.jsonl", lines + again)

    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        assert sft("--input", path, "--out", out, "--val-fraction", "0.5", "--seed", "7") == 0
    test = read(outs[0], "test")
    assert test == read(outs[1], "test")
    questions = {row["question"] for row in test}
    assert len(test) == 2 * len(questions) == 4  # both copies of each held-out question, none in train
    assert not questions & {row["question"] for row in read(outs[0], "train")}


def test_val_input_gives_the_test_file(sft, tmp_path):
    lines = teacher_lines()
    train = write_jsonl(tmp_path / "train.jsonl", lines[:3])
    val = write_jsonl(tmp_path / "val.jsonl", lines[3:])

    assert sft("--input", train, "--val-input", val, "--out", tmp_path / "out") == 0
    assert [row["extra_info"]["id"] for row in read(tmp_path / "out", "train")] == ["hp-1", "hp-2", "hp-3"]
    assert [row["extra_info"]["id"] for row in read(tmp_path / "out", "test")] == ["hp-5"]


def test_repeat_multi_search_repeats_only_training_trajectories_that_search_more_than_once(sft, tmp_path):
    lines = teacher_lines()
    train = write_jsonl(tmp_path / "train.jsonl", lines[:3])
    val = write_jsonl(tmp_path / "val.jsonl", lines[:3])
    assert sft("--input", train, "--val-input", val, "--out", tmp_path / "once") == 0
    assert sft("--input", train, "--val-input", val, "--out", tmp_path / "thrice", "--repeat-multi-search", "3") == 0

    once, thrice = read(tmp_path / "once", "train"), read(tmp_path / "thrice", "train")
    multi = [row for row in once if row["extra_info"]["searches"] > 1]
    assert multi and len(multi) < len(once)  # the fixture has both kinds
    assert len(thrice) == len(once) + 2 * len(multi)
    trajectories = [row["trajectory"] for row in thrice]
    for row in once:
        assert trajectories.count(row["trajectory"]) == (3 if row["extra_info"]["searches"] > 1 else 1)
    assert read(tmp_path / "thrice", "test") == read(tmp_path / "once", "test")


def test_repeat_multi_search_refuses_a_count_below_one(sft, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        sft("--input", TRAJECTORIES, "--out", tmp_path, "--repeat-multi-search", "0")
    assert exit_info.value.code == 2 and not list(tmp_path.iterdir())


def test_wrong_answers_kept_on_request(sft, tmp_path):
    assert sft("--input", TRAJECTORIES, "--out", tmp_path, "--val-fraction", "0", "--include-wrong") == 0
    assert "hp-4" in [row["extra_info"]["id"] for row in read(tmp_path, "train")]
    assert read(tmp_path, "test") == []


def test_rl_selection_resamples_are_left_out(sft, tmp_path, caplog):
    lines = [dict(line, attempt=0) for line in teacher_lines()]
    resample = dict(lines[1], id="hp-2", attempt=3, temperature=1.2)
    path = write_jsonl(tmp_path / "attempts.jsonl", [*lines, resample])

    assert sft("--input", path, "--out", tmp_path / "out", "--val-fraction", "0") == 0
    kept = read(tmp_path / "out", "train")
    assert [row["extra_info"]["id"] for row in kept] == ["hp-1", "hp-2", "hp-3", "hp-5"]
    assert "1 re-samples skipped" in caplog.text


def test_the_output_loads_in_the_sft_dataset(sft, tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    assert sft("--input", TRAJECTORIES, "--out", tmp_path, "--val-fraction", "0.25") == 0
    data = RagR1SFTDataset([str(tmp_path / "train.parquet"), str(tmp_path / "test.parquet")],
                           AutoTokenizer.from_pretrained(tiny_model_dir), {"max_length": 4096})
    assert len(data) == 4
    assert sorted(kind for row in data.rows for kind in row.trajectory.kinds) == [1, 2, 2, 2, 3, 3, 3, 4]


def test_summary_counts_the_papers_sample_kinds(sft, tmp_path, caplog):
    assert sft("--input", TRAJECTORIES, "--out", tmp_path) == 0
    assert "read 5 rows: 1 wrong answers skipped, 0 invalid skipped" in caplog.text
    assert "(as the paper's samples: 1 kind-1, 3 kind-2, 3 kind-3, 1 kind-4)" in caplog.text


# ------------------------------------------------------------------------------ RAG-R1's released layouts


def test_released_alpaca_rows_fold_into_whole_trajectories(sft, tmp_path):
    assert sft("--input", ALPACA, "--out", tmp_path, "--val-fraction", "0") == 0

    rows = read(tmp_path, "train")
    assert [row["extra_info"]["sample_kinds"] for row in rows] == [[2, 4, 3], [1], [2]]
    hp3 = {line["id"]: line for line in teacher_lines()}["hp-3"]
    assert rows[0]["trajectory"] == hp3["trajectory"] and rows[0]["prompt"] == hp3["messages"]
    assert rows[0]["question"] == hp3["question"]  # recovered from the prompt's "Question:"
    assert rows[0]["extra_info"]["id"] == "sft_released_alpaca.json:3"
    assert {row["data_source"] for row in rows} == {"hotpotqa"}
    assert {row["extra_info"]["origin"] for row in rows} == {ORIGIN_RELEASED}
    assert rows[2]["trajectory"].endswith("</search>")  # a lone search sample stays a (search-only) row


def test_released_conversations_become_the_same_trajectory(sft, tmp_path):
    assert sft("--input", SHAREGPT, "--out", tmp_path, "--val-fraction", "0", "--data-source", "mine") == 0

    [row] = read(tmp_path, "train")
    hp3 = {line["id"]: line for line in teacher_lines()}["hp-3"]
    assert row["trajectory"] == hp3["trajectory"] and row["prompt"] == hp3["messages"]
    assert row["data_source"] == "mine" and row["extra_info"]["sample_kinds"] == [2, 4, 3]


def test_source_ragr1_reads_a_local_copy_of_the_hub_dataset(sft, tmp_path):
    copy = tmp_path / "copy" / "data" / "SFT"
    copy.mkdir(parents=True)
    shutil.copy(ALPACA, copy / "SFT_train_data_mq.json")

    assert sft("--source", "ragr1", "--input-dir", tmp_path / "copy", "--out", tmp_path / "out",
               "--val-fraction", "0") == 0
    assert len(read(tmp_path / "out", "train")) == 3
    assert sft("--source", "ragr1", "--ragr1-set", "sq", "--input-dir", tmp_path / "copy",
               "--out", tmp_path / "sq") == 2


def test_an_unreachable_hub_is_named_and_nothing_is_written(sft, tmp_path, monkeypatch, caplog):
    import huggingface_hub

    def offline(**kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    assert sft("--source", "ragr1", "--out", tmp_path) == 2
    assert ("hub dataset 'endertzw/RAG-R1-SFT-data' could not be downloaded: network is unreachable"
            in caplog.text)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------- bad input


def broken(field: str, value) -> list[dict]:
    lines = teacher_lines()
    lines[1] = dict(lines[1], **{field: value}) if value is not ... else {
        key: item for key, item in lines[1].items() if key != field}
    return lines


@pytest.mark.parametrize(("lines", "error"), [
    (broken("em", ...), "row 2, field 'em': missing"),
    (broken("em", 2), "row 2, field 'em': expected 0 or 1"),
    (broken("golden_answers", "Paris"), "row 2, field 'golden_answers': expected a list of strings"),
    (broken("messages", [{"role": "user"}]), "row 2, field 'messages': expected a non-empty list"),
    (broken("trajectory", "<think>no action</think>"),
     "row 2, field 'trajectory': at character 0: a model turn without a complete <search> or <answer>"),
    (broken("trajectory", "<search> q </search> then <answer> x </answer>"),
     "row 2, field 'trajectory': at character 21: a search must be followed by <information>"),
], ids=["missing", "em", "answers", "messages", "no-action", "no-information"])
def test_malformed_rows_name_file_row_and_field_and_write_nothing(sft, tmp_path, caplog, lines, error):
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out"

    assert sft("--input", path, "--out", out) == 2
    assert f"error: {path}, {error}" in caplog.text
    assert not out.exists() or list(out.iterdir()) == []


def test_invalid_json_and_unknown_layouts_are_named(sft, tmp_path, caplog):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(TRAJECTORIES.read_text().splitlines()[0] + "\n{not json\n")
    assert sft("--input", bad, "--out", tmp_path / "out") == 2
    assert f"{bad}, row 2: not valid JSON" in caplog.text

    other = write_jsonl(tmp_path / "other.jsonl", [{"question": "q?", "golden_answers": ["a"]}])
    assert sft("--input", other, "--out", tmp_path / "out") == 2
    assert f"{other}, row 1: neither an sft-generate trajectory" in caplog.text


def test_released_rows_are_checked_too(sft, tmp_path, caplog):
    rows = json.loads(ALPACA.read_text())
    rows[2] = dict(rows[2], output="")
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(rows))

    assert sft("--input", path, "--out", tmp_path / "out") == 2
    assert f"{path}, row 3, field 'output': expected a non-empty string" in caplog.text


def test_skip_invalid_counts_instead_of_stopping(sft, tmp_path, caplog):
    path = write_jsonl(tmp_path / "in.jsonl", broken("trajectory", "<think>no action</think>"))

    assert sft("--input", path, "--out", tmp_path / "out", "--skip-invalid", "--val-fraction", "0") == 0
    assert [row["extra_info"]["id"] for row in read(tmp_path / "out", "train")] == ["hp-1", "hp-3", "hp-5"]
    assert "1 wrong answers skipped, 1 invalid skipped" in caplog.text


def test_a_failure_keeps_earlier_outputs_untouched(sft, tmp_path):
    assert sft("--input", TRAJECTORIES, "--out", tmp_path) == 0
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    bad = write_jsonl(tmp_path.parent / f"{tmp_path.name}-bad.jsonl", broken("em", ...))

    assert sft("--input", bad, "--out", tmp_path, "--seed", "3") == 2
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before


def test_options_of_the_hub_source_are_refused_with_input(sft, tmp_path, caplog):
    assert sft("--input", TRAJECTORIES, "--input-dir", tmp_path, "--out", tmp_path / "out") == 2
    assert "--input-dir only applies to --source ragr1" in caplog.text


def test_val_fraction_out_of_range_is_a_usage_error(sft, tmp_path):
    with pytest.raises(SystemExit):
        sft("--input", TRAJECTORIES, "--out", tmp_path, "--val-fraction", "1.5")
