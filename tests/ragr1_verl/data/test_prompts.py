"""The prompt a model was trained with: recorded by ragr1-data, recovered from data files, checked by ragr1-eval."""

from __future__ import annotations

import json
import logging
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ragr1_verl.config import ConfigError, resolve_prompt_template
from ragr1_verl.data.cli import main as data_main
from ragr1_verl.protocol.prompts import (
    MQ_PROMPT_TEMPLATE,
    PROMPT_FILE,
    SQ_PROMPT_TEMPLATE,
    PromptRecord,
    render_prompt,
    template_from_file,
    template_from_rows,
    warn_if_untrained_prompt,
)
from ragr1_verl.records import DataError

OWN = "Think, then search with <search> q </search>.\nQ: {question}\nA:"


def test_a_template_is_recovered_from_rows_that_carry_their_question():
    questions = ["who built it", "when was it built?", "where"]
    rows = [(render_prompt(q, OWN), q) for q in questions]
    assert template_from_rows(rows) == OWN


def test_rows_without_questions_give_the_frame_their_messages_share():
    rows = [(render_prompt(q, OWN), None) for q in ("Who built it?", "Who sang it", "When was it?")]
    assert template_from_rows(rows) == OWN  # the shared "Who" and "?" stay with the questions


def test_no_template_when_the_rows_follow_different_instructions():
    rows = [(render_prompt("a?", MQ_PROMPT_TEMPLATE), "a?"), (render_prompt("b?", SQ_PROMPT_TEMPLATE), "b?")]
    assert template_from_rows(rows) is None
    assert template_from_rows([(render_prompt("a?", OWN), None)]) is None  # one message: no frame to see


def test_ragr1_data_rl_records_its_template_and_the_data_gives_it_back(tmp_path):
    template_file = tmp_path / "own.txt"
    template_file.write_text(OWN, encoding="utf-8")
    out = tmp_path / "rl"
    assert data_main(["rl", "--source", "demo", "--prompt-template", str(template_file), "--out", str(out)]) == 0
    assert PromptRecord.read(out / PROMPT_FILE).template == OWN
    assert template_from_file(out / "train.parquet") == OWN
    # --prompt-template takes it back from the data file or from the record
    assert resolve_prompt_template(str(out / "test.parquet"), "mq") == OWN
    assert resolve_prompt_template(str(out / PROMPT_FILE), "mq") == OWN
    again = tmp_path / "again"
    assert data_main(["rl", "--source", "demo", "--prompt-template", str(out / "train.parquet"),
                      "--out", str(again)]) == 0
    assert pq.read_table(again / "train.parquet").column("prompt").to_pylist() == \
        pq.read_table(out / "train.parquet").column("prompt").to_pylist()


def test_released_rows_keep_their_instruction_and_sft_records_it(tmp_path):
    released = "You are RAG-R1. Use <search> and <answer>. Question: {question}\n"
    rows = [{"instruction": render_prompt(q, released), "input": "",
             "output": f"<think>known</think><answer> {a} </answer>"}
            for q, a in (("capital of France?", "Paris"), ("largest ocean?", "Pacific"), ("red planet?", "Mars"))]
    source = tmp_path / "released.json"
    source.write_text(json.dumps(rows), encoding="utf-8")
    out = tmp_path / "sft"
    assert data_main(["sft", "--input", str(source), "--format", "released", "--include-wrong",
                      "--val-fraction", "0", "--out", str(out)]) == 0
    prompts = pq.read_table(out / "train.parquet").column("prompt").to_pylist()
    assert sorted(p[-1]["content"] for p in prompts) == sorted(r["instruction"] for r in rows)
    assert PromptRecord.read(out / PROMPT_FILE).template == released


def test_a_data_file_without_one_template_is_a_clear_error(tmp_path):
    path = tmp_path / "mixed.parquet"
    pq.write_table(pa.Table.from_pylist([
        {"prompt": [{"role": "user", "content": render_prompt("a?", MQ_PROMPT_TEMPLATE)}], "question": "a?"},
        {"prompt": [{"role": "user", "content": render_prompt("b?", SQ_PROMPT_TEMPLATE)}], "question": "b?"}]), path)
    with pytest.raises(DataError, match="no single prompt template"):
        template_from_file(path)
    with pytest.raises(ConfigError, match="mixed.parquet"):
        resolve_prompt_template(str(path), "mq")


def test_evaluating_with_another_prompt_than_the_checkpoints_warns(tmp_path, caplog):
    checkpoints = tmp_path / "ckpt"
    model = checkpoints / "global_step_9" / "huggingface"
    model.mkdir(parents=True)
    (checkpoints / "best").symlink_to("global_step_9")
    PromptRecord(OWN, "ragr1-data sft: the training rows' prompts").write(checkpoints)
    with caplog.at_level(logging.WARNING):
        assert not warn_if_untrained_prompt(checkpoints / "best" / "huggingface", OWN)
        assert warn_if_untrained_prompt(checkpoints / "best" / "huggingface", MQ_PROMPT_TEMPLATE)
    assert "differs from the one" in caplog.text and str(checkpoints / PROMPT_FILE) in caplog.text
    shutil.rmtree(checkpoints / "global_step_9")
    assert not warn_if_untrained_prompt("Qwen/Qwen2.5-7B-Instruct", MQ_PROMPT_TEMPLATE)  # nothing local
