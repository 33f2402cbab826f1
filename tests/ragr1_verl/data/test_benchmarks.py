"""``ragr1-data eval``: the split rule, one parquet per benchmark, subsets, local layouts and the errors."""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess

import pytest

from ragr1_verl.data.benchmarks import BENCHMARKS, parse_benchmarks, pick_split
from ragr1_verl.data.questions import demo_questions
from ragr1_verl.records import DataError
from tests.ragr1_verl.data.test_rl import (
    CONSOLE_SCRIPT,
    FIXTURES,
    check_with_verl,
    read_rows,
    run_cli,
    run_console,
)

FLASHRAG_COPY = FIXTURES / "eval_flashrag"


def test_split_rule_is_test_else_dev():
    assert pick_split(["train", "dev", "test"], "x") == "test"
    assert pick_split(["train", "dev"], "x") == "dev"
    with pytest.raises(DataError, match="x: no test or dev split"):
        pick_split(["train"], "x")  # never evaluate on training questions silently


def test_benchmark_names():
    assert BENCHMARKS == ("nq", "triviaqa", "popqa", "hotpotqa", "2wikimultihopqa", "musique", "bamboogle")
    assert parse_benchmarks("all") == list(BENCHMARKS)
    assert parse_benchmarks(" HotpotQA,nq,nq ") == ["hotpotqa", "nq"]
    with pytest.raises(argparse.ArgumentTypeError, match="squad"):
        parse_benchmarks("nq,squad")


def test_flashrag_layout_one_file_per_benchmark(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    assert run_cli("eval", "--input-dir", FLASHRAG_COPY, "--benchmarks", "nq,hotpotqa,bamboogle",
                   "--combined", "--out", out) == 0
    assert sorted(path.name for path in out.iterdir()) == \
        ["all.parquet", "bamboogle.parquet", "hotpotqa.parquet", "nq.parquet", "ragr1_prompt.json"]
    files = [out / f"{name}.parquet" for name in ("nq", "hotpotqa", "bamboogle")]
    rows = check_with_verl(files, tiny_model_dir, tmp_path / "cache")  # verl concatenates the three files
    by_source = {name: [row for row in rows if row["data_source"] == name]
                 for name in ("nq", "hotpotqa", "bamboogle")}
    assert [len(by_source[name]) for name in by_source] == [5, 3, 2]
    assert {row["extra_info"]["split"] for row in by_source["nq"]} == {"test"}
    assert {row["extra_info"]["split"] for row in by_source["hotpotqa"]} == {"dev"}  # no test split: dev
    assert [row["extra_info"]["index"] for row in rows] == list(range(10))  # unique across the files
    assert read_rows(out / "all.parquet") == rows
    first = by_source["nq"][0]
    assert first["extra_info"]["question"] == "who received the first nobel prize in physics?"
    assert first["reward_model"] == {"style": "rule", "ground_truth": {"target": ["Wilhelm Conrad Röntgen"]}}


def test_split_override(tmp_path):
    assert run_cli("eval", "--input-dir", FLASHRAG_COPY, "--benchmarks", "nq", "--split", "dev",
                   "--out", tmp_path) == 0
    assert [row["extra_info"]["id"] for row in read_rows(tmp_path / "nq.parquet")] == ["dev_0"]


def test_single_file_layout(tmp_path):
    assert run_cli("eval", "--input-dir", FIXTURES / "eval_files", "--benchmarks", "popqa,musique",
                   "--mode", "sq", "--out", tmp_path) == 0
    popqa, musique = read_rows(tmp_path / "popqa.parquet"), read_rows(tmp_path / "musique.parquet")
    assert [row["extra_info"]["id"] for row in musique] == ["2hop__1", "2hop__2"]
    assert popqa[0]["reward_model"]["ground_truth"]["target"] == ["politician", "political leader"]
    assert {row["data_source"] for row in popqa} == {"popqa"}
    assert "write a search query between" in popqa[0]["prompt"][0]["content"]  # the sq template


def test_limit_and_seed(tmp_path):
    def ids(seed: int, out_name: str) -> list[str]:
        out = tmp_path / out_name
        assert run_cli("eval", "--input-dir", FLASHRAG_COPY, "--benchmarks", "nq", "--limit", "3",
                       "--seed", seed, "--out", out) == 0
        return [row["extra_info"]["id"] for row in read_rows(out / "nq.parquet")]

    first, again = ids(1, "a"), ids(1, "b")
    assert first == again and len(first) == 3
    assert first == sorted(first)  # a subset in the source order
    assert any(ids(seed, f"s{seed}") != first for seed in range(2, 6))


def test_demo_source(tmp_path):
    assert run_cli("eval", "--source", "demo", "--combined", "--out", tmp_path) == 0
    assert sorted(path.name for path in tmp_path.iterdir()) == ["all.parquet", "demo.parquet", "ragr1_prompt.json"]
    rows = read_rows(tmp_path / "demo.parquet")
    held_out = {q.question for q in demo_questions(part="test")}  # only the part never trained on
    assert {row["extra_info"]["question"] for row in rows} == held_out and {row["data_source"] for row in rows} == {"demo"}
    assert {row["extra_info"]["split"] for row in rows} == {"test"}


def test_missing_benchmark_file_writes_nothing(tmp_path, caplog):
    out = tmp_path / "out"
    with caplog.at_level(logging.ERROR):
        assert run_cli("eval", "--input-dir", FLASHRAG_COPY, "--benchmarks", "nq,triviaqa", "--out", out) == 2
    assert f"{FLASHRAG_COPY}: no file for benchmark 'triviaqa'" in caplog.text
    assert not out.exists()  # nq was readable, but nothing is written unless every benchmark is


def test_malformed_benchmark_file_names_file_and_row(tmp_path, caplog):
    copy = tmp_path / "copy"
    shutil.copytree(FLASHRAG_COPY, copy)
    with (copy / "bamboogle" / "test.jsonl").open("a", encoding="utf-8") as handle:
        handle.write('{"id": "test_2", "question": "Who?", "golden_answers": "Victoria"}\n')
        handle.write('{"id": "test_3", "question": 12, "golden_answers": ["x"]}\n')
    out = tmp_path / "out"
    out.mkdir()
    with caplog.at_level(logging.ERROR):
        assert run_cli("eval", "--input-dir", copy, "--benchmarks", "nq,bamboogle", "--out", out) == 2
    assert f"{copy / 'bamboogle' / 'test.jsonl'}, row 4, field 'question': expected a string" in caplog.text
    assert list(out.iterdir()) == []


def test_no_eval_split_is_refused(tmp_path, caplog):
    copy = tmp_path / "copy"
    (copy / "nq").mkdir(parents=True)
    shutil.copy(FLASHRAG_COPY / "nq" / "train.jsonl", copy / "nq" / "train.jsonl")
    with caplog.at_level(logging.ERROR):
        assert run_cli("eval", "--input-dir", copy, "--benchmarks", "nq", "--out", tmp_path / "out") == 2
    assert "no test or dev split (found ['train'])" in caplog.text


def test_demo_refuses_benchmark_options(tmp_path, caplog):
    with caplog.at_level(logging.ERROR):
        assert run_cli("eval", "--source", "demo", "--benchmarks", "nq", "--out", tmp_path / "out") == 2
    assert "do not apply to --source demo" in caplog.text


def test_unreachable_hub_is_a_clear_error_and_writes_nothing(tmp_path):
    result = run_console("eval", "--benchmarks", "bamboogle", "--hub-dataset", "ragr1-test/no-such-dataset",
                         "--out", tmp_path / "out", home=tmp_path / "hf")
    assert result.returncode == 2, result.stderr
    assert "hub dataset 'ragr1-test/no-such-dataset' (bamboogle) could not be loaded" in result.stderr
    assert "--input-dir" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_console_script_help():
    result = subprocess.run([str(CONSOLE_SCRIPT), "eval", "--help"], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    flags = ("--benchmarks", "--limit", "--seed", "--input-dir", "--combined", "--split", "--source", "--out")
    assert all(flag in result.stdout for flag in flags)
