"""``ragr1-data rl`` on the fixture files: the written parquet, verl's RLHFDataset on it, and the errors."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ragr1_verl.data import cli
from ragr1_verl.data.questions import demo_questions, rl_schema
from ragr1_verl.protocol.prompts import MQ_PROMPT_TEMPLATE, SQ_PROMPT_TEMPLATE, render_prompt
from ragr1_verl.reward import compute_score, gold_answers

FIXTURES = Path(__file__).parent / "fixtures"
CONSOLE_SCRIPT = Path(sys.executable).parent / "ragr1-data"


def run_cli(*args: object) -> int:
    return cli.main([str(arg) for arg in args])


def read_rows(path: Path) -> list[dict]:
    table = pq.read_table(path)
    assert table.schema.remove_metadata().equals(rl_schema()), table.schema
    return table.to_pylist()


def run_console(*args: object, home: Path) -> subprocess.CompletedProcess:
    """The installed console script, offline: no hub request leaves the machine, none is cached."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(home)}
    return subprocess.run([str(CONSOLE_SCRIPT), *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=300, check=False)


def load_with_verl(files: list[Path], model_dir: Path, cache_dir: Path):
    """verl's own RLHFDataset over the files, with the prompt-length filter on (it renders every prompt)."""
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer
    from verl.utils.dataset.rl_dataset import RLHFDataset

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = OmegaConf.create({"max_prompt_length": 4096, "filter_overlong_prompts": True,
                               "filter_overlong_prompts_workers": 1, "return_raw_chat": True,
                               "cache_dir": str(cache_dir)})
    return RLHFDataset([str(path) for path in files], tokenizer, config), tokenizer


def check_with_verl(files: list[Path], model_dir: Path, cache_dir: Path) -> list[dict]:
    """Every row loads through RLHFDataset, renders with the chat template and has a usable ground truth."""
    rows = [row for path in files for row in read_rows(path)]
    dataset, tokenizer = load_with_verl(files, model_dir, cache_dir)
    assert len(dataset) == len(rows)
    for position, row in enumerate(rows):
        item = dataset[position]
        rendered = tokenizer.apply_chat_template(item["raw_prompt"], add_generation_prompt=True,
                                                 tokenize=False)
        question = row["extra_info"]["question"]
        assert rendered.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                                   "<|im_start|>user\n")
        assert rendered.endswith(f"Question: {question}\n<|im_end|>\n<|im_start|>assistant\n")
        assert item["agent_name"] == "ragr1_agent"
        assert item["index"] == row["extra_info"]["index"]
        golds = gold_answers(item["reward_model"]["ground_truth"])
        assert golds == row["extra_info"]["answers"]
        assert compute_score(item["data_source"], f"<think>x</think><answer>{golds[0]}</answer>",
                             item["reward_model"]["ground_truth"])["score"] == 1.0
    return rows


def test_local_files_exact_rows(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    assert run_cli("rl", "--input", FIXTURES / "rl_flashrag.jsonl", "--test-input",
                   FIXTURES / "rl_ragr1.json", "--data-source", "mine", "--out", out) == 0
    assert sorted(path.name for path in out.iterdir()) == ["ragr1_prompt.json", "test.parquet", "train.parquet"]
    train = check_with_verl([out / "train.parquet"], tiny_model_dir, tmp_path / "cache")
    test = read_rows(out / "test.parquet")
    assert len(train) == 6 and len(test) == 3
    question = "who wrote the novel moby dick?"
    assert train[0] == {
        "data_source": "mine",
        "prompt": [{"role": "user", "content": render_prompt(question, MQ_PROMPT_TEMPLATE)}],
        "ability": "fact-reasoning",
        "reward_model": {"style": "rule", "ground_truth": {"target": ["Herman Melville", "Melville"]}},
        "extra_info": {"index": 0, "split": "train", "id": "train_0", "question": question,
                       "answers": ["Herman Melville", "Melville"]},
        "agent_name": "ragr1_agent",
    }
    assert train[2]["reward_model"]["ground_truth"]["target"] == ["1989", "November 1989"]
    assert train[3]["extra_info"]["answers"] == ["Mars"]  # the blank answer is dropped
    assert test[0]["reward_model"]["ground_truth"]["target"] == ["2009 and 2010"]
    assert test[1]["extra_info"]["question"] == \
        "When was the  lead singer of the band that recorded Blue Harbour born?"  # stripped, "?" added
    assert [row["extra_info"]["index"] for row in test] == [0, 1, 2]
    assert {row["extra_info"]["split"] for row in test} == {"test"}
    assert test[2]["extra_info"]["id"] == "mine-3"


def test_hold_out_limit_seed_and_sq_prompt(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    for out in (first, second):
        assert run_cli("rl", "--input", FIXTURES / "rl_flashrag.jsonl", "--test-size", "2", "--limit", "3",
                       "--seed", "7", "--mode", "sq", "--out", out) == 0
    train, test = read_rows(first / "train.parquet"), read_rows(first / "test.parquet")
    assert (len(train), len(test)) == (3, 2)
    assert train == read_rows(second / "train.parquet") and test == read_rows(second / "test.parquet")
    ids = [row["extra_info"]["id"] for row in train + test]
    assert len(set(ids)) == 5
    assert train[0]["data_source"] == "rl_flashrag"  # the file's stem
    question = train[0]["extra_info"]["question"]
    assert train[0]["prompt"][0]["content"] == render_prompt(question, SQ_PROMPT_TEMPLATE)


def test_custom_prompt_template_file(tmp_path):
    template = tmp_path / "template.txt"
    template.write_text("Think, search, answer.\nQuestion: {question}\n", encoding="utf-8")
    assert run_cli("rl", "--input", FIXTURES / "rl_ragr1.json", "--test-size", "1",
                   "--prompt-template", template, "--out", tmp_path / "out") == 0
    contents = [row["prompt"][0]["content"] for row in read_rows(tmp_path / "out" / "train.parquet")]
    assert all(content.startswith("Think, search, answer.\nQuestion: ") for content in contents)


def test_demo_source(tmp_path, tiny_model_dir):
    assert run_cli("rl", "--source", "demo", "--out", tmp_path / "out") == 0
    train = read_rows(tmp_path / "out" / "train.parquet")
    test = check_with_verl([tmp_path / "out" / "test.parquet"], tiny_model_dir, tmp_path / "cache")
    # the questions' own parts: train to train on, the 16 validation dev questions to validate on (not the 78
    # dev ones: validating costs what it did); the held-out test part never appears
    parts = {q.question: q.extra.get("split") for q in demo_questions()}
    assert [parts[row["extra_info"]["question"]] for row in train] == ["train"] * len(demo_questions(part="train"))
    assert [row["extra_info"]["id"] for row in test] == [q.id for q in demo_questions(part="val")]
    assert len(test) == 16 and {parts[row["extra_info"]["question"]] for row in test} == {"dev"}
    assert {row["data_source"] for row in train + test} == {"demo"}


def test_flashrag_local_copy(tmp_path):
    assert run_cli("rl", "--source", "flashrag", "--input-dir", FIXTURES / "eval_flashrag",
                   "--out", tmp_path / "out") == 0
    train = read_rows(tmp_path / "out" / "train.parquet")
    test = read_rows(tmp_path / "out" / "test.parquet")
    assert [(row["data_source"], row["extra_info"]["id"]) for row in train] == [
        ("nq", "train_0"), ("nq", "train_1"), ("nq", "train_2"), ("hotpotqa", "hp-train-0"),
        ("hotpotqa", "hp-train-1")]
    assert [row["extra_info"]["index"] for row in train] == list(range(5))
    # NQ has a test split, HotpotQA only dev: the baselines' rule
    assert [row["extra_info"]["id"] for row in test] == [f"test_{n}" for n in range(5)] + \
        ["hp-dev-0", "hp-dev-1", "hp-dev-2"]


def test_flashrag_test_datasets_option(tmp_path):
    assert run_cli("rl", "--source", "flashrag", "--input-dir", FIXTURES / "eval_flashrag",
                   "--train-datasets", "hotpotqa", "--test-datasets", "bamboogle", "--test-limit", "1",
                   "--out", tmp_path) == 0
    assert len(read_rows(tmp_path / "train.parquet")) == 2
    assert [row["data_source"] for row in read_rows(tmp_path / "test.parquet")] == ["bamboogle"]


@pytest.mark.parametrize("mode, folder, sizes", [("sq", "hotpotqa_train_filter", (2, 1)),
                                                 ("mq", "hotpotqa_train_filter_mq", (3, 2))])
def test_ragr1_local_copy(tmp_path, mode, folder, sizes):
    assert run_cli("rl", "--source", "ragr1", "--input-dir", FIXTURES / "rl_ragr1_repo", "--mode", mode,
                   "--out", tmp_path) == 0
    train, test = read_rows(tmp_path / "train.parquet"), read_rows(tmp_path / "test.parquet")
    assert (len(train), len(test)) == sizes
    assert {row["data_source"] for row in train + test} == {folder}
    assert all(len(row["reward_model"]["ground_truth"]["target"]) == 1 for row in train + test)
    assert all(row["extra_info"]["question"].endswith("?") for row in train)


def test_ragr1_set_can_differ_from_the_prompt_mode(tmp_path):
    assert run_cli("rl", "--source", "ragr1", "--input-dir", FIXTURES / "rl_ragr1_repo" / "RAG-R1",
                   "--mode", "mq", "--ragr1-set", "sq", "--out", tmp_path) == 0
    row = read_rows(tmp_path / "train.parquet")[0]
    assert row["data_source"] == "hotpotqa_train_filter"
    assert row["prompt"][0]["content"] == render_prompt(row["extra_info"]["question"], MQ_PROMPT_TEMPLATE)


def _out_with_old_files(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.parquet").write_bytes(b"old train")
    return out


def _assert_untouched(out: Path) -> None:
    assert [path.name for path in out.iterdir()] == ["train.parquet"]  # no test.parquet, no staging folder
    assert (out / "train.parquet").read_bytes() == b"old train"


@pytest.mark.parametrize("name, message", [
    ("rl_bad_json.jsonl", "rl_bad_json.jsonl, row 2: not valid JSON"),
    ("rl_missing_question.jsonl", "rl_missing_question.jsonl, row 3, field 'question': missing"),
    ("rl_wrong_answers.json", "rl_wrong_answers.json, row 2, field 'golden_answers': expected a string or"),
    ("rl_questions.tsv", "rl_questions.tsv: unknown file type"),
    ("no_such_file.jsonl", "no_such_file.jsonl: no such file"),
])
def test_malformed_input_names_file_row_field_and_writes_nothing(tmp_path, caplog, name, message):
    out = _out_with_old_files(tmp_path)
    with caplog.at_level(logging.ERROR):
        assert run_cli("rl", "--input", FIXTURES / name, "--out", out) == 2
    assert message in caplog.text
    _assert_untouched(out)


def test_malformed_test_input_writes_nothing(tmp_path, caplog):
    out = _out_with_old_files(tmp_path)
    with caplog.at_level(logging.ERROR):
        assert run_cli("rl", "--input", FIXTURES / "rl_flashrag.jsonl", "--test-input",
                       FIXTURES / "rl_missing_question.jsonl", "--out", out) == 2
    assert "rl_missing_question.jsonl, row 3, field 'question'" in caplog.text
    _assert_untouched(out)


def test_a_failure_while_writing_leaves_nothing_partial(tmp_path, monkeypatch):
    from ragr1_verl.data import rl

    real_write = rl.write_rl_parquet

    def write_then_fail(rows, path):
        if Path(path).name == "test.parquet":
            raise OSError("disk full")
        real_write(rows, path)

    monkeypatch.setattr(rl, "write_rl_parquet", write_then_fail)
    out = _out_with_old_files(tmp_path)
    with pytest.raises(OSError, match="disk full"):
        run_cli("rl", "--source", "demo", "--out", out)
    _assert_untouched(out)


@pytest.mark.parametrize("args, message", [
    (["--source", "demo", "--test-input", "x.jsonl"], "--test-input does not apply to --source demo"),
    (["--source", "flashrag", "--test-size", "0.1"], "--test-size does not apply to --source flashrag"),
    (["--input", "x.jsonl", "--input-dir", "d"], "--input-dir does not apply to --input"),
    (["--source", "demo", "--train-datasets", "nq"], "apply to --source flashrag only"),
    (["--source", "demo", "--test-size", "0.1"], "--test-size does not apply to --source demo"),
    (["--source", "demo", "--prompt-template", "no placeholder here"], "--prompt-template"),
    (["--source", "ragr1", "--input-dir", str(FIXTURES / "eval_flashrag")], "no RAG-R1 mq train file"),
])
def test_options_that_do_not_fit_are_refused(tmp_path, caplog, args, message):
    with caplog.at_level(logging.ERROR):
        assert run_cli("rl", *args, "--out", tmp_path / "out") == 2
    assert message in caplog.text
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args", [["--test-size", "0"], ["--test-size", "1.5"], ["--limit", "0"],
                                  ["--test-datasets", "nq,squad"]])
def test_bad_option_values_are_usage_errors(tmp_path, args):
    with pytest.raises(SystemExit) as exit_info:
        run_cli("rl", "--source", "demo", *args, "--out", tmp_path)
    assert exit_info.value.code == 2


@pytest.mark.parametrize("source, named", [("flashrag", "'ragr1-test/no-such-dataset' (nq)"),
                                           ("ragr1", "'ragr1-test/no-such-dataset'")])
def test_unreachable_hub_is_a_clear_error_and_writes_nothing(tmp_path, source, named):
    result = run_console("rl", "--source", source, "--hub-dataset", "ragr1-test/no-such-dataset",
                         "--out", tmp_path / "out", home=tmp_path / "hf")
    assert result.returncode == 2, result.stderr
    assert f"hub dataset {named} could not be" in result.stderr
    assert "--input-dir" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_console_script_help():
    for args in ([], ["rl"]):
        result = subprocess.run([str(CONSOLE_SCRIPT), *args, "--help"], capture_output=True, text=True,
                                timeout=120, check=False)
        assert result.returncode == 0, result.stderr
        assert "usage: ragr1-data" in result.stdout
    flags = ("--source", "--input", "--mode", "--prompt-template", "--limit", "--seed", "--out",
             "--test-input", "--input-dir")
    assert all(flag in result.stdout for flag in flags)


def test_written_files_are_plain_verl_json_too(tmp_path):
    """The rows survive a JSON round trip (verl also reads .json/.jsonl), so nothing numpy-only slipped in."""
    assert run_cli("rl", "--input", FIXTURES / "rl_ragr1.json", "--test-size", "1", "--out", tmp_path) == 0
    rows = read_rows(tmp_path / "train.parquet")
    assert json.loads(json.dumps(rows)) == rows
