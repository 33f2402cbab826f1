"""Question records: both row layouts, their errors, the verl row and its exact parquet schema."""

from __future__ import annotations

import json
from importlib import resources

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ragr1_verl.data.questions import (
    Question,
    demo_questions,
    hold_out,
    parse_flashrag_row,
    parse_question_row,
    parse_ragr1_row,
    resolve_template,
    rl_row,
    rl_schema,
    sample_questions,
    write_rl_parquet,
)
from ragr1_verl.protocol.prompts import MQ_PROMPT_TEMPLATE, SQ_PROMPT_TEMPLATE, render_prompt
from ragr1_verl.records import DataError
from ragr1_verl.reward import compute_score, gold_answers

LOCATION = {"path": "q.jsonl", "number": 7, "data_source": "nq", "split": "train"}


def test_flashrag_row_is_normalised():
    row = {"id": "train_3", "question": "  who wrote moby dick ",
           "golden_answers": [" Melville ", "Melville", 1851]}
    question = parse_flashrag_row(row, **LOCATION)
    assert question == Question(id="train_3", question="who wrote moby dick?", answers=["Melville", "1851"],
                                data_source="nq", split="train")


def test_ragr1_row_keeps_its_one_answer_whole():
    row = {"question": "Which seasons did they win?", "golden_answers": "2009 and 2010"}
    question = parse_ragr1_row(row, **LOCATION)
    assert question.answers == ["2009 and 2010"]
    assert question.id == "nq-7"  # RAG-R1 rows carry no id: source and row number stand in


def test_auto_layout_and_the_rows_own_data_source():
    flashrag = parse_question_row({"question": "a?", "golden_answers": ["x", "y"]}, **LOCATION)
    ragr1 = parse_question_row({"question": "b", "golden_answers": "z", "data_source": "hotpotqa"},
                               **LOCATION)
    assert (flashrag.answers, flashrag.data_source) == (["x", "y"], "nq")
    assert (ragr1.question, ragr1.answers, ragr1.data_source) == ("b?", ["z"], "hotpotqa")


@pytest.mark.parametrize("row, field, message", [
    ({"golden_answers": ["x"]}, "question", "missing"),
    ({"question": "   ", "golden_answers": ["x"]}, "question", "empty"),
    ({"question": ["a?"], "golden_answers": ["x"]}, "question", "expected a string, got list"),
    ({"question": "a?"}, "golden_answers", "missing"),
    ({"question": "a?", "golden_answers": {"target": "x"}}, "golden_answers", "got dict"),
    ({"question": "a?", "golden_answers": 3.5}, "golden_answers", "got float"),
    ({"question": "a?", "golden_answers": ["x", {"y": 1}]}, "golden_answers", "expected strings, got dict"),
    ({"question": "a?", "golden_answers": ["x", True]}, "golden_answers", "expected strings, got bool"),
    ({"question": "a?", "golden_answers": [" ", ""]}, "golden_answers", "no non-empty answer"),
    ({"question": "a?", "golden_answers": ["x"], "id": {"n": 1}}, "id", "expected a string or an integer"),
])
def test_bad_rows_name_file_row_and_field(row, field, message):
    with pytest.raises(DataError) as error:
        parse_question_row(row, **LOCATION)
    assert str(error.value).startswith(f"q.jsonl, row 7, field {field!r}: ")
    assert message in str(error.value)


def test_layout_specific_parsers_refuse_the_other_layout():
    with pytest.raises(DataError, match=r"'golden_answers': expected a list of strings \(FlashRAG rows\)"):
        parse_flashrag_row({"question": "a?", "golden_answers": "x"}, **LOCATION)
    with pytest.raises(DataError, match=r"field 'golden_answers': expected a string \(RAG-R1 rows\)"):
        parse_ragr1_row({"question": "a?", "golden_answers": ["x"]}, **LOCATION)
    with pytest.raises(DataError, match="q.jsonl, row 7: expected an object, got list"):
        parse_question_row(["a?", "x"], **LOCATION)


def test_rl_row_is_the_exact_verl_row():
    question = Question(id="t1", question="Who wrote Moby Dick?", answers=["Melville", "Herman Melville"],
                        data_source="nq", split="test")
    assert rl_row(question, index=4, split="test", mode="sq") == {
        "data_source": "nq",
        "prompt": [{"role": "user", "content": render_prompt("Who wrote Moby Dick?", SQ_PROMPT_TEMPLATE)}],
        "ability": "fact-reasoning",
        "reward_model": {"style": "rule", "ground_truth": {"target": ["Melville", "Herman Melville"]}},
        "extra_info": {"index": 4, "split": "test", "id": "t1", "question": "Who wrote Moby Dick?",
                       "answers": ["Melville", "Herman Melville"]},
        "agent_name": "ragr1_agent",
    }


def test_rl_row_template_choice():
    question = Question(id="t1", question="Capital of Mali?", answers=["Bamako"])
    assert rl_row(question, index=0, split="train")["prompt"][0]["content"] == \
        render_prompt("Capital of Mali?", MQ_PROMPT_TEMPLATE)
    custom = rl_row(question, index=0, split="train", template="Q: {question}\nA:")
    assert custom["prompt"] == [{"role": "user", "content": "Q: Capital of Mali?\nA:"}]


def test_parquet_schema_is_exact_even_when_empty(tmp_path):
    question = Question(id="t1", question="Capital of Mali?", answers=["Bamako"], data_source="nq")
    row = rl_row(question, index=0, split="train")
    write_rl_parquet([row], tmp_path / "one.parquet")
    write_rl_parquet([], tmp_path / "none.parquet")
    expected = pa.schema([
        ("data_source", pa.string()),
        ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        ("ability", pa.string()),
        ("reward_model", pa.struct([("style", pa.string()),
                                    ("ground_truth", pa.struct([("target", pa.list_(pa.string()))]))])),
        ("extra_info", pa.struct([("index", pa.int64()), ("split", pa.string()), ("id", pa.string()),
                                  ("question", pa.string()), ("answers", pa.list_(pa.string()))])),
        ("agent_name", pa.string()),
    ])
    for name in ("one.parquet", "none.parquet"):
        assert pq.read_schema(tmp_path / name).remove_metadata().equals(expected)
    assert rl_schema().equals(expected)
    assert pq.read_table(tmp_path / "one.parquet").to_pylist() == [row]


def test_the_reward_accepts_the_written_ground_truth(tmp_path):
    question = Question(id="t1", question="Capital of Mali?", answers=["Bamako", "Bamako, Mali"])
    write_rl_parquet([rl_row(question, index=0, split="train")], tmp_path / "x.parquet")
    ground_truth = pq.read_table(tmp_path / "x.parquet").to_pylist()[0]["reward_model"]["ground_truth"]
    assert gold_answers(ground_truth) == ["Bamako", "Bamako, Mali"]
    assert compute_score("nq", "<think>t</think><answer> bamako </answer>", ground_truth)["score"] == 1.0


def _questions(count: int) -> list[Question]:
    return [Question(id=str(n), question=f"q{n}?", answers=["a"]) for n in range(count)]


def test_sample_questions_is_seeded_and_keeps_order():
    questions = _questions(50)
    first, again, other = (sample_questions(questions, 10, seed) for seed in (1, 1, 2))
    assert first == again and first != other
    assert [int(q.id) for q in first] == sorted(int(q.id) for q in first)
    assert sample_questions(questions, None, 1) == questions == sample_questions(questions, 99, 1)


def test_hold_out_fraction_and_count():
    train, test = hold_out(_questions(40), 0.05, seed=3)
    assert (len(train), len(test)) == (38, 2)
    assert {q.id for q in train}.isdisjoint(q.id for q in test)
    assert len(hold_out(_questions(3), 0.05, seed=3)[1]) == 1  # at least one test question
    assert len(hold_out(_questions(10), 4, seed=3)[1]) == 4
    with pytest.raises(DataError, match="1 question"):
        hold_out(_questions(1), 0.05, seed=3)


def test_template_errors_become_data_errors(tmp_path):
    assert resolve_template("sq", "mq") == SQ_PROMPT_TEMPLATE
    with pytest.raises(DataError, match="--prompt-template"):
        resolve_template(str(tmp_path / "missing.txt"), "mq")


def test_demo_questions():
    questions = demo_questions()
    with resources.as_file(resources.files("retriever_server").joinpath("demo", "questions.jsonl")) as path:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(questions) == len(rows) and [q.id for q in questions] == [row["id"] for row in rows]
    assert {q.data_source for q in questions} == {"demo"}
    assert all(q.question.endswith("?") and q.answers for q in questions)
    assert questions[0].id == "demo-000"


def test_demo_question_parts_and_their_scripted_steps():
    everything = demo_questions()
    parts = {part: demo_questions(part=part) for part in ("train", "dev", "test")}
    assert sum(len(questions) for questions in parts.values()) == len(everything)
    assert len(parts["dev"]) == 78 and len(parts["test"]) >= 66 and len(parts["train"]) >= 170
    assert all(q.extra["split"] == part for part, questions in parts.items() for q in questions)
    assert {q.split for q in demo_questions("validation", part="dev")} == {"validation"}  # the verl label
    bridge = next(q for q in parts["test"] if q.extra.get("hops") == "bridge")
    assert bridge.extra["type"] == "multi-hop" and len(bridge.extra["steps"]) == 2
    assert set(bridge.extra["supporting_ids"]) == {step["evidence_id"] for step in bridge.extra["steps"]}
    assert "extra" not in rl_row(bridge, index=0, split="test")["extra_info"]
    with pytest.raises(ValueError, match="part must be one of"):
        demo_questions(part="validation")


def test_training_time_validation_keeps_the_16_validation_dev_questions():
    """``part="val"``: the dev questions the SFT validation loss and RL validation use, the 16 first written; the
    62 added for choosing settings carry ``"validation": false`` and stay out of it."""
    dev, val = demo_questions(part="dev"), demo_questions("test", part="val")
    assert len(val) == 16 and {q.split for q in val} == {"test"}  # the verl label, as for any part
    assert all(q.extra["split"] == "dev" for q in val)
    validation = [q.id for q in val]
    assert validation == [q.id for q in dev if "validation" not in q.extra]
    others = [q for q in dev if q.id not in validation]
    assert len(others) == 62 and {q.extra["validation"] for q in others} == {False}
    assert max(validation) < min(q.id for q in others)  # the new ones were appended


def test_extra_fields_are_kept_and_do_not_change_equality():
    row = {"id": "q1", "question": "Who?", "golden_answers": ["A"], "steps": [{"query": "who"}],
           "hops": "bridge", "unrelated": 1}
    parsed = parse_question_row(row, path="x.jsonl", number=1, data_source="s", split="train")
    assert parsed.extra == {"steps": [{"query": "who"}], "hops": "bridge"}
    assert parsed == Question(id="q1", question="Who?", answers=["A"], data_source="s", split="train")
