"""A whole ``sft-generate`` run: attempts queued for a fixed number of workers, logged as they finish.

The queue starts with every attempt the log does not hold yet, first attempts before re-samples; a worker that
finishes a missed question's attempt queues its next re-sample (see
:func:`~ragr1_verl.data.teacher.selection.next_attempt`), so re-samples of different questions run side by side.
The first worker to hit a :class:`~ragr1_verl.openai_client.TeacherError` or
:class:`~ragr1_verl.data.teacher.episode.RetrievalFailed` stops the run: the trajectories in flight are lost,
every finished one is in the log, and the same command resumes.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from tqdm import tqdm

from ragr1_verl.config import RagR1Config
from ragr1_verl.data.questions import Question, hold_out, rl_rows, write_rl_parquet
from ragr1_verl.data.teacher.episode import EpisodeSettings, run_episode
from ragr1_verl.data.teacher.selection import QuestionState, SelectionSettings, next_attempt, select
from ragr1_verl.data.teacher.store import (
    ATTEMPTS_FILE,
    KEPT_FILE,
    MANIFEST_FILE,
    AttemptLog,
    AttemptSummary,
    TrajectoryRecord,
    check_manifest,
    write_kept,
)
from ragr1_verl.openai_client import Completion, Messages, Sampling, Teacher, TeacherSettings
from ragr1_verl.protocol.observation import Codec
from ragr1_verl.protocol.prompts import render_prompt
from ragr1_verl.records import DataError, staged_output
from ragr1_verl.retrieval_client import RetrievalClient
from ragr1_verl.reward import exact_match

logger = logging.getLogger(__name__)

SELECTION_REPORT = "rl_selection.json"


class TeacherLike(Protocol):
    """What a run needs of a teacher: :class:`~.client.Teacher` (a model behind a server) or
    :class:`~.scripted.ScriptedTeacher` (the demo corpus's hop metadata, no model)."""

    requests: int
    retries: int

    async def complete(self, messages: Messages, partial: str, sampling: Sampling) -> Completion: ...

    async def close(self) -> None: ...


def teacher_identity(settings: TeacherSettings) -> dict[str, Any]:
    """The manifest's fields naming a teacher behind a server: the model, the API and the extra request body."""
    return {"teacher_model": settings.model, "api": settings.api, "extra_body": dict(settings.extra_body)}


@dataclass(frozen=True)
class RunSettings:
    """Everything but the teacher's address: the protocol (``config``), the prompt template, the first
    attempt's sampling, the number of trajectories in flight and, optionally, the RL-data selection."""

    config: RagR1Config
    template: str
    sampling: Sampling
    concurrency: int = 32
    selection: SelectionSettings | None = None
    progress: bool = True

    def manifest(self, teacher: TeacherSettings | Mapping[str, Any]) -> dict[str, Any]:
        """The settings that shape the trajectories (see :func:`~.store.check_manifest`); ``teacher`` is the
        server teacher's settings or another teacher's identity fields (``teacher_model``, ``api``, ...)."""
        config = self.config
        identity = teacher_identity(teacher) if isinstance(teacher, TeacherSettings) else dict(teacher)
        values = {"mode": config.mode, **identity, "template": self.template,
                  "observation_format": config.observation_format, "topk": config.topk,
                  "max_turns": config.max_turns, "max_queries_per_search": config.max_queries_per_search,
                  "over_query_cap": config.over_query_cap, "query_separator": config.query_separator,
                  "max_obs_tokens_per_query": config.max_obs_tokens_per_query,
                  "max_tokens_per_turn": self.sampling.max_tokens, "temperature": self.sampling.temperature,
                  "top_p": self.sampling.top_p}
        if self.selection is not None and self.selection.answerability_filter:
            values.update(resample_temperature=self.selection.resample_temperature,
                          resample_max_turns=self.selection.resample_max_turns)
        return values


@dataclass
class RunSummary:
    """What a run did: trajectories written (and exact matches among them), the kept file's size, teacher HTTP
    requests and retries, and the selection's counts when it ran."""

    written: int = 0
    exact: int = 0
    resamples: int = 0
    kept: int = 0
    teacher_requests: int = 0
    teacher_retries: int = 0
    selection: dict[str, int] | None = None


async def generate(questions: Sequence[Question], settings: RunSettings, teacher_settings: TeacherSettings | None,
                   out_dir: Path, *, render: Callable[[Messages], str] | None = None,
                   codec: Codec | None = None, teacher: TeacherLike | None = None,
                   teacher_fields: Mapping[str, Any] | None = None) -> RunSummary:
    """Run the teacher on every question not done yet in ``out_dir``, then rewrite the kept file and, with a
    selection, write the stage-2 RL parquet files.

    The teacher is the server at ``teacher_settings``, or ``teacher`` (then ``teacher_settings`` is None and
    ``teacher_fields`` names it in the manifest).
    """
    if (teacher is None) == (teacher_settings is None) or (teacher is not None and teacher_fields is None):
        raise ValueError("give either teacher_settings, or a teacher with its teacher_fields")
    out_dir.mkdir(parents=True, exist_ok=True)
    check_manifest(out_dir / MANIFEST_FILE, settings.manifest(teacher_settings or teacher_fields))
    log = AttemptLog(out_dir / ATTEMPTS_FILE)
    states = _states(questions, log.load())
    teacher = teacher if teacher is not None else Teacher(teacher_settings, render)
    retriever = RetrievalClient(settings.config.retriever)
    summary = RunSummary()
    try:
        await _Generator(settings, teacher, retriever, log, states, codec, summary).run(questions)
    finally:
        log.close()
        await asyncio.gather(teacher.close(), retriever.close())
        summary.kept = write_kept(log.path, out_dir / KEPT_FILE, {question.id for question in questions})
        summary.teacher_requests, summary.teacher_retries = teacher.requests, teacher.retries
    if settings.selection is not None:
        summary.selection = write_rl_data(questions, states, settings, out_dir)
    return summary


def _states(questions: Sequence[Question], logged: list[AttemptSummary]) -> dict[str, QuestionState]:
    states: dict[str, QuestionState] = {}
    for question in questions:
        if question.id in states:
            raise DataError(f"question id {question.id!r} appears twice in the input; resuming needs unique ids")
        states[question.id] = QuestionState()
    foreign = 0
    for summary in logged:
        if summary.id in states:
            states[summary.id].add(summary.attempt, summary.em)
        else:
            foreign += 1
    if foreign:
        logger.info("the log holds %d trajectories of questions not in this input; they are left alone", foreign)
    return states


class _Generator:
    def __init__(self, settings: RunSettings, teacher: TeacherLike, retriever: RetrievalClient, log: AttemptLog,
                 states: dict[str, QuestionState], codec: Codec | None, summary: RunSummary):
        self.settings, self.teacher, self.retriever = settings, teacher, retriever
        self.log, self.states, self.codec, self.summary = log, states, codec, summary
        self.bar: tqdm | None = None

    async def run(self, questions: Sequence[Question]) -> None:
        queue: asyncio.Queue[tuple[Question, int]] = asyncio.Queue()
        for question in questions:
            attempt = next_attempt(self.states[question.id], self.settings.selection)
            if attempt is not None:
                queue.put_nowait((question, attempt))
        skipped = len(questions) - queue.qsize()
        logger.info("%d questions, %d already done in the log, %d attempts to run", len(questions), skipped,
                    queue.qsize())
        if queue.empty():
            return
        # disable=None: a bar on a terminal only (as the question reader's), so logs and tests stay clean
        self.bar = tqdm(total=queue.qsize(), desc="sft-generate", unit="traj",
                        disable=None if self.settings.progress else True)
        try:
            await self._drain(queue)
        finally:
            self.bar.close()

    async def _drain(self, queue: asyncio.Queue[tuple[Question, int]]) -> None:
        workers = [asyncio.create_task(self._work(queue)) for _ in range(min(self.settings.concurrency,
                                                                             queue.qsize()))]
        # Re-samples are queued while the run goes on, so the end is "queue joined", not "workers returned".
        joined = asyncio.create_task(queue.join())
        try:
            done, _ = await asyncio.wait([joined, *workers], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (joined, *workers):
                task.cancel()
            await asyncio.gather(joined, *workers, return_exceptions=True)
        for task in done:
            if task is not joined and task.exception() is not None:
                raise task.exception()

    async def _work(self, queue: asyncio.Queue[tuple[Question, int]]) -> None:
        while True:
            question, attempt = await queue.get()
            try:
                record = await self._attempt(question, attempt)
                self.log.append(record)
                self._count(record)
                state = self.states[question.id]
                state.add(record.attempt, record.em)
                follow = next_attempt(state, self.settings.selection)
                if follow is not None:
                    queue.put_nowait((question, follow))
                    self.bar.total += 1
                    self.bar.refresh()
            finally:
                queue.task_done()

    async def _attempt(self, question: Question, attempt: int) -> TrajectoryRecord:
        settings, selection = self.settings, self.settings.selection
        episode_settings = EpisodeSettings(settings.config, settings.sampling, self.codec)
        if attempt > 0 and selection is not None:
            episode_settings = EpisodeSettings(replace(settings.config, max_turns=selection.resample_max_turns),
                                               replace(settings.sampling, temperature=selection.resample_temperature),
                                               self.codec)
        messages = [{"role": "user", "content": render_prompt(question.question, settings.template)}]
        episode = await run_episode(messages, episode_settings, self.teacher, self.retriever)
        em = int(episode.answer is not None and exact_match(episode.answer, question.answers))
        return TrajectoryRecord(
            id=question.id, question=question.question, golden_answers=list(question.answers),
            data_source=question.data_source, messages=messages, trajectory=episode.trajectory,
            answer=episode.answer, em=em, searches=episode.searches, invalid_actions=episode.invalid_actions,
            attempt=attempt,
            temperature=episode_settings.sampling.temperature, turns=episode.turns, finish=episode.finish)

    def _count(self, record: TrajectoryRecord) -> None:
        self.summary.written += 1
        self.summary.exact += record.em
        self.summary.resamples += int(record.attempt > 0)
        self.bar.update(1)
        self.bar.set_postfix(em=f"{self.summary.exact}/{self.summary.written}", refresh=False)


def write_rl_data(questions: Sequence[Question], states: dict[str, QuestionState], settings: RunSettings,
                  out_dir: Path) -> dict[str, int]:
    """Select the stage-2 questions and write ``train.parquet`` (and ``test.parquet``, the validation part)
    with a ``rl_selection.json`` report, all moved into ``out_dir`` only once every file is written."""
    selection = settings.selection
    chosen = select(questions, states, selection)
    train, val = list(chosen.selected), []
    if selection.val_fraction > 0:
        train, val = hold_out(chosen.selected, selection.val_fraction, selection.seed, "the selected RL questions")
    counts = {**chosen.counts(), "train": len(train), "test": len(val)}
    report = {"settings": asdict(selection), "counts": counts,
              "ids": {"answerable": [q.id for q in chosen.answerable], "easy_kept": [q.id for q in chosen.easy_kept],
                      "unanswerable": [q.id for q in chosen.unanswerable], "train": [q.id for q in train],
                      "test": [q.id for q in val]}}
    mode, template = settings.config.mode, settings.template
    with staged_output(out_dir) as staging:
        write_rl_parquet(rl_rows(train, split="train", mode=mode, template=template), staging / "train.parquet")
        if selection.val_fraction > 0:
            write_rl_parquet(rl_rows(val, split="test", mode=mode, template=template), staging / "test.parquet")
        (staging / SELECTION_REPORT).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n",
                                                encoding="utf-8")
    logger.info("RL data selection: %s", ", ".join(f"{name} {count}" for name, count in counts.items()))
    return counts
