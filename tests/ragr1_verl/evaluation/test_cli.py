"""``ragr1-eval`` end to end: the real rollout, the real demo retriever, a scripted OpenAI-compatible server."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest

from ragr1_verl.data.cli import main as data_main
from ragr1_verl.evaluation.cli import main as eval_main
from tests.ragr1_verl.evaluation.openai_fake import REFUSE, ScriptedCompletions

TURNS = {
    # question marker -> the model's turns, one per round
    "Sydney Opera House": ["<think>I need the date.</think><search> Sydney Opera House opening, Jørn Utzon </search>",
                           "<think>It says 1973.</think><answer> 1973 </answer>"],
    "Taj Mahal": ["<think>I know this.</think><answer> Shah Jahan </answer>"],
    "Berlin Wall": ["<search> Berlin Wall </search>", "<search> fall of the Berlin Wall </search>",
                    "<answer>1989</answer>"],
}

RESULT_KEYS = {"id", "data_source", "question", "golden_answers", "answer", "em", "f1", "substring_em", "format_ok",
               "searches", "queries", "invalid_actions", "retrieval_failures", "turns", "budget_hit", "truncated",
               "seconds", "retrieval_seconds", "response_tokens", "trajectory", "em_any_alias"}


def script(question_on: str, round_number: int) -> str:
    marker = next(marker for marker in TURNS if marker in question_on)
    return TURNS[marker][round_number]


@pytest.fixture(scope="module")
def demo_parquet(tmp_path_factory) -> Path:
    # the scripted turns follow the first demo questions (train part); the parquet schema is the eval one
    out = tmp_path_factory.mktemp("eval-data")
    assert data_main(["rl", "--source", "demo", "--out", str(out)]) == 0
    return out / "train.parquet"


@pytest.fixture
def served(tiny_model_dir):
    from transformers import AutoTokenizer

    with ScriptedCompletions(AutoTokenizer.from_pretrained(tiny_model_dir), script) as server:
        yield server


def evaluate(out: Path, parquet: Path, model_dir: Path, server_url: str, retriever: str, *extra: str) -> int:
    return eval_main(["--data", str(parquet), "--out", str(out), "--backend", "openai", "--model", str(model_dir),
                      "--server-url", server_url, "--retriever-url", retriever, "--limit", "3", "--greedy",
                      "--max-response-tokens", "3000", *extra])


def results(out: Path) -> dict[str, dict]:
    lines = (out / "results.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    return {next(marker for marker in TURNS if marker in r["question"]): r for r in records}


@pytest.mark.slow
def test_a_run_records_trajectories_scores_and_summaries(tmp_path, demo_parquet, tiny_model_dir, served,
                                                         demo_server):
    retriever = f"{demo_server[0]}/retrieve"
    assert evaluate(tmp_path, demo_parquet, tiny_model_dir, served.url, retriever) == 0

    by_question = results(tmp_path)
    assert all(set(record) == RESULT_KEYS for record in by_question.values())
    opera, taj, berlin = by_question["Sydney Opera House"], by_question["Taj Mahal"], by_question["Berlin Wall"]
    assert (opera["answer"], opera["em"], opera["searches"], opera["queries"]) == ("1973", 1.0, 1, 2)
    assert '"documents": [' in opera["trajectory"] and "Doc 1:" in opera["trajectory"]  # real passages
    assert opera["retrieval_seconds"] > 0 and opera["seconds"] >= opera["retrieval_seconds"]
    assert (taj["answer"], taj["em"], taj["searches"]) == ("Shah Jahan", 0.0, 0)
    assert (berlin["em"], berlin["searches"], berlin["queries"]) == (1.0, 2, 2)
    assert all(request["stop"] == ["</search>", "</answer>"] for request in served.requests)
    assert all(isinstance(request["prompt"], list) for request in served.requests)  # token ids in

    [summary] = json.loads((tmp_path / "summary.json").read_text())
    assert summary["questions"] == 3 and summary["em"] == pytest.approx(200 / 3)
    assert summary["retrieval_rounds"] == pytest.approx(1.0)
    assert summary["queries_per_search"] == pytest.approx(4 / 3)
    assert "| demo | 3 | 66.7 |" in (tmp_path / "summary.md").read_text()
    for plot in ("em_per_benchmark.png", "retrieval_rounds.png"):
        assert (tmp_path / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_a_rerun_resumes_and_a_line_cut_by_a_crash_is_redone(tmp_path, demo_parquet, tiny_model_dir, served,
                                                              demo_server):
    retriever = f"{demo_server[0]}/retrieve"
    assert evaluate(tmp_path, demo_parquet, tiny_model_dir, served.url, retriever) == 0
    calls = len(served.requests)
    assert evaluate(tmp_path, demo_parquet, tiny_model_dir, served.url, retriever) == 0
    assert len(served.requests) == calls  # nothing left to do

    path = tmp_path / "results.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])  # a write cut short
    assert evaluate(tmp_path, demo_parquet, tiny_model_dir, served.url, retriever) == 0
    assert len(served.requests) > calls
    assert len(results(tmp_path)) == 3


@pytest.mark.slow
def test_resuming_with_other_settings_is_refused(tmp_path, demo_parquet, tiny_model_dir, served, demo_server):
    retriever = f"{demo_server[0]}/retrieve"
    assert evaluate(tmp_path, demo_parquet, tiny_model_dir, served.url, retriever) == 0
    assert evaluate(tmp_path, demo_parquet, tiny_model_dir, served.url, retriever, "--max-turns", "2") == 2
    assert evaluate(tmp_path, demo_parquet, tiny_model_dir, served.url, retriever, "--max-turns", "2",
                    "--overwrite") == 0


@pytest.mark.slow
def test_compare_puts_two_runs_side_by_side(tmp_path, demo_parquet, tiny_model_dir, served, demo_server):
    retriever = f"{demo_server[0]}/retrieve"
    first, second = tmp_path / "sq", tmp_path / "mq"
    assert evaluate(first, demo_parquet, tiny_model_dir, served.url, retriever, "--max-turns", "1") == 0
    assert evaluate(second, demo_parquet, tiny_model_dir, served.url, retriever,
                    "--compare", str(first), "--labels", "sq", "mq") == 0

    table = (second / "comparison.md").read_text()
    assert table.splitlines()[0].startswith("| benchmark | EM sq | EM mq | rounds sq | rounds mq")
    # with one search allowed, the Berlin question's second search gets no results and no answer follows
    assert "| demo | 33.3 | 66.7 | 0.67 | 1.00 |" in table
    # 3 questions: each EM's interval spans everything; mq gains the Berlin question, paired with sq
    assert table.splitlines()[0].endswith("| EM sq 95% CI | EM mq 95% CI | EM mq - sq (paired, 95% CI) |")
    assert table.splitlines()[2].endswith("| [0.0, 100.0] | [0.0, 100.0] | +33.3 [0.0, 100.0] |")
    assert set(json.loads((second / "comparison.json").read_text())) == {"sq", "mq"}
    assert (second / "comparison.png").read_bytes()[:4] == b"\x89PNG"


def _write_run(out: Path, correct: dict[str, set[int]], questions: int = 20) -> Path:
    """A finished run's results.jsonl: per benchmark, ``questions`` questions, the ``correct`` ones right."""
    out.mkdir(parents=True)
    with (out / "results.jsonl").open("w", encoding="utf-8") as handle:
        for benchmark, right in correct.items():
            for index in reversed(range(questions)):  # the file's order is the order questions finished in
                em = float(index in right)
                handle.write(json.dumps({"id": f"{benchmark}/{index}", "data_source": benchmark,
                                         "question": f"{benchmark} question {index}?", "answer": "x", "em": em,
                                         "f1": em, "searches": 1, "queries": 2, "seconds": 1.0}) + "\n")
    return out


def test_compare_gives_each_em_its_interval_and_the_paired_difference(tmp_path, caplog):
    sft = _write_run(tmp_path / "sft", {"nq": set(range(5)), "hotpotqa": set(range(4))})
    rl = _write_run(tmp_path / "rl", {"nq": set(range(5)), "hotpotqa": set(range(14))})  # 10 more right
    with caplog.at_level(logging.INFO, logger="ragr1_verl.evaluation"):
        assert eval_main(["--out", str(rl), "--compare", str(sft)]) == 0

    lines = (rl / "comparison.md").read_text().splitlines()
    assert lines[0] == ("| benchmark | EM sft | EM rl | rounds sft | rounds rl | s/q sft | s/q rl | EM sft 95% CI | "
                        "EM rl 95% CI | EM rl - sft (paired, 95% CI) |")
    cells = {line.split(" | ")[0][2:]: line.strip("| ").split(" | ") for line in lines[2:]}
    assert cells["nq"][-1] == "+0.0 [0.0, 0.0]"  # the same answers: no difference, exactly
    assert cells["hotpotqa"][-1] == "+50.0 [30.0, 70.0]"  # 10 of 20 gained, none lost
    assert cells["average"][1:3] == ["22.5", "47.5"] and cells["average"][-1].startswith("+25.0 [")
    low, high = map(float, cells["hotpotqa"][-2].strip("[]").split(", "))
    assert low < 70.0 < high  # rl's own EM on hotpotqa, 14 of 20
    assert "EM rl - sft (paired, 95% CI)" in caplog.text  # the table is printed too

    payload = json.loads((rl / "comparison.json").read_text())
    assert set(payload) == {"sft", "rl"}
    hotpot = next(row for row in payload["rl"] if row["benchmark"] == "hotpotqa")
    assert hotpot["em"] == 70.0 and hotpot["em_ci95"] == [low, high]
    assert hotpot["em_difference"] == {"vs": "sft", "mean": 50.0, "low": 30.0, "high": 70.0, "n": 20,
                                       "confidence": 0.95}


def test_compare_reports_each_seed_and_the_pooled_difference(tmp_path):
    sft = _write_run(tmp_path / "sft", {"nq": set(range(4))})
    seed0 = _write_run(tmp_path / "rl-seed0", {"nq": set(range(8))})
    seed1 = _write_run(tmp_path / "rl-seed1", {"nq": set(range(4))})
    assert eval_main(["--out", str(seed0), "--compare", str(sft), "--seed-runs", str(seed1)]) == 0

    text = (seed0 / "comparison.md").read_text()
    assert "| benchmark | rl-seed0 - sft | rl-seed1 - sft | pooled over 2 seeds |" in text
    # seed 0 gains 4 of 20 questions, seed 1 none: per question 0.5 on 4 of them, pooled +10 points
    assert re.search(r"\| nq \| \+20\.0 \[\S+, \S+\] \| \+0\.0 \[0\.0, 0\.0\] \| \+10\.0 \[\S+, \S+\] \|", text)
    [row] = json.loads((seed0 / "comparison.json").read_text())["rl-seed0"]
    seeds = row["em_difference_seeds"]
    assert set(seeds["seeds"]) == {"rl-seed0", "rl-seed1"} and seeds["pooled"]["mean"] == 10.0
    assert seeds["pooled"]["n"] == 20  # questions, not seeds x questions


def test_compare_names_the_questions_a_seed_run_lacks(tmp_path, caplog):
    sft = _write_run(tmp_path / "sft", {"nq": set()})
    rl = _write_run(tmp_path / "rl", {"nq": {1}})
    short = _write_run(tmp_path / "short", {"nq": {1}}, questions=19)
    assert eval_main(["--out", str(rl), "--compare", str(sft), "--seed-runs", str(short)]) == 2
    assert "--seed-runs: the runs hold different questions (1 only in sft: 'nq: nq question 19?')" in caplog.text
    assert eval_main(["--out", str(rl), "--seed-runs", str(short)]) == 2
    assert "--seed-runs needs --compare" in caplog.text
    # plain --compare of runs on other questions still compares, without the paired column's number
    caplog.clear()
    assert eval_main(["--out", str(short), "--compare", str(sft)]) == 0
    assert "| - (other questions) |" in (short / "comparison.md").read_text()
    assert "nq: no paired difference" in caplog.text


@pytest.mark.slow
def test_a_server_without_vllms_extensions_gets_its_stop_string_back(tmp_path, demo_parquet, tiny_model_dir,
                                                               demo_server):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    with ScriptedCompletions(tokenizer, script, flavor="openai") as plain:
        assert evaluate(tmp_path, demo_parquet, tiny_model_dir, plain.url, f"{demo_server[0]}/retrieve") == 0
    assert {marker: r["searches"] for marker, r in results(tmp_path).items()} == {
        "Sydney Opera House": 1, "Taj Mahal": 0, "Berlin Wall": 2}


def test_bad_input_is_a_clear_error_and_writes_no_results(tmp_path, tiny_model_dir, caplog):
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"data_source": "nq", "prompt": [{"role": "user", "content": "q"}]}) + "\n")
    code = eval_main(["--data", str(broken), "--out", str(tmp_path / "run"), "--backend", "openai",
                      "--model", str(tiny_model_dir), "--server-url", "http://127.0.0.1:9"])
    assert code == 2
    assert f"{broken}, row 1, field 'reward_model': missing" in caplog.text
    assert not (tmp_path / "run" / "results.jsonl").exists()


@pytest.mark.slow
def test_the_transformers_backend_runs_a_local_model_end_to_end(tmp_path, demo_parquet, tiny_model_dir,
                                                                demo_server):
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = shutil.copytree(tiny_model_dir, tmp_path / "model")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir)).save_pretrained(model_dir)
    out = tmp_path / "run"
    code = eval_main(["--data", str(demo_parquet), "--out", str(out), "--backend", "transformers",
                      "--model", str(model_dir), "--device", "cpu", "--retriever-url", f"{demo_server[0]}/retrieve",
                      "--limit", "2", "--max-tokens-per-turn", "8", "--max-response-tokens", "40"])
    assert code == 0
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == 2
    assert all(0 < r["response_tokens"] <= 40 and r["turns"] >= 1 and r["em"] in (0.0, 1.0) for r in records)
    assert json.loads((out / "summary.json").read_text())[0]["questions"] == 2


@pytest.mark.slow
def test_a_refused_question_is_left_out_and_retried_by_the_rerun(tmp_path, demo_parquet, tiny_model_dir,
                                                                 demo_server, caplog):
    from transformers import AutoTokenizer

    refusing = {"on": True}

    def flaky(question_on: str, round_number: int) -> str:
        return REFUSE if refusing["on"] and "Taj Mahal" in question_on else script(question_on, round_number)

    retriever = f"{demo_server[0]}/retrieve"
    with ScriptedCompletions(AutoTokenizer.from_pretrained(tiny_model_dir), flaky) as server:
        assert evaluate(tmp_path, demo_parquet, tiny_model_dir, server.url, retriever) == 1
        assert set(results(tmp_path)) == {"Sydney Opera House", "Berlin Wall"}
        assert "maximum context length" in caplog.text and "rerun the same command" in caplog.text
        refusing["on"] = False
        assert evaluate(tmp_path, demo_parquet, tiny_model_dir, server.url, retriever) == 0
    assert set(results(tmp_path)) == set(TURNS)


@pytest.mark.slow
def test_the_mode_brings_its_own_instructions_unless_the_data_prompt_is_asked_for(tmp_path, demo_parquet,
                                                                                  tiny_model_dir, served,
                                                                                  demo_server):
    from transformers import AutoTokenizer

    from ragr1_verl.protocol.prompts import MQ_PROMPT_TEMPLATE, SQ_PROMPT_TEMPLATE

    tokenizer, retriever = AutoTokenizer.from_pretrained(tiny_model_dir), f"{demo_server[0]}/retrieve"
    sq_only, mq_only = "write a search query between", "separated by commas"
    assert sq_only in SQ_PROMPT_TEMPLATE and mq_only in MQ_PROMPT_TEMPLATE  # the markers tell them apart
    assert evaluate(tmp_path / "sq", demo_parquet, tiny_model_dir, served.url, retriever, "--mode", "sq") == 0
    assert all(sq_only in tokenizer.decode(r["prompt"]) for r in served.requests)
    served.requests.clear()
    # the demo parquet was written with mq prompts: 'data' keeps them
    assert evaluate(tmp_path / "data", demo_parquet, tiny_model_dir, served.url, retriever, "--mode", "sq",
                    "--prompt-template", "data") == 0
    assert all(mq_only in tokenizer.decode(r["prompt"]) for r in served.requests)


def test_an_explicit_retriever_url_beats_the_environment(monkeypatch, tmp_path):
    from ragr1_verl.config import load_config
    from ragr1_verl.evaluation.cli import build_parser, settings_from

    monkeypatch.setenv("RAGR1_RETRIEVER_URL", "http://from-env:9000/retrieve")
    monkeypatch.setenv("RAGR1_RETRIEVER_TOKEN", "env-token")
    explicit = build_parser().parse_args(["--data", "x.parquet", "--out", str(tmp_path / "a"),
                                          "--retriever-url", "http://explicit:7000/retrieve",
                                          "--retriever-token", "cli"])
    retriever = load_config(settings_from(explicit).ragr1).retriever  # as the runner loads it
    assert retriever.urls == ("http://explicit:7000/retrieve",) and retriever.token == "cli"
    implicit = build_parser().parse_args(["--data", "x.parquet", "--out", str(tmp_path / "b")])
    retriever = load_config(settings_from(implicit).ragr1).retriever
    assert retriever.urls == ("http://from-env:9000/retrieve",) and retriever.token == "env-token"


def test_a_checkpoint_evaluated_with_another_prompt_than_its_training_one_is_warned_about(
        tmp_path, demo_parquet, tiny_model_dir, served, demo_server, caplog):
    import logging
    import shutil

    from ragr1_verl.protocol.prompts import SQ_PROMPT_TEMPLATE, PromptRecord

    checkpoint = tmp_path / "checkpoints" / "global_step_3" / "huggingface"
    shutil.copytree(tiny_model_dir, checkpoint)
    PromptRecord(SQ_PROMPT_TEMPLATE, "ragr1-data rl --prompt-template sq").write(tmp_path / "checkpoints")
    retriever = f"{demo_server[0]}/retrieve"
    with caplog.at_level(logging.WARNING):
        assert evaluate(tmp_path / "sq", demo_parquet, checkpoint, served.url, retriever, "--mode", "sq") == 0
    assert "differs from the one" not in caplog.text
    with caplog.at_level(logging.WARNING):
        assert evaluate(tmp_path / "mq", demo_parquet, checkpoint, served.url, retriever, "--mode", "mq") == 0
    assert "differs from the one" in caplog.text and "ragr1_prompt.json" in caplog.text


# --- --protocol paper ------------------------------------------------------------------------------------------

def _always_searching(tiny_model_dir):
    from transformers import AutoTokenizer

    return ScriptedCompletions(AutoTokenizer.from_pretrained(tiny_model_dir),
                               lambda question, round_number: f"<search> Berlin Wall, fall {round_number} </search>")


@pytest.mark.slow
def test_the_paper_protocol_stops_after_five_searches_with_1024_tokens_a_call(tmp_path, demo_parquet,
                                                                              tiny_model_dir, demo_server):
    retriever = f"{demo_server[0]}/retrieve"
    with _always_searching(tiny_model_dir) as server:
        assert evaluate(tmp_path / "paper", demo_parquet, tiny_model_dir, server.url, retriever, "--limit", "1",
                        "--protocol", "paper", "--max-response-tokens", "60000") == 0
        paper_requests, server.requests[:] = list(server.requests), []
        assert evaluate(tmp_path / "project", demo_parquet, tiny_model_dir, server.url, retriever, "--limit", "1",
                        "--protocol", "project", "--max-response-tokens", "60000") == 0
        project_requests = list(server.requests)
    [paper] = results_list(tmp_path / "paper")
    [project] = results_list(tmp_path / "project")
    # the original script: five generations, each search run, and no final round after the fifth
    assert len(paper_requests) == 5 and {r["max_tokens"] <= 1024 for r in paper_requests} == {True}
    assert paper_requests[0]["max_tokens"] == 1024
    assert (paper["searches"], paper["budget_hit"], paper["answer"], paper["em"]) == (5, True, None, 0.0)
    # the project's rollout: the same five searches, then one round that can only answer, 500 tokens a call
    assert len(project_requests) == 6 and project_requests[0]["max_tokens"] == 500
    assert project["searches"] == 5


def results_list(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.mark.slow
def test_the_paper_protocol_samples_with_the_checkpoints_generation_config(tmp_path, demo_parquet, tiny_model_dir,
                                                                           served, demo_server):
    import shutil

    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(tiny_model_dir, checkpoint)
    (checkpoint / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05, "temperature": 0.7}))
    def sampled(out: str, *extra: str) -> dict:  # no --greedy: the paper's evaluation samples
        served.requests.clear()
        assert eval_main(["--data", str(demo_parquet), "--out", str(tmp_path / out), "--backend", "openai",
                          "--model", str(checkpoint), "--server-url", served.url, "--retriever-url",
                          f"{demo_server[0]}/retrieve", "--limit", "1", "--protocol", "paper", *extra]) == 0
        return served.requests[0]

    first = sampled("paper")
    assert (first["temperature"], first["top_p"], first["top_k"], first["repetition_penalty"]) == (0.7, 0.8, 20, 1.05)
    assert sampled("paper-top-p", "--top-p", "0.95")["top_p"] == 0.95  # a given flag wins over the protocol
    summary = (tmp_path / "paper" / "summary.md").read_text()
    assert "Protocol: **paper**" in summary and "paper EM (RAG-R1-mq)" in summary


def test_the_paper_protocol_scores_its_normaliser_against_the_first_gold_answer():
    from ragr1_verl.evaluation.protocols import PAPER, PROJECT
    from ragr1_verl.evaluation.runner import protocol_em
    from ragr1_verl.reward import exact_match, normalize_answer, normalize_answer_eval_script

    # punctuation, underscores and curly quotes become spaces: hyphenated words stay two words
    assert normalize_answer_eval_script("‘The Eiffel-Tower’") == "eiffel tower"
    assert normalize_answer("\u2018The Eiffel-Tower\u2019") == "\u2018 eiffeltower\u2019"  # training keeps curly quotes
    assert normalize_answer_eval_script("New_York City!") == "new york city"
    assert normalize_answer_eval_script("rock `n´ roll") == "rock n roll"
    golds = ["Eiffel Tower", "La tour Eiffel"]
    assert protocol_em(PAPER, "the eiffel tower", golds, 1.0) == 1.0
    assert protocol_em(PAPER, "La tour Eiffel", golds, 1.0) == 0.0  # the original reads one `answer` field
    assert protocol_em(PROJECT, "La tour Eiffel", golds, float(exact_match("La tour Eiffel", golds))) == 1.0
    assert protocol_em(PAPER, "Eiffel-Tower", ["Eiffel Tower"], 0.0) == 1.0  # split, where training joins
    assert protocol_em(PAPER, None, golds, 0.0) == 0.0
