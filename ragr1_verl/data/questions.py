"""Question records, the two public row layouts they come from, and the verl parquet row made from them.

Two layouts are accepted, told apart by the type of ``golden_answers``:

- FlashRAG (and Search-R1's merged parquet): ``{"id", "question", "golden_answers": [str, ...]}``;
- RAG-R1's released RL sets: ``{"question", "golden_answers": str}``, one answer per question. RAG-R1 never
  splits that string (its reward compares against it whole), so neither do we: ``"2009 and 2010"`` stays one
  answer.

Every parser error is an :class:`~ragr1_verl.records.DataError` whose message starts with
:func:`~ragr1_verl.records.where` (file, 1-based row, field).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from numbers import Integral
from pathlib import Path
from typing import Any

from ragr1_verl.protocol.actions import Mode
from ragr1_verl.protocol.prompts import default_template, normalize_question, render_prompt
from ragr1_verl.records import DataError, where

AGENT_NAME = "ragr1_agent"  # what ragr1_verl.agent_loop registers; a literal, so verl is never imported
ABILITY = "fact-reasoning"  # Search-R1's value; verl only carries it along
REWARD_STYLE = "rule"


@dataclass(frozen=True)
class Question:
    """One question with its gold answers.

    ``question`` is already normalised (stripped, ending in ``?``); ``answers`` are stripped, non-empty and
    deduplicated in order; ``data_source`` names the dataset (the benchmark, for evaluation data).

    ``extra`` keeps the row's own fields named in :data:`EXTRA_FIELDS` (the demo set's ``type``, ``hops``,
    ``supporting_ids``, ``steps``, ``topic``, its own ``split``: "train", "dev" or "test", and ``validation``:
    false on the dev questions kept out of training-time validation), as they are in the row, so an offline
    teacher can read the scripted search steps. It never reaches the parquet rows and takes no part in
    equality. Note ``extra["split"]`` (the row's part of the demo set) is not ``split`` (the
    verl split label given by the caller).
    """

    id: str
    question: str
    answers: list[str] = field(default_factory=list)
    data_source: str = "unknown"
    split: str = "train"
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)


EXTRA_FIELDS = ("type", "hops", "supporting_ids", "steps", "topic", "split", "validation")


def _text_field(row: Mapping[str, Any], name: str, location: tuple[Any, int | None]) -> str:
    path, number = location
    if name not in row or row[name] is None:
        raise DataError(f"{where(path, number, name)}: missing")
    value = row[name]
    if not isinstance(value, str):
        raise DataError(f"{where(path, number, name)}: expected a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where(path, number, name)}: empty")
    return value


def _answer_list(value: Any, path: Any, number: int | None) -> list[str]:
    """Gold answers from a string or a list of strings (integers are taken as their decimal form)."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise DataError(f"{where(path, number, 'golden_answers')}: expected a string or a list of strings, "
                        f"got {type(value).__name__}")
    answers = []
    for item in items:
        if isinstance(item, Integral) and not isinstance(item, bool):
            item = str(int(item))  # some QA sets store years as numbers; the reward compares text
        if not isinstance(item, str):
            raise DataError(f"{where(path, number, 'golden_answers')}: expected strings, got "
                            f"{type(item).__name__} ({item!r})")
        answers.append(item.strip())
    answers = list(dict.fromkeys(answer for answer in answers if answer))
    if not answers:
        raise DataError(f"{where(path, number, 'golden_answers')}: no non-empty answer")
    return answers


def _row_id(row: Mapping[str, Any], data_source: str, path: Any, number: int | None) -> str:
    value = row.get("id")
    if value is None or (isinstance(value, str) and not value.strip()):
        return f"{data_source}-{number if number is not None else 0}"
    if isinstance(value, bool) or not isinstance(value, (str, Integral)):
        raise DataError(f"{where(path, number, 'id')}: expected a string or an integer, "
                        f"got {type(value).__name__}")
    return str(value).strip()


def _checked_row(row: Any, path: Any, number: int | None) -> Mapping[str, Any]:
    if not isinstance(row, Mapping):
        raise DataError(f"{where(path, number)}: expected an object, got {type(row).__name__}")
    if "golden_answers" not in row or row["golden_answers"] is None:
        raise DataError(f"{where(path, number, 'golden_answers')}: missing")
    return row


def parse_flashrag_row(row: Any, *, path: str | os.PathLike[str], number: int | None,
                       data_source: str, split: str) -> Question:
    """A FlashRAG row ``{"id", "question", "golden_answers": [...]}``; a missing id becomes ``source-row``."""
    row = _checked_row(row, path, number)
    if not isinstance(row["golden_answers"], (list, tuple)):
        raise DataError(f"{where(path, number, 'golden_answers')}: expected a list of strings (FlashRAG "
                        f"rows), got {type(row['golden_answers']).__name__}")
    return _question(row, path, number, data_source, split)


def parse_ragr1_row(row: Any, *, path: str | os.PathLike[str], number: int | None,
                    data_source: str, split: str) -> Question:
    """A RAG-R1 row ``{"question", "golden_answers": "..."}`` (one answer, never split)."""
    row = _checked_row(row, path, number)
    if not isinstance(row["golden_answers"], str):
        raise DataError(f"{where(path, number, 'golden_answers')}: expected a string (RAG-R1 rows), "
                        f"got {type(row['golden_answers']).__name__}")
    return _question(row, path, number, data_source, split)


def parse_question_row(row: Any, *, path: str | os.PathLike[str], number: int | None,
                       data_source: str, split: str) -> Question:
    """Either layout, chosen by the type of ``golden_answers``.

    A row's own string ``data_source`` (Search-R1's merged files carry one) wins over ``data_source``.
    """
    row = _checked_row(row, path, number)
    own_source = row.get("data_source")
    if isinstance(own_source, str) and own_source.strip():
        data_source = own_source.strip()
    return _question(row, path, number, data_source, split)


def _question(row: Mapping[str, Any], path: Any, number: int | None, data_source: str,
              split: str) -> Question:
    text = _text_field(row, "question", (path, number))
    answers = _answer_list(row["golden_answers"], path, number)
    extra = {name: row[name] for name in EXTRA_FIELDS if name in row and row[name] is not None}
    return Question(id=_row_id(row, data_source, path, number), question=normalize_question(text),
                    answers=answers, data_source=data_source, split=split, extra=extra)


def parse_rows(rows: Iterable[Any], *, path: str | os.PathLike[str], data_source: str, split: str,
               progress: bool = False) -> list[Question]:
    """Parse every row of one file (either layout); ``progress`` shows a tqdm bar on a terminal."""
    rows = list(rows)
    if progress:
        from tqdm import tqdm

        # disable=None: a bar on a terminal only, so logs and tests stay clean
        rows = tqdm(rows, desc=f"reading {Path(str(path)).name}", unit="q", disable=None)
    return [parse_question_row(row, path=path, number=number, data_source=data_source, split=split)
            for number, row in enumerate(rows, start=1)]


def rl_row(question: Question, *, index: int, split: str, mode: Mode = "mq",
           template: str | None = None) -> dict[str, Any]:
    """The verl ``RLHFDataset`` row of a question.

    ``template`` is the prompt template text (see ``config.resolve_prompt_template``); None means the
    built-in template of ``mode``. The prompt is one user message, as in the paper (the chat template adds
    the model's default system message). ``extra_info.question`` lets the agent loop re-render the prompt
    when ``ragr1.prompt_template`` is set at training time.
    """
    template = template if template is not None else default_template(mode)
    answers = list(question.answers)
    return {
        "data_source": question.data_source,
        "prompt": [{"role": "user", "content": render_prompt(question.question, template)}],
        "ability": ABILITY,
        "reward_model": {"style": REWARD_STYLE, "ground_truth": {"target": answers}},
        "extra_info": {"index": index, "split": split, "id": question.id, "question": question.question,
                       "answers": list(answers)},
        "agent_name": AGENT_NAME,
    }


def rl_schema() -> Any:
    """The exact parquet schema of RL and evaluation files.

    Written explicitly so an empty file still has every column and every file has the same struct layout:
    verl concatenates the files of ``data.val_files`` and refuses differing schemas.
    """
    import pyarrow as pa

    return pa.schema([
        ("data_source", pa.string()),
        ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        ("ability", pa.string()),
        ("reward_model", pa.struct([
            ("style", pa.string()),
            ("ground_truth", pa.struct([("target", pa.list_(pa.string()))])),
        ])),
        ("extra_info", pa.struct([
            ("index", pa.int64()), ("split", pa.string()), ("id", pa.string()), ("question", pa.string()),
            ("answers", pa.list_(pa.string())),
        ])),
        ("agent_name", pa.string()),
    ])


def rl_rows(questions: Sequence[Question], *, split: str, mode: Mode = "mq", template: str | None = None,
            start: int = 0) -> list[dict[str, Any]]:
    """:func:`rl_row` for each question, indexed in order from ``start``."""
    return [rl_row(question, index=index, split=split, mode=mode, template=template)
            for index, question in enumerate(questions, start=start)]


def write_rl_parquet(rows: Sequence[dict[str, Any]], path: str | os.PathLike[str]) -> None:
    """Write RL/evaluation rows with :func:`rl_schema`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(list(rows), schema=rl_schema()), path)


def read_question_file(path: str | os.PathLike[str], *, data_source: str | None = None,
                       split: str = "train") -> list[Question]:
    """The questions of a local ``.jsonl``/``.json``/``.parquet`` file (either layout).

    ``data_source`` defaults to the file's stem; a row's own ``data_source`` wins.
    """
    from ragr1_verl.records import read_records

    rows = read_records(path)
    return parse_rows(rows, path=path, data_source=data_source or Path(path).stem, split=split, progress=True)


DEMO_SOURCE = "demo"
DEMO_PARTS = ("train", "dev", "test")
# Not a part of its own: the dev questions that training-time validation uses (SFT validation loss, RL
# validation), i.e. every dev question but those marked ``"validation": false``.
DEMO_VALIDATION = "val"


def demo_questions(split: str = "train", *, part: str | None = None) -> list[Question]:
    """The questions bundled with the retriever's demo corpus (``retriever_server/demo``), in file order.

    The file holds 317 questions, each in one part (its own ``split`` field): 173 ``train`` (for SFT and
    RL), 78 ``dev`` (for choosing settings, e.g. with ``ragr1-eval``) and 66 held-out ``test`` (never trained
    on, never chosen on). ``part`` keeps one part; None keeps all. ``part="val"`` keeps the 16 dev questions
    that training-time validation uses (the SFT validation loss, RL validation): the other 62 dev questions
    carry ``"validation": false``, so that validating during training costs what it always did.
    ``split`` is only the verl split label written to the parquet rows. Every question carries its ``type``,
    ``hops``, ``supporting_ids`` and scripted ``steps`` in :attr:`Question.extra`.
    """
    from importlib import resources

    if part is not None and part not in (*DEMO_PARTS, DEMO_VALIDATION):
        choices = ", ".join((*DEMO_PARTS, DEMO_VALIDATION))
        raise ValueError(f"part must be one of {choices} or None, got {part!r}")
    # Only the package folder is located: importing retriever_server.demo would pull in the index builder.
    with resources.as_file(resources.files("retriever_server").joinpath("demo", "questions.jsonl")) as path:
        questions = read_question_file(path, data_source=DEMO_SOURCE, split=split)
    if part == DEMO_VALIDATION:
        return [question for question in questions
                if question.extra.get("split") == "dev" and question.extra.get("validation", True) is not False]
    if part is not None:
        questions = [question for question in questions if question.extra.get("split") == part]
    return questions


def sample_questions(questions: Sequence[Question], limit: int | None, seed: int) -> list[Question]:
    """A seeded random subset of at most ``limit`` questions, kept in their original order."""
    import random

    if limit is None or limit >= len(questions):
        return list(questions)
    chosen = sorted(random.Random(seed).sample(range(len(questions)), limit))
    return [questions[position] for position in chosen]


def hold_out(questions: Sequence[Question], test_size: float, seed: int,
             source: str = "the input") -> tuple[list[Question], list[Question]]:
    """Split into (train, test): ``test_size`` below 1 is a fraction (at least one question), else a count.

    RAG-R1 held out 5% of its RL questions for validation; the split is seeded and keeps the input order.
    """
    import random

    count = max(1, round(len(questions) * test_size)) if test_size < 1 else int(test_size)
    if count >= len(questions):
        raise DataError(f"{source}: {len(questions)} question(s) cannot give {count} test question(s) and "
                        "a non-empty training set")
    test_positions = set(random.Random(seed).sample(range(len(questions)), count))
    train = [q for position, q in enumerate(questions) if position not in test_positions]
    test = [q for position, q in enumerate(questions) if position in test_positions]
    return train, test


def resolve_template(value: str | None, mode: Mode) -> str:
    """``config.resolve_prompt_template`` with its error turned into a :class:`DataError` for the CLI."""
    from ragr1_verl.config import ConfigError, resolve_prompt_template

    try:
        return resolve_prompt_template(value, mode)
    except ConfigError as error:
        raise DataError(f"--prompt-template: {error}") from None
