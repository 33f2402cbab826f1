"""Run the training rollout (``RagR1AgentLoop``) over an evaluation parquet and record every trajectory.

Each question gets its own loop instance, built as verl's ``AgentLoopWorker`` builds one, from verl's own
trainer config composed with the run's ``ragr1:`` section; only the generation backend differs from
training. Results are appended to ``results.jsonl`` one line per question as soon as it finishes, so an
interrupted run resumes where it stopped.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ragr1_verl import verl_compat
from ragr1_verl.evaluation.protocols import PROJECT, PROTOCOLS, EvalProtocol
from ragr1_verl.protocol.actions import extract_answer
from ragr1_verl.records import DataError, read_records, where
from ragr1_verl.reward import compute_score, gold_answers, normalize_answer_eval_script

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.jsonl"
RUN_FILE = "run.json"  # the run's settings (settings_record)


@dataclass(frozen=True)
class EvalQuestion:
    """One row of an evaluation parquet (as ``ragr1-data eval`` writes it)."""

    id: str
    data_source: str
    question: str
    messages: list[dict[str, Any]]
    golden_answers: list[str]
    extra_info: dict[str, Any]


@dataclass
class EvalSettings:
    """Generation settings of one evaluation run (the rollout's own settings live in the ``ragr1`` section)."""

    temperature: float = 0.7          # paper: sampled at 0.7 at evaluation
    top_p: float = 1.0
    top_k: int = -1                   # -1: off
    repetition_penalty: float = 1.0
    protocol: str = "project"         # evaluation/protocols.py: how EM is scored
    max_prompt_tokens: int = 2048
    max_response_tokens: int = 6144   # paper: 8192-token context in all
    concurrency: int = 8
    ragr1: dict[str, Any] = field(default_factory=dict)


def load_questions(paths: Iterable[str | Path], limit: int | None = None) -> list[EvalQuestion]:
    """The questions of one or more evaluation parquet (or jsonl) files; ``limit`` applies per file."""
    questions: list[EvalQuestion] = []
    first_seen: dict[str, str] = {}
    for path in paths:
        rows = read_records(path)
        for number, row in enumerate(rows[:limit], start=1):
            question = _question(row, path, number)
            if question.id in first_seen:
                raise DataError(f"{where(path, number)}: question {question.id!r} is also in "
                                f"{first_seen[question.id]} (give each file once; all.parquet repeats the others)")
            first_seen[question.id] = where(path, number)
            questions.append(question)
    return questions


def _question(row: dict[str, Any], path: str | Path, number: int) -> EvalQuestion:
    def required(name: str) -> Any:
        if row.get(name) is None:
            raise DataError(f"{where(path, number, name)}: missing")
        return row[name]

    extra_info = dict(row.get("extra_info") or {})
    messages = required("prompt")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise DataError(f"{where(path, number, 'prompt')}: expected a list of chat messages")
    try:
        golds = gold_answers((required("reward_model") or {}).get("ground_truth"))
    except ValueError as error:
        raise DataError(f"{where(path, number, 'reward_model.ground_truth')}: {error}") from None
    data_source = str(required("data_source"))
    index = extra_info.get("index", number - 1)
    question = str(extra_info.get("question") or messages[-1].get("content", ""))
    return EvalQuestion(id=f"{data_source}/{index}", data_source=data_source, question=question,
                        messages=[dict(m) for m in messages], golden_answers=golds, extra_info=extra_info)


def read_result_lines(results_path: Path) -> tuple[list[dict[str, Any]], int]:
    """The readable records of a results file and how many lines were not (writes cut by a crash)."""
    if not results_path.is_file():
        return [], 0
    records, broken = [], 0
    for line in results_path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and "id" in record:
            records.append(record)
        else:
            broken += 1
    return records, broken


def finished_ids(results_path: Path) -> set[str]:
    """Ids already in this run's results file, after dropping lines cut short by a crash (they are redone)."""
    records, broken = read_result_lines(results_path)
    if broken:
        logger.warning("%s: dropping %d unreadable line(s) (interrupted writes); they will be redone",
                       results_path, broken)
        text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        staged = results_path.with_suffix(".jsonl.tmp")
        staged.write_text(text, encoding="utf-8")
        os.replace(staged, results_path)
    return {record["id"] for record in records}


def trainer_config(model_dir: str | Path, settings: EvalSettings) -> Any:
    """verl's ``ppo_trainer`` config with the rollout lengths and the ``ragr1`` section of this run."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf, open_dict

    with initialize_config_module(verl_compat.CONFIG_MODULE, version_base=None):
        config = compose("ppo_trainer", overrides=[
            f"actor_rollout_ref.model.path={model_dir}",
            f"actor_rollout_ref.rollout.prompt_length={settings.max_prompt_tokens}",
            f"actor_rollout_ref.rollout.response_length={settings.max_response_tokens}",
            "actor_rollout_ref.rollout.agent.default_agent_loop=ragr1_agent",
        ])
    with open_dict(config):
        config.ragr1 = OmegaConf.create(settings.ragr1)
    return config


@dataclass
class Evaluator:
    """Runs questions through ``RagR1AgentLoop`` with a backend and appends their results."""

    config: Any
    tokenizer: Any
    backend: Any
    settings: EvalSettings
    results_path: Path

    def _new_loop(self):
        from ragr1_verl.agent_loop import RagR1AgentLoop

        wrap = verl_compat.DictConfigWrap
        return RagR1AgentLoop(trainer_config=wrap(self.config), server_manager=self.backend,
                              tokenizer=self.tokenizer, processor=None, dataset_cls=verl_compat.RLHFDataset,
                              data_config=wrap(self.config.data))

    async def run(self, questions: Sequence[EvalQuestion], progress: Any = None) -> list[str]:
        """Evaluate ``questions`` with at most ``concurrency`` in flight; returns the ids that failed.

        A question whose generation fails is logged and left out of the results, so that a rerun retries it;
        the others go on.
        """
        limit = asyncio.Semaphore(self.settings.concurrency)
        failed: list[str] = []
        with self.results_path.open("a", encoding="utf-8") as results:
            async def one(question: EvalQuestion) -> None:
                async with limit:
                    try:
                        record = await self.evaluate(question)
                    except Exception as error:  # noqa: BLE001 (any backend failure: keep the other questions)
                        logger.error("%s failed: %s: %s", question.id, type(error).__name__, error)
                        failed.append(question.id)
                        return
                results.write(json.dumps(record, ensure_ascii=False) + "\n")
                results.flush()
                if progress is not None:
                    progress.update(1)

            await asyncio.gather(*(one(question) for question in questions))
        return failed

    async def evaluate(self, question: EvalQuestion) -> dict[str, Any]:
        sampling_params = {"temperature": self.settings.temperature, "top_p": self.settings.top_p,
                           "top_k": self.settings.top_k, "repetition_penalty": self.settings.repetition_penalty,
                           "logprobs": False}
        started = time.perf_counter()
        output = await self._new_loop().run(sampling_params, raw_prompt=question.messages,
                                            extra_info=question.extra_info)
        seconds = time.perf_counter() - started
        return trajectory_record(question, output, self.tokenizer, seconds, PROTOCOLS[self.settings.protocol])


def trajectory_record(question: EvalQuestion, output: Any, tokenizer: Any, seconds: float,
                      protocol: EvalProtocol = PROJECT) -> dict[str, Any]:
    """One line of ``results.jsonl``: the trajectory, its answer, scores and the rollout's counters. ``em`` is
    the protocol's; ``em_any_alias`` the training reward's rule (any gold alias, the training normaliser)."""
    trajectory = tokenizer.decode(output.response_ids, skip_special_tokens=True)
    extra = {key.removeprefix("ragr1/"): value for key, value in output.extra_fields.items()
             if key.startswith("ragr1/")}
    scores = compute_score(question.data_source, trajectory, question.golden_answers, output.extra_fields)
    answer = extract_answer(trajectory)
    return {
        "id": question.id, "data_source": question.data_source, "question": question.question,
        "golden_answers": question.golden_answers, "answer": answer,
        "em": protocol_em(protocol, answer, question.golden_answers, scores["acc"]),
        "em_any_alias": scores["acc"], "f1": scores["f1"], "substring_em": scores["substring_em"],
        "format_ok": scores["format_ok"], "searches": int(extra.get("searches", 0)),
        "queries": int(extra.get("queries", 0)), "invalid_actions": int(extra.get("invalid_actions", 0)),
        "retrieval_failures": int(extra.get("retrieval_failures", 0)), "turns": int(extra.get("turns", 0)),
        "budget_hit": bool(extra.get("budget_hit", False)), "truncated": bool(extra.get("truncated", False)),
        "seconds": round(seconds, 4), "retrieval_seconds": round(float(extra.get("retrieval_ms", 0.0)) / 1000, 4),
        "response_tokens": len(output.response_ids), "trajectory": trajectory,
    }


def protocol_em(protocol: EvalProtocol, answer: str | None, golds: Sequence[str], training_em: float) -> float:
    """EM as ``protocol`` scores it: the training reward's, or the original script's (its normaliser against
    the first gold answer, the one its data files carry as ``answer``)."""
    if protocol.gold == "any_alias" and protocol.normalizer == "training":
        return training_em
    if answer is None or not golds:
        return 0.0
    return float(normalize_answer_eval_script(answer) == normalize_answer_eval_script(golds[0]))


def settings_record(settings: EvalSettings, **run: Any) -> dict[str, Any]:
    """What ``run.json`` stores: a resumed run must use the same settings."""
    return {**asdict(settings), **run}
