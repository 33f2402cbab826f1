"""``ragr1-data sft-generate`` against a scripted OpenAI-compatible teacher on loopback and the real demo retriever."""

from __future__ import annotations

import json
import logging
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ragr1_verl.data import cli
from ragr1_verl.data.questions import Question, demo_questions, rl_schema, sample_questions
from ragr1_verl.data.teacher.selection import QuestionState, SelectionSettings, next_attempt, select
from ragr1_verl.data.teacher.store import AttemptLog, TrajectoryRecord
from ragr1_verl.openai_client import restore_stop
from ragr1_verl.protocol.actions import INFORMATION_CLOSE
from ragr1_verl.protocol.observation import INVALID_ACTION_REMINDER, ObservationRenderer, policy_codec
from ragr1_verl.protocol.prompts import MQ_PROMPT_TEMPLATE, normalize_question, render_prompt
from ragr1_verl.records import DataError
from tests.loopback import LoopbackJSONServer
from tests.retriever_server.helpers import post_retrieve

FIXTURES = Path(__file__).parent / "fixtures"
QUESTIONS = FIXTURES / "gen_questions.jsonl"
SELECTION_QUESTIONS = FIXTURES / "gen_selection.jsonl"
ASSISTANT_HEADER = "<|im_start|>assistant\n"  # the tiny tokenizer's ChatML generation prompt
ATTEMPTS, KEPT = "attempts.jsonl", "sft_trajectories.jsonl"


# --- the scripted teacher -------------------------------------------------------------------------------------

@dataclass
class Call:
    """One request the teacher received: the question it is about, the assistant text so far, the round."""

    path: str
    body: dict
    question: str
    partial: str
    round: int
    temperature: float
    start: int = 0  # trajectories of this question begun at this temperature, this one included


Play = Callable[[Call], str]


def rounds(*replies: str) -> Play:
    """A teacher that writes ``replies[i]`` in round i (the last one again after that)."""
    return lambda call: replies[min(call.round, len(replies) - 1)]


def _observations(partial: str) -> int:
    return (partial.count(INFORMATION_CLOSE) + partial.count("That was neither a search")
            + partial.count("The search was not run"))


def _call(path: str, body: dict) -> Call:
    if path.endswith("/chat/completions"):
        messages = body["messages"]
        prompt = messages[0]["content"]
        partial = messages[-1]["content"] if messages[-1]["role"] == "assistant" else ""
    else:
        prompt, partial = body["prompt"].split(ASSISTANT_HEADER, 1)
    question = prompt.split("Question: ", 1)[1].split("\n", 1)[0]
    return Call(path, body, question, partial, _observations(partial), body["temperature"])


class ScriptedTeacher:
    """``/v1/completions`` and ``/v1/chat/completions`` on loopback, playing a script keyed on the question.

    Like vLLM it stops at the requested stop strings, leaves them out of the text and names them in
    ``stop_reason`` (``report_stop=False``: a server that does not; ``ignore_stop=True``: one that generates
    past them). A reply starting with ``LENGTH:`` ends as if the token cap was hit. ``statuses`` are answered
    one per request before any reply; ``fail(call)`` may return a status for any request.
    """

    def __init__(self, script: dict[str, Play], *, report_stop: bool = True, ignore_stop: bool = False):
        self.script, self.report_stop, self.ignore_stop = script, report_stop, ignore_stop
        self.calls: list[Call] = []
        self.statuses: list[int] = []
        self.fail: Callable[[Call], int | None] = lambda call: None
        self._starts: Counter = Counter()
        self._lock = threading.Lock()

    def __enter__(self):
        self._server = LoopbackJSONServer(self.answer).start()
        self.url = f"{self._server.base_url}/v1"
        return self

    def __exit__(self, *exc_info) -> None:
        self._server.stop()

    def answer(self, path: str, body: dict) -> tuple[int, dict]:
        if path not in ("/v1/completions", "/v1/chat/completions"):
            return 404, {"error": f"no route {path}"}
        call = _call(path, body)
        with self._lock:
            self.calls.append(call)
            status = self.statuses.pop(0) if self.statuses else self.fail(call)
            if status is not None:
                return status, {"error": {"message": f"scripted failure {status}"}}
            self._starts[call.question, call.temperature] += int(call.round == 0)
            call.start = self._starts[call.question, call.temperature]
        return 200, {"id": "scripted", "choices": [self._choice(call, self.script[call.question](call))]}

    def _choice(self, call: Call, text: str) -> dict:
        finish, stop_reason = "stop", None
        if text.startswith("LENGTH:"):
            text, finish = text.removeprefix("LENGTH:"), "length"
        elif not self.ignore_stop:
            hits = [(text.find(stop), stop) for stop in call.body["stop"] if stop in text]
            if hits:
                position, stop_reason = min(hits)
                text = text[:position]
        choice = {"index": 0, "finish_reason": finish}
        if self.report_stop:
            choice["stop_reason"] = stop_reason
        if call.path.endswith("/chat/completions"):
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return choice

    def asked(self, question: str) -> list[Call]:
        return [call for call in self.calls if call.question == question]


# --- the script for gen_questions.jsonl ----------------------------------------------------------------------

MULTI_Q = "What is the capital city of Madagascar?"
DIRECT_Q = "In what year was the Sydney Opera House formally opened?"
WRONG_Q = "What is the capital of Greenland?"
MALFORMED_Q = "Which English king was killed at the Battle of Hastings?"
CUT_Q = "On which street did the Great Fire of London start?"
MULTI_QUERIES = ["capital of Madagascar", "Sydney Opera House opening year"]
MULTI_ROUNDS = (
    "<think>Two lookups at once.</think>\n<search> capital of Madagascar, Sydney Opera House opening year </search>",
    "<think>Doc 1 names the capital.</think>\n<answer> Antananarivo </answer>",
)
SCRIPT: dict[str, Play] = {
    MULTI_Q: rounds(*MULTI_ROUNDS),
    DIRECT_Q: rounds("<think>I know this one.</think>\n<answer>1973</answer>"),
    # The text after </search> is never shown: a server honouring stop strings cuts it, else the episode does.
    WRONG_Q: rounds("<think>Look it up.</think>\n<search> capital of Greenland </search>\n<information>invented"
                    "</information>", "<think>Guessing.</think>\n<answer> Reykjavik </answer>"),
    MALFORMED_Q: rounds("I believe it was King Harold."),
    CUT_Q: rounds("LENGTH:<think>The fire started in a bakery on", "<think>Pudding Lane.</think><answer>Pudding "
                  "Lane</answer>"),
}
IDS = {MULTI_Q: "g-multi", DIRECT_Q: "g-direct", WRONG_Q: "g-wrong", MALFORMED_Q: "g-malformed", CUT_Q: "g-cut"}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def by_id(records: list[dict]) -> dict[str, dict]:
    return {record["id"]: record for record in records}


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def generate(tiny_model_dir, retriever_url):
    """Run the subcommand through the ``ragr1-data`` entry point; returns its exit code."""

    def run(out: Path, teacher: ScriptedTeacher | str, *extra: object, questions: Path | None = QUESTIONS,
            tokenizer: bool = True) -> int:
        url = teacher if isinstance(teacher, str) else teacher.url
        source = ["--input", questions] if questions is not None else ["--source", "demo"]
        args = ["sft-generate", *source, "--out", out, "--teacher-url", url, "--teacher-model", "teacher-72b",
                "--retriever-url", retriever_url, "--teacher-backoff", "0.01", "--no-progress"]
        if tokenizer:
            args += ["--tokenizer", tiny_model_dir]
        return cli.main([str(arg) for arg in [*args, *extra]])

    return run


@pytest.fixture(scope="module")
def basic_run(generate, tmp_path_factory) -> tuple[Path, list[Call]]:
    """One run over gen_questions.jsonl, one trajectory at a time (the retriever sees each search alone)."""
    out = tmp_path_factory.mktemp("basic")
    with ScriptedTeacher(SCRIPT) as teacher:
        assert generate(out, teacher, "--concurrency", 1) == 0
    return out, teacher.calls


# --- trajectories -----------------------------------------------------------------------------------------------

def test_a_multi_query_search_gets_the_real_passages_in_the_observation_format(basic_run, retriever_url,
                                                                               demo_server, tokenizer):
    out, calls = basic_run
    multi = by_id(read_jsonl(out / ATTEMPTS))["g-multi"]
    documents = post_retrieve(demo_server[0], {"queries": MULTI_QUERIES, "topk": 3}).json()["result"]
    renderer = ObservationRenderer(codec=policy_codec(tokenizer), max_tokens_per_unit=1000)
    observation = renderer.render(MULTI_QUERIES, documents)
    assert multi["trajectory"] == MULTI_ROUNDS[0] + observation + MULTI_ROUNDS[1]
    body = json.loads(observation.strip().removeprefix("<information>").removesuffix("</information>"))
    assert body["query"] == MULTI_QUERIES
    assert body["documents"][0].startswith('Doc 1: "Madagascar"')
    assert '"Sydney Opera House"' in body["documents"][1]
    assert (multi["answer"], multi["em"], multi["searches"], multi["turns"], multi["finish"]) == (
        "Antananarivo", 1, 1, 2, "answer")
    assert multi["messages"] == [{"role": "user",
                                  "content": render_prompt(MULTI_Q, MQ_PROMPT_TEMPLATE)}]
    # The second round continues the same assistant message: chat template, first round, observation.
    second = next(call for call in calls if call.question == MULTI_Q and call.round == 1)
    rendered = tokenizer.apply_chat_template(multi["messages"], tokenize=False, add_generation_prompt=True)
    assert second.body["prompt"] == rendered + MULTI_ROUNDS[0] + observation
    assert second.body["stop"] == ["</search>", "</answer>"]
    assert (second.body["model"], second.body["temperature"], second.body["max_tokens"]) == ("teacher-72b", 0.7, 1024)


def test_every_attempt_is_logged_and_only_exact_matches_are_kept(basic_run):
    out, _ = basic_run
    attempts = by_id(read_jsonl(out / ATTEMPTS))
    assert {identifier: record["em"] for identifier, record in attempts.items()} == {
        "g-multi": 1, "g-direct": 1, "g-wrong": 0, "g-malformed": 0, "g-cut": 1}
    wrong, malformed, cut = attempts["g-wrong"], attempts["g-malformed"], attempts["g-cut"]
    assert (wrong["answer"], wrong["searches"], wrong["finish"]) == ("Reykjavik", 1, "answer")
    assert "invented" not in wrong["trajectory"]
    assert malformed == {**malformed, "answer": None, "finish": "stopped", "turns": 1,
                         "trajectory": "I believe it was King Harold."}
    assert cut["trajectory"] == ("<think>The fire started in a bakery on" + INVALID_ACTION_REMINDER
                                 + "<think>Pudding Lane.</think><answer>Pudding Lane</answer>")
    assert (attempts["g-direct"]["searches"], attempts["g-direct"]["turns"]) == (0, 1)

    assert (cut["em"], cut["invalid_actions"], attempts["g-multi"]["invalid_actions"]) == (1, 1, 0)

    # g-cut is right but got a format reminder: no SFT sample (it would teach the format wrong).
    kept = read_jsonl(out / KEPT)
    assert sorted(record["id"] for record in kept) == ["g-direct", "g-multi"]
    assert all(record == attempts[record["id"]] for record in kept)
    assert set(kept[0]) >= {"id", "question", "golden_answers", "data_source", "messages", "trajectory", "answer",
                            "em", "searches", "attempt"}
    assert (kept[0]["data_source"], kept[0]["attempt"]) == ("gen_questions", 0)
    assert attempts["g-malformed"]["golden_answers"] == ["Harold II", "Harold"]
    assert sorted(path.name for path in out.iterdir()) == [ATTEMPTS, "ragr1_prompt.json", "run.json", KEPT]


class _Anything(dict):
    def __missing__(self, question: str) -> Play:
        return rounds("<think>No idea.</think><answer> unknown </answer>")


def test_the_demo_questions_with_a_seeded_limit(generate, tmp_path):
    with ScriptedTeacher(_Anything()) as teacher:
        assert generate(tmp_path, teacher, "--limit", 3, "--seed", 1, questions=None) == 0
    records = read_jsonl(tmp_path / ATTEMPTS)
    expected = sample_questions(demo_questions(part="train"), 3, 1)  # never the held-out test part
    assert sorted(record["id"] for record in records) == sorted(question.id for question in expected)
    assert {record["data_source"] for record in records} == {"demo"} and len(teacher.calls) == 3


def test_the_kept_file_is_what_ragr1_data_sft_reads(basic_run, tmp_path):
    out, _ = basic_run
    assert cli.main(["sft", "--input", str(out / KEPT), "--out", str(tmp_path), "--val-input", str(out / KEPT)]) == 0
    rows = pq.read_table(tmp_path / "train.parquet").to_pylist()
    kept = by_id(read_jsonl(out / KEPT))
    assert sorted(row["extra_info"]["id"] for row in rows) == sorted(kept)
    assert all(row["trajectory"] == kept[row["extra_info"]["id"]]["trajectory"] for row in rows)


@pytest.mark.parametrize("server", [{"report_stop": False}, {"ignore_stop": True}],
                         ids=["no-stop-reason", "ignores-stop-strings"])
def test_servers_that_hide_or_ignore_stop_strings_give_the_same_trajectories(generate, basic_run, tmp_path,
                                                                             server):
    with ScriptedTeacher(SCRIPT, **server) as teacher:
        assert generate(tmp_path, teacher, "--concurrency", 1) == 0
    assert read_jsonl(tmp_path / ATTEMPTS) == read_jsonl(basic_run[0] / ATTEMPTS)


def test_the_chat_api_continues_the_assistant_message_and_gives_the_same_trajectories(generate, basic_run,
                                                                                       tmp_path):
    with ScriptedTeacher(SCRIPT) as teacher:
        assert generate(tmp_path, teacher, "--api", "chat", "--concurrency", 1) == 0
    assert read_jsonl(tmp_path / ATTEMPTS) == read_jsonl(basic_run[0] / ATTEMPTS)
    first, second = teacher.asked(MULTI_Q)
    assert first.path == second.path == "/v1/chat/completions"
    assert [message["role"] for message in first.body["messages"]] == ["user"]
    assert "continue_final_message" not in first.body
    assert second.body["messages"][-1] == {"role": "assistant", "content": second.partial}
    assert second.partial.startswith(MULTI_ROUNDS[0] + "\n<information>\n")
    assert (second.body["continue_final_message"], second.body["add_generation_prompt"]) == (True, False)


def test_the_completions_api_needs_the_tokenizer_and_the_chat_api_warns_without_it(generate, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    with ScriptedTeacher(SCRIPT) as teacher:
        assert generate(tmp_path / "a", teacher, tokenizer=False) == 2
        assert teacher.calls == []
        assert generate(tmp_path / "b", teacher, "--api", "chat", tokenizer=False) == 0
    assert "give --tokenizer" in caplog.text and "not cut to --max-obs-tokens-per-query" in caplog.text
    assert len(read_jsonl(tmp_path / "b" / ATTEMPTS)) == 5


def test_a_refused_continuation_ends_the_trajectory(generate, tmp_path):
    with ScriptedTeacher(SCRIPT) as teacher:
        teacher.fail = lambda call: 400 if call.question == MULTI_Q and call.round == 1 else None
        assert generate(tmp_path, teacher) == 0
    multi = by_id(read_jsonl(tmp_path / ATTEMPTS))["g-multi"]
    assert (multi["finish"], multi["answer"], multi["em"], multi["searches"]) == ("rejected", None, 0, 1)
    assert multi["trajectory"].endswith("</information>\n")
    assert len(teacher.asked(MULTI_Q)) == 2  # a 400 is not retried


# --- resuming ---------------------------------------------------------------------------------------------------

def test_a_rerun_asks_the_teacher_nothing_for_finished_ids(generate, tmp_path):
    with ScriptedTeacher(SCRIPT) as teacher:
        assert generate(tmp_path, teacher) == 0
        asked, kept = len(teacher.calls), (tmp_path / KEPT).read_text()
        assert generate(tmp_path, teacher) == 0
        assert len(teacher.calls) == asked == 8
    assert (tmp_path / KEPT).read_text() == kept
    assert len(read_jsonl(tmp_path / ATTEMPTS)) == 5


def test_a_rerun_after_a_crash_drops_the_cut_line_and_runs_only_the_rest(generate, basic_run, tmp_path):
    lines = (basic_run[0] / ATTEMPTS).read_text(encoding="utf-8").splitlines(keepends=True)
    (tmp_path / ATTEMPTS).write_text("".join(lines[:2]) + lines[2][:60], encoding="utf-8")
    finished = {json.loads(line)["id"] for line in lines[:2]}
    with ScriptedTeacher(SCRIPT) as teacher:
        assert generate(tmp_path, teacher) == 0
    assert {IDS[call.question] for call in teacher.calls} == set(IDS.values()) - finished
    records = read_jsonl(tmp_path / ATTEMPTS)
    assert sorted(record["id"] for record in records) == sorted(IDS.values())
    assert sorted(record["id"] for record in read_jsonl(tmp_path / KEPT)) == ["g-direct", "g-multi"]


def test_a_run_stopped_by_the_teacher_keeps_its_finished_work_and_the_rerun_completes_it(generate, tmp_path,
                                                                                         caplog):
    with ScriptedTeacher(SCRIPT) as teacher:
        teacher.fail = lambda call: 503 if call.question == WRONG_Q else None
        assert generate(tmp_path, teacher, "--concurrency", 1, "--teacher-retries", 2) == 1
    assert len(teacher.asked(WRONG_Q)) == 3
    assert "failed 3 times in a row" in caplog.text and f"{teacher.url}/completions" in caplog.text
    assert "run the same command again to resume" in caplog.text
    assert sorted(record["id"] for record in read_jsonl(tmp_path / ATTEMPTS)) == ["g-direct", "g-multi"]
    assert sorted(record["id"] for record in read_jsonl(tmp_path / KEPT)) == ["g-direct", "g-multi"]
    with ScriptedTeacher(SCRIPT) as healthy:
        assert generate(tmp_path, healthy) == 0
    assert {call.question for call in healthy.calls} == {WRONG_Q, MALFORMED_Q, CUT_Q}
    assert len(read_jsonl(tmp_path / ATTEMPTS)) == 5


@pytest.mark.parametrize("change, field", [(("--mode", "sq"), "mode"),
                                           (("--extra-body", '{"top_k": 20}'), "extra_body"),
                                           (("--api", "chat"), "api")])
def test_a_folder_made_with_other_settings_is_refused(generate, tmp_path, caplog, change, field):
    with ScriptedTeacher(SCRIPT) as teacher:
        assert generate(tmp_path, teacher) == 0
        asked = len(teacher.calls)
        assert generate(tmp_path, teacher, *change) == 2
        assert len(teacher.calls) == asked
    assert f"run.json, field '{field}'" in caplog.text


def test_a_damaged_log_line_is_an_error_naming_the_row(generate, tmp_path, caplog):
    (tmp_path / ATTEMPTS).write_text('{"id": "g-multi", "attempt": 0, "em": 1}\nnot json\n{"id": "x"}\n')
    with ScriptedTeacher(SCRIPT) as teacher:
        assert generate(tmp_path, teacher) == 2
    assert f"{tmp_path / ATTEMPTS}, row 2: not valid JSON" in caplog.text
    assert teacher.calls == []


def test_duplicate_question_ids_are_refused(generate, tmp_path, caplog):
    duplicated = tmp_path / "questions.jsonl"
    duplicated.write_text(QUESTIONS.read_text() + QUESTIONS.read_text().splitlines()[0] + "\n")
    with ScriptedTeacher(SCRIPT) as teacher:
        assert generate(tmp_path / "out", teacher, questions=duplicated) == 2
    assert "'g-multi' appears twice" in caplog.text


def test_the_attempt_log_repairs_only_its_last_line(tmp_path):
    path = tmp_path / ATTEMPTS
    record = TrajectoryRecord(id="q1", question="Q?", golden_answers=["a"], data_source="demo",
                              messages=[{"role": "user", "content": "Q?"}], trajectory="<answer>a</answer>",
                              answer="a", em=1, searches=0, invalid_actions=0, attempt=0, temperature=0.7, turns=1,
                              finish="answer")
    path.write_text(record.to_json() + "\n" + record.to_json().replace('"q1"', '"q2"'))  # newline lost
    log = AttemptLog(path)
    assert [(s.id, s.attempt, s.em) for s in log.load()] == [("q1", 0, 1), ("q2", 0, 1)]
    assert path.read_text().endswith("}\n")
    log.append(record)
    log.close()
    assert len(read_jsonl(path)) == 3
    path.write_text(path.read_text() + '{"id": "q3", "att')
    assert len(AttemptLog(path).load()) == 3 and len(read_jsonl(path)) == 3
    path.write_text('{"id": "q1", "attempt": 0, "em": true}\n')
    with pytest.raises(DataError, match="row 1, field 'em'"):
        AttemptLog(path).load()


# --- teacher failures -----------------------------------------------------------------------------------------

def test_teacher_5xx_answers_are_retried(generate, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    with ScriptedTeacher(SCRIPT) as teacher:
        teacher.statuses = [503, 502, 429]
        assert generate(tmp_path, teacher, "--concurrency", 1) == 0
    assert len(teacher.calls) == 8 + 3
    assert len(read_jsonl(tmp_path / ATTEMPTS)) == 5
    assert "HTTP 503" in caplog.text and "3 retries" in caplog.text


def test_a_teacher_that_keeps_failing_is_a_clear_error_and_leaves_nothing_partial(generate, tmp_path, caplog):
    started = time.monotonic()
    with ScriptedTeacher(SCRIPT) as teacher:
        teacher.fail = lambda call: 500
        assert generate(tmp_path, teacher, "--teacher-retries", 2, "--select-rl-data") == 1
    assert time.monotonic() - started < 30
    assert "failed 3 times in a row (last: HTTP 500" in caplog.text
    assert read_jsonl(tmp_path / KEPT) == [] and read_jsonl(tmp_path / ATTEMPTS) == []
    assert not list(tmp_path.glob("*.parquet")) and not list(tmp_path.glob(".*"))


def test_an_unreachable_teacher_is_a_clear_error(generate, tmp_path, caplog):
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}/v1"
    assert generate(tmp_path, url, "--teacher-retries", 1) == 1
    assert f"the teacher at {url}/completions failed 2 times in a row" in caplog.text


def test_a_refused_first_request_stops_the_run_at_once(generate, tmp_path, caplog):
    with ScriptedTeacher(SCRIPT) as teacher:
        teacher.fail = lambda call: 404  # e.g. a model name the server does not serve
        assert generate(tmp_path, teacher, "--concurrency", 1) == 1
    assert len(teacher.calls) == 1
    assert "refused the request: HTTP 404" in caplog.text


def test_a_failing_retriever_stops_the_run_instead_of_logging_failure_trajectories(generate, demo_server, tmp_path,
                                                                                   caplog):
    with ScriptedTeacher(SCRIPT) as teacher:
        code = generate(tmp_path, teacher, "--concurrency", 1, "--retriever-url", f"{demo_server[0]}/missing")
    assert code == 1
    assert "the retriever at" in caplog.text and "failed a search" in caplog.text
    assert read_jsonl(tmp_path / ATTEMPTS) == []  # g-multi, the first question, searches first


@pytest.mark.parametrize(("text", "finish", "choice", "expected"), [
    ("<search> a", "stop", {"stop_reason": "</search>"}, "<search> a</search>"),
    ("<answer> b", "stop", {"matched_stop": "</answer>"}, "<answer> b</answer>"),  # SGLang's key
    ("<answer> b", "stop", {"stop_reason": None}, "<answer> b"),  # EOS: nothing matched
    ("<think>x</think><search> a", "stop", {}, "<think>x</think><search> a</search>"),  # inferred
    ("<search>a</search><answer> b", "stop", {}, "<search>a</search><answer> b</answer>"),
    ("<answer> b", "length", {}, "<answer> b"),
    ("<search> a </search>", "stop", {"stop_reason": "</search>"}, "<search> a </search>"),  # kept by the server
])
def test_restore_stop_puts_back_the_stop_string(text, finish, choice, expected):
    assert restore_stop(text, finish, choice).text == expected


# --- RL data selection ------------------------------------------------------------------------------------------

def _selection_script() -> tuple[dict[str, Play], dict[str, str]]:
    """Easy questions answered right at once; one right only on its third re-sample; one never right."""
    rows = read_jsonl(SELECTION_QUESTIONS)
    questions = {row["id"]: normalize_question(row["question"]) for row in rows}
    script: dict[str, Play] = {questions[row["id"]]: rounds(f"<think>Known.</think><answer>{row['golden_answers'][0]}"
                                                           "</answer>") for row in rows}
    script[questions["hard-answerable"]] = lambda call: (
        "<answer>Angara</answer>" if call.temperature == 1.2 and call.start == 3 else "<answer>Yenisei</answer>")
    script[questions["hard-hopeless"]] = rounds("<think>Guess.</think><answer>John Smith</answer>")
    return script, questions


def test_rl_selection_resamples_the_misses_and_keeps_a_seeded_quarter_of_the_easy_ones(generate, tmp_path):
    script, questions = _selection_script()
    with ScriptedTeacher(script) as teacher:
        assert generate(tmp_path, teacher, "--select-rl-data", "--seed", 7, "--val-fraction", 0,
                        questions=SELECTION_QUESTIONS) == 0
    assert [call.temperature for call in teacher.asked(questions["hard-answerable"])] == [0.7, 1.2, 1.2, 1.2]
    assert [call.temperature for call in teacher.asked(questions["hard-hopeless"])] == [0.7] + [1.2] * 10
    assert all(len(teacher.asked(questions[f"easy-{n}"])) == 1 for n in range(8))

    attempts = read_jsonl(tmp_path / ATTEMPTS)
    answerable = [(r["attempt"], r["em"], r["temperature"]) for r in attempts if r["id"] == "hard-answerable"]
    assert sorted(answerable) == [(0, 0, 0.7), (1, 0, 1.2), (2, 0, 1.2), (3, 1, 1.2)]
    assert sorted(r["attempt"] for r in attempts if r["id"] == "hard-hopeless") == list(range(11))
    assert sorted(r["id"] for r in read_jsonl(tmp_path / KEPT)) == [f"easy-{n}" for n in range(8)]

    easy_kept = [f"easy-{n}" for n in sorted(random.Random(7).sample(range(8), 2))]
    table = pq.read_table(tmp_path / "train.parquet")
    assert table.schema.remove_metadata().equals(rl_schema())
    rows = table.to_pylist()
    order = [row["id"] for row in read_jsonl(SELECTION_QUESTIONS)]
    assert [row["extra_info"]["id"] for row in rows] == sorted(["hard-answerable", *easy_kept], key=order.index)
    row = next(row for row in rows if row["extra_info"]["id"] == "hard-answerable")
    assert row["prompt"] == [{"role": "user", "content": render_prompt(questions["hard-answerable"],
                                                                                MQ_PROMPT_TEMPLATE)}]
    assert row["reward_model"] == {"style": "rule", "ground_truth": {"target": ["Angara", "Angara River"]}}
    assert (row["agent_name"], row["extra_info"]["split"]) == ("ragr1_agent", "train")
    assert not (tmp_path / "test.parquet").exists()
    report = json.loads((tmp_path / "rl_selection.json").read_text())
    assert report["counts"] == {"easy": 8, "easy_kept": 2, "answerable": 1, "unanswerable": 1, "selected": 3,
                                "train": 3, "test": 0}
    assert report["ids"]["unanswerable"] == ["hard-hopeless"]

    with ScriptedTeacher(script) as again:  # everything is decided: a rerun asks nothing, writes the same
        assert generate(tmp_path, again, "--select-rl-data", "--seed", 7, "--val-fraction", 0,
                        questions=SELECTION_QUESTIONS) == 0
    assert again.calls == [] and pq.read_table(tmp_path / "train.parquet").to_pylist() == rows


def test_rl_selection_without_the_filter_keeps_every_miss_and_resamples_nothing(generate, tmp_path):
    script, _ = _selection_script()
    with ScriptedTeacher(script) as teacher:
        assert generate(tmp_path, teacher, "--select-rl-data", "--no-answerability-filter", "--val-fraction", 0.34,
                        questions=SELECTION_QUESTIONS) == 0
    assert {call.temperature for call in teacher.calls} == {0.7}
    train = pq.read_table(tmp_path / "train.parquet").to_pylist()
    test = pq.read_table(tmp_path / "test.parquet").to_pylist()
    ids = {row["extra_info"]["id"] for row in train + test}
    assert {"hard-answerable", "hard-hopeless"} <= ids and len(ids) == 4 and len(test) == 1
    assert test[0]["extra_info"]["split"] == "test"


def test_resamples_run_at_the_resample_temperature_with_their_own_round_budget(generate, tmp_path):
    question = tmp_path / "one.jsonl"
    question.write_text('{"id": "searcher", "question": "Who served as chief engineer of the Golden Gate Bridge?", '
                        '"golden_answers": ["Joseph Strauss"]}\n')
    script = {"Who served as chief engineer of the Golden Gate Bridge?":
              rounds("<think>More.</think><search> Golden Gate Bridge chief engineer </search>")}
    with ScriptedTeacher(script) as teacher:
        assert generate(tmp_path / "out", teacher, "--select-rl-data", "--max-turns", 1, "--resample-limit", 1,
                        "--resample-max-turns", 3, "--resample-temperature", 1.1, "--val-fraction", 0,
                        questions=question) == 0
    records = sorted(read_jsonl(tmp_path / "out" / ATTEMPTS), key=lambda record: record["attempt"])
    assert [(r["attempt"], r["temperature"], r["turns"], r["searches"], r["finish"]) for r in records] == [
        (0, 0.7, 2, 1, "budget"), (1, 1.1, 4, 3, "budget")]
    assert pq.read_table(tmp_path / "out" / "train.parquet").num_rows == 0  # nothing answerable: an empty set


def test_next_attempt_follows_the_paper():
    selection = SelectionSettings(resample_limit=3)
    state = QuestionState()
    assert next_attempt(state, None) == 0 and next_attempt(state, selection) == 0
    state.add(0, 0)
    assert next_attempt(state, None) is None  # no selection: one attempt per question
    assert next_attempt(state, selection) == 1
    state.add(1, 0)
    state.add(2, 0)
    assert next_attempt(state, selection) == 3
    state.add(3, 0)
    assert next_attempt(state, selection) is None  # the limit
    hit = QuestionState({0: 0, 1: 1})
    assert next_attempt(hit, selection) is None
    assert next_attempt(QuestionState({0: 1}), selection) is None
    assert next_attempt(QuestionState({0: 0}), SelectionSettings(answerability_filter=False)) is None


def test_the_easy_draw_is_seeded_and_a_quarter():
    questions = [Question(f"e{n}", f"q{n}?", ["a"]) for n in range(10)] + [Question("m", "m?", ["a"])]
    states = {f"e{n}": QuestionState({0: 1}) for n in range(10)} | {"m": QuestionState({0: 0, 1: 1})}
    draws = [tuple(q.id for q in select(questions, states, SelectionSettings(seed=seed)).easy_kept)
             for seed in range(6)]
    assert all(len(draw) == round(0.25 * 10) for draw in draws) and len(set(draws)) > 1
    again = select(questions, states, SelectionSettings(seed=3))
    assert tuple(q.id for q in again.easy_kept) == draws[3]
    assert again.selected[-1].id == "m" and len(again.selected) == 3


# --- the scripted teacher (no model server) ---------------------------------------------------------------------

def test_the_scripted_teacher_runs_the_demo_train_part_without_a_server_and_resumes(tiny_model_dir, retriever_url,
                                                                                   tmp_path):
    args = ["sft-generate", "--source", "demo", "--teacher", "scripted", "--limit", "6", "--seed", "3",
            "--tokenizer", str(tiny_model_dir), "--retriever-url", retriever_url, "--topk", "1", "--max-turns", "2",
            "--out", str(tmp_path), "--no-progress"]
    assert cli.main(args) == 0
    attempts = read_jsonl(tmp_path / ATTEMPTS)
    expected = sample_questions(demo_questions(part="train"), 6, 3)
    assert sorted(record["id"] for record in attempts) == sorted(question.id for question in expected)
    assert all(record["temperature"] == 0.0 and record["attempt"] == 0 for record in attempts)
    kept = read_jsonl(tmp_path / KEPT)
    assert kept and all(record["em"] == 1 and record["searches"] >= 1 for record in kept)
    manifest = json.loads((tmp_path / "run.json").read_text())
    assert (manifest["teacher_model"], manifest["api"], manifest["topk"], manifest["max_turns"]) == (
        "scripted", "scripted", 1, 2)
    assert cli.main(args) == 0  # resume: everything is done, nothing is redone
    assert read_jsonl(tmp_path / ATTEMPTS) == attempts
    assert cli.main([*args, "--mode", "sq"]) == 2  # one folder never mixes settings


@pytest.mark.parametrize(("extra", "message"), [
    (["--teacher", "scripted", "--select-rl-data"], "--select-rl-data needs a model teacher"),
    (["--teacher", "scripted", "--input", str(QUESTIONS)], "use --source demo"),
    (["--teacher-model", "m"], "--teacher openai needs --teacher-url"),
    (["--teacher-url", "http://127.0.0.1:9/v1"], "needs --teacher-model"),
])
def test_teacher_choices_are_checked(extra, message, tmp_path, caplog):
    source = [] if "--input" in extra else ["--source", "demo"]
    assert cli.main(["sft-generate", *source, *extra, "--out", str(tmp_path), "--no-progress"]) == 2
    assert message in caplog.text
    assert not (tmp_path / ATTEMPTS).exists()
