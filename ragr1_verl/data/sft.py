"""``ragr1-data sft``: stage-1 (format-learning SFT) data for verl's SFT trainer with ``RagR1SFTDataset``.

Inputs (``--input``, format told apart per file by its first row, or forced with ``--format``):

- **trajectories** written by ``ragr1-data sft-generate``, one JSON object a line::

      {"id", "question", "golden_answers": [str, ...], "data_source", "messages": [{role, content}, ...],
       "trajectory": "<think>...</think><search>...</search>\\n<information>\\n...\\n</information>\\n...",
       "answer": str | null, "em": 0 | 1}

  ``messages`` is the prompt, ``trajectory`` the assistant's text with the observations as the rollout
  inserted them. Only ``em == 1`` rows are kept unless ``--include-wrong``. Extra keys are ignored; rows
  with ``attempt`` above 0 (the RL-selection re-samples in ``attempts.jsonl``) are skipped, so that the
  stage-2 questions do not leak into stage 1.
- **released** RAG-R1 SFT data (``endertzw/RAG-R1-SFT-data``, LLaMA-Factory layouts; the exact release
  layout is not documented, so both are read): alpaca rows ``{"instruction", "input", "output"[, "system"]}``
  with the prompt in ``instruction``, the turns so far (model text and ``<information>`` blocks; empty for
  the first turn) in ``input`` and the target turn in ``output``; or conversation rows (``conversations``
  with ``from``/``value``, or ``messages`` with ``role``/``content``), where the system and user messages
  before the first assistant message are the prompt and the rest is the trajectory. The paper's four sample
  kinds repeat each trajectory's prefixes; rows of one prompt whose trajectory is a prefix of another's
  are folded into the longer one, so each model turn is trained once.
- ``--source ragr1``: the released data from a local copy (``--input-dir``) or the hub
  (``SFT_train_data.json`` for ``--ragr1-set sq``, ``SFT_train_data_mq.json`` for ``mq``).

Output: ``--out DIR/train.parquet`` and ``test.parquet`` (``--val-input``, or a seeded ``--val-fraction``
of the questions; all trajectories of one question land on the same side), columns:

=================  ==========================================================================================
``data_source``    string: the dataset (``hotpotqa`` for released data unless ``--data-source``)
``prompt``         list<struct<role: string, content: string>>: the prompt chat messages
``trajectory``     string: the assistant text, observations in the rollout's ``\\n<information>\\n...``
                   ``\\n</information>\\n`` form
``question``       string ("" when the input does not give it)
``golden_answers`` list<string>
``extra_info``     struct<index: int64, split: string, id: string, origin: string, searches: int64,
                   sample_kinds: list<int64>>: ``origin`` is ``sft-generate`` or ``ragr1-released``,
                   ``sample_kinds`` the paper's kind (1-4) of each trained model turn, in order
=================  ==========================================================================================

``--repeat-multi-search N`` writes the training trajectories that search more than once N times (the test
rows once), to weigh the multi-hop pattern up where it is rare.

Every input error names the file, row and field; nothing is written unless every row could be used (or
``--skip-invalid`` was given for rows that break the tag protocol).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ragr1_verl.data.benchmarks import download_hub_dataset
from ragr1_verl.protocol.actions import INFORMATION_OPEN
from ragr1_verl.protocol.observation import wrap_information
from ragr1_verl.protocol.prompts import SAMPLE_ROWS, PromptRecord, template_from_rows, user_message
from ragr1_verl.records import DataError, read_records, staged_output, where

logger = logging.getLogger(__name__)
T = TypeVar("T")

RAGR1_SFT_HUB = "endertzw/RAG-R1-SFT-data"
RAGR1_SFT_FILES = {"sq": "SFT_train_data", "mq": "SFT_train_data_mq"}  # the code repository's data/SFT names
RELEASED_DATA_SOURCE = "hotpotqa"  # the paper generated its SFT data from HotpotQA's training set
ORIGIN_GENERATED, ORIGIN_RELEASED = "sft-generate", "ragr1-released"
FORMATS = ("auto", "trajectories", "released")
DEFAULT_VAL_FRACTION = 0.05
PROGRESS_MIN_ROWS = 2000


@dataclass(frozen=True)
class TeacherTrajectory:
    """One line of ``sft-generate``'s output (see the module docstring)."""

    id: str
    question: str
    golden_answers: list[str]
    data_source: str
    messages: list[dict[str, str]]
    trajectory: str
    answer: str | None
    em: int


@dataclass(frozen=True)
class SFTRow:
    """One trajectory of the output; ``trajectory`` is already in the rollout's form."""

    data_source: str
    prompt: list[dict[str, str]]
    trajectory: str
    question: str
    golden_answers: list[str]
    id: str
    origin: str
    searches: int
    sample_kinds: list[int] = field(default_factory=list)

    def record(self, index: int, split: str) -> dict[str, Any]:
        return {
            "data_source": self.data_source,
            "prompt": self.prompt,
            "trajectory": self.trajectory,
            "question": self.question,
            "golden_answers": self.golden_answers,
            "extra_info": {"index": index, "split": split, "id": self.id, "origin": self.origin,
                           "searches": self.searches, "sample_kinds": self.sample_kinds},
        }


@dataclass
class Tally:
    """What happened to the input rows, for the summary log line."""

    read: int = 0
    resamples: int = 0
    wrong: int = 0
    invalid: int = 0
    folded: int = 0
    kinds: Counter = field(default_factory=Counter)


@dataclass(frozen=True)
class _Options:
    format: str
    include_wrong: bool
    skip_invalid: bool
    data_source: str | None


def parquet_schema() -> Any:
    """The exact pyarrow schema of ``train.parquet`` and ``test.parquet``."""
    import pyarrow as pa

    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    extra_info = pa.struct([("index", pa.int64()), ("split", pa.string()), ("id", pa.string()),
                            ("origin", pa.string()), ("searches", pa.int64()),
                            ("sample_kinds", pa.list_(pa.int64()))])
    return pa.schema([("data_source", pa.string()), ("prompt", pa.list_(message)),
                      ("trajectory", pa.string()), ("question", pa.string()),
                      ("golden_answers", pa.list_(pa.string())), ("extra_info", extra_info)])


# ----------------------------------------------------------------------------------------------- the command


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "sft", help="stage-1 SFT data (trajectories with retrieved text masked) for verl's SFT trainer",
        description="Convert teacher trajectories (from sft-generate) or RAG-R1's released SFT data into "
                    "train.parquet/test.parquet for verl's SFT trainer with RagR1SFTDataset.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", metavar="FILE", help="local .jsonl/.json/.parquet file(s)")
    source.add_argument("--source", choices=("ragr1",),
                        help="RAG-R1's released SFT data (hub or --input-dir)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output folder (train.parquet, test.parquet)")
    parser.add_argument("--format", choices=FORMATS, default="auto",
                        help="input layout: trajectories (sft-generate), released (RAG-R1), or auto per file")
    parser.add_argument("--ragr1-set", choices=("sq", "mq"), default=None,
                        help="with --source ragr1 (default mq)")
    parser.add_argument("--input-dir", metavar="DIR",
                        help="with --source ragr1: a local copy of the hub dataset")
    parser.add_argument("--hub-dataset", default=None, metavar="REPO",
                        help=f"with --source ragr1 (default {RAGR1_SFT_HUB})")
    split = parser.add_mutually_exclusive_group()
    split.add_argument("--val-input", nargs="+", metavar="FILE", help="file(s) for test.parquet")
    split.add_argument("--val-fraction", type=_fraction, default=None, metavar="F",
                       help="fraction of questions held out for test.parquet "
                            f"(default {DEFAULT_VAL_FRACTION})")
    parser.add_argument("--seed", type=int, default=42, help="seed of the hold-out (default 42)")
    parser.add_argument("--include-wrong", action="store_true", help="keep sft-generate rows with em == 0")
    parser.add_argument("--skip-invalid", action="store_true",
                        help="skip (and count) trajectories that break the tag protocol instead of stopping")
    parser.add_argument("--data-source", default=None, metavar="NAME", help="data_source of every row")
    parser.add_argument("--repeat-multi-search", type=_copies, default=1, metavar="N",
                        help="training trajectories that search more than once appear N times in train.parquet "
                             "(default 1: once); test.parquet is left as it is")
    parser.set_defaults(func=run)


def _fraction(value: str) -> float:
    number = float(value)
    if not 0.0 <= number < 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {value}")
    return number


def _copies(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a count of 1 or more, got {value}")
    return number


def run(args: argparse.Namespace) -> int:
    options = _Options(args.format, args.include_wrong, args.skip_invalid, args.data_source)
    tally = Tally()
    rows = load_rows(_input_files(args), options, tally)
    if args.val_input:
        train, test = rows, load_rows([Path(path) for path in args.val_input], options, tally)
    else:
        fraction = DEFAULT_VAL_FRACTION if args.val_fraction is None else args.val_fraction
        train, test = hold_out(rows, fraction, args.seed)
    if not train:
        raise DataError(f"{', '.join(map(str, args.input or [args.source]))}: no usable training trajectory")
    if not test:
        logger.warning("test.parquet is empty: give --val-input or a larger --val-fraction to validate")
    train = repeat_multi_search(train, args.repeat_multi_search, searches=lambda row: row.searches)
    with staged_output(args.out) as staging:
        write_sft_parquet(train, "train", staging / "train.parquet")
        write_sft_parquet(test, "test", staging / "test.parquet")
        _prompt_record(train).write(staging)
    _log_summary(tally, len(train), len(test), args.out)
    return 0


def _prompt_record(rows: list[SFTRow]) -> PromptRecord:
    """The template of the training rows' prompts (kept as the input carries them: released rows keep the
    instruction they were released with), or None when they differ."""
    template = template_from_rows((user_message(row.prompt), row.question) for row in rows[:SAMPLE_ROWS])
    if template is None:
        logger.warning("the training rows' prompts follow no single template: ragr1-eval cannot check that a "
                       "checkpoint trained on them is evaluated with its own prompt")
    return PromptRecord(template, "ragr1-data sft: the training rows' prompts")


def _log_summary(tally: Tally, train: int, test: int, out: str) -> None:
    kinds = ", ".join(f"{tally.kinds[kind]} kind-{kind}" for kind in (1, 2, 3, 4))
    logger.info("read %d rows: %d wrong answers skipped, %d invalid skipped, %d re-samples skipped, "
                "%d prefix rows folded in", tally.read, tally.wrong, tally.invalid, tally.resamples,
                tally.folded)
    logger.info("wrote %d training and %d test trajectories to %s (as the paper's samples: %s)",
                train, test, out, kinds)


def write_sft_parquet(rows: Sequence[SFTRow], split: str, path: Path) -> None:
    write_sft_records([row.record(index, split) for index, row in enumerate(rows)], path)


def write_sft_records(records: Sequence[dict[str, Any]], path: Path) -> None:
    """Rows already in the output's form (:meth:`SFTRow.record`, or read back from a file of this command)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(list(records), schema=parquet_schema()), path)


# ------------------------------------------------------------------------------------------------ the inputs


def _input_files(args: argparse.Namespace) -> list[Path]:
    if args.input:
        misplaced = [name for name in ("ragr1_set", "input_dir", "hub_dataset")
                     if getattr(args, name) is not None]
        if misplaced:
            raise DataError(f"--{misplaced[0].replace('_', '-')} only applies to --source ragr1")
        return [Path(path) for path in args.input]
    root = Path(args.input_dir) if args.input_dir else download_hub_dataset(args.hub_dataset or RAGR1_SFT_HUB)
    return [_released_file(root, args.ragr1_set or "mq")]


def _released_file(root: Path, variant: str) -> Path:
    if not root.is_dir():
        raise DataError(f"{root}: no such folder")
    stem = RAGR1_SFT_FILES[variant]
    for suffix in (".json", ".jsonl", ".parquet"):
        found = sorted(root.rglob(f"{stem}{suffix}"))
        if found:
            return found[0]
    present = ", ".join(sorted(path.name for path in root.rglob("*.json*"))) or "none"
    raise DataError(f"{root}: no {stem}.json for the RAG-R1 {variant} set (JSON files there: {present}); "
                    "pass the file with --input")


def load_rows(paths: Iterable[Path], options: _Options, tally: Tally) -> list[SFTRow]:
    """Every usable trajectory of the files, in order (released rows with prefixes folded in)."""
    rows: list[SFTRow] = []
    for path in paths:
        records = read_records(path)
        if not records:
            raise DataError(f"{path}: no rows")
        layout = _layout(path, records[0]) if options.format == "auto" else options.format
        convert = _teacher_row if layout == "trajectories" else _released_row
        converted = [row for row in _convert(path, records, convert, options, tally) if row is not None]
        kept = fold_prefixes(converted, tally) if layout == "released" else converted
        tally.kinds.update(kind for row in kept for kind in row.sample_kinds)
        rows.extend(kept)
    return rows


def _layout(path: Path, first: dict[str, Any]) -> str:
    if "trajectory" in first or "em" in first:
        return "trajectories"
    if "output" in first or "conversations" in first or "messages" in first:
        return "released"
    raise DataError(f"{where(path, 1)}: neither an sft-generate trajectory (no 'trajectory' field) nor a "
                    "released SFT row ('instruction'/'output', 'conversations' or 'messages')")


def _convert(path: Path, records: list[dict[str, Any]], convert: Callable[..., SFTRow | None],
             options: _Options, tally: Tally) -> Iterable[SFTRow | None]:
    from tqdm import tqdm

    progress = tqdm(records, desc=f"reading {path.name}", unit="row",
                    disable=len(records) < PROGRESS_MIN_ROWS)
    for number, record in enumerate(progress, start=1):
        tally.read += 1
        yield convert(path, number, record, options, tally)


def _checked(path: Path, number: int, text: str, field_name: str, options: _Options, tally: Tally) -> Any:
    """The trajectory cut into segments, or None when it breaks the protocol and ``--skip-invalid`` is set."""
    from ragr1_verl.sft.dataset import TrajectoryError, split_trajectory

    try:
        return split_trajectory(text)
    except TrajectoryError as error:
        if not options.skip_invalid:
            raise DataError(f"{where(path, number, field_name)}: {error}") from None
        tally.invalid += 1
        logger.debug("%s: skipped: %s", where(path, number, field_name), error)
        return None


# ---------------------------------------------------------------------------- sft-generate's trajectories


def parse_teacher(path: Path, number: int, record: dict[str, Any]) -> TeacherTrajectory:
    """Check one trajectory line field by field."""
    def get(name: str, valid: Callable[[Any], bool], expected: str) -> Any:
        if name not in record:
            raise DataError(f"{where(path, number, name)}: missing")
        if not valid(record[name]):
            raise DataError(f"{where(path, number, name)}: expected {expected}, got {record[name]!r:.80}")
        return record[name]

    from ragr1_verl.sft.dataset import prompt_messages

    messages = prompt_messages(get("messages", lambda v: prompt_messages(v) is not None,
                                   "a non-empty list of {role, content} messages"))
    return TeacherTrajectory(
        id=str(get("id", lambda v: isinstance(v, str | int) and not isinstance(v, bool),
                   "a string or integer")),
        question=get("question", lambda v: isinstance(v, str), "a string"),
        golden_answers=list(get("golden_answers", _string_list, "a list of strings")),
        data_source=get("data_source", lambda v: isinstance(v, str) and bool(v), "a non-empty string"),
        messages=messages,
        trajectory=get("trajectory", lambda v: isinstance(v, str), "a string"),
        answer=get("answer", lambda v: v is None or isinstance(v, str), "a string or null"),
        em=int(get("em", lambda v: v in (0, 1), "0 or 1")),
    )


def _string_list(value: Any) -> bool:
    return isinstance(value, list | tuple) and all(isinstance(item, str) for item in value)


def _teacher_row(path: Path, number: int, record: dict[str, Any], options: _Options,
                 tally: Tally) -> SFTRow | None:
    attempt = record.get("attempt", 0)
    if isinstance(attempt, int) and attempt > 0:
        tally.resamples += 1
        return None
    teacher = parse_teacher(path, number, record)
    if not teacher.em and not options.include_wrong:
        tally.wrong += 1
        return None
    trajectory = _checked(path, number, teacher.trajectory, "trajectory", options, tally)
    if trajectory is None:
        return None
    return SFTRow(options.data_source or teacher.data_source, teacher.messages, trajectory.text,
                  teacher.question, teacher.golden_answers, teacher.id, ORIGIN_GENERATED, trajectory.searches,
                  trajectory.kinds)


# --------------------------------------------------------------------------------- RAG-R1's released data


def _released_row(path: Path, number: int, record: dict[str, Any], options: _Options,
                  tally: Tally) -> SFTRow | None:
    if "output" in record or "instruction" in record:
        prompt, text, text_field = _alpaca(path, number, record)
    else:
        prompt, text, text_field = _conversation(path, number, record)
    trajectory = _checked(path, number, text, text_field, options, tally)
    if trajectory is None:
        return None
    answers = record.get("golden_answers", record.get("answer", []))
    answers = [answers] if isinstance(answers, str) else answers
    if not _string_list(answers):
        raise DataError(f"{where(path, number, 'golden_answers')}: expected a string or a list of strings")
    question = record.get("question") if isinstance(record.get("question"), str) else _question(prompt)
    row_id = record.get("id") if record.get("id") is not None else f"{path.name}:{number}"  # null ids too
    return SFTRow(options.data_source or RELEASED_DATA_SOURCE, prompt, trajectory.text, question,
                  list(answers), str(row_id), ORIGIN_RELEASED, trajectory.searches, trajectory.kinds)


def _alpaca(path: Path, number: int, record: dict[str, Any]) -> tuple[list[dict[str, str]], str, str]:
    for name in ("instruction", "output"):
        if not isinstance(record.get(name), str) or not record[name].strip():
            raise DataError(f"{where(path, number, name)}: expected a non-empty string")
    turns_so_far = record.get("input") or ""
    if not isinstance(turns_so_far, str):
        raise DataError(f"{where(path, number, 'input')}: expected a string")
    if record.get("history"):
        raise DataError(f"{where(path, number, 'history')}: multi-turn alpaca history is not a RAG-R1 layout "
                        "(the turns so far belong in 'input')")
    system = record.get("system")
    prompt = ([{"role": "system", "content": system}] if isinstance(system, str) and system else [])
    prompt.append({"role": "user", "content": record["instruction"]})
    return prompt, turns_so_far + record["output"], "output"


_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
          "observation": "observation", "tool": "observation", "function": "observation"}


def _conversation(path: Path, number: int, record: dict[str, Any]) -> tuple[list[dict[str, str]], str, str]:
    """Prompt = the system/user messages before the first assistant message; the rest is the trajectory."""
    key = "conversations" if "conversations" in record else "messages"
    turns = [_turn(path, number, key, turn) for turn in (record.get(key) or [])]
    first = next((index for index, (role, _) in enumerate(turns) if role == "assistant"), None)
    if first is None or first == 0:
        raise DataError(f"{where(path, number, key)}: expected prompt messages followed by assistant "
                        "messages")
    prompt = [{"role": role, "content": content} for role, content in turns[:first]]
    if isinstance(record.get("system"), str) and record["system"]:
        prompt.insert(0, {"role": "system", "content": record["system"]})
    pieces = [content if role == "assistant" or INFORMATION_OPEN in content
              else wrap_information(content.strip("\n")) for role, content in turns[first:]]
    return prompt, "".join(pieces), key


def _turn(path: Path, number: int, key: str, turn: Any) -> tuple[str, str]:
    role = turn.get("role", turn.get("from")) if isinstance(turn, dict) else None
    content = turn.get("content", turn.get("value")) if isinstance(turn, dict) else None
    if role not in _ROLES or not isinstance(content, str):
        raise DataError(f"{where(path, number, key)}: every message needs a known role and a string content, "
                        f"got {turn!r:.80}")
    return _ROLES[role], content


def _question(prompt: Sequence[dict[str, str]]) -> str:
    """The text after the last user message's last ``Question:`` (the template's), or "" if there is none."""
    users = [message["content"] for message in prompt if message["role"] == "user"]
    if not users or "Question:" not in users[-1]:
        return ""
    return users[-1].rsplit("Question:", 1)[1].strip()


def fold_prefixes(rows: Sequence[SFTRow], tally: Tally) -> list[SFTRow]:
    """Drop rows whose trajectory is a prefix of another row's with the same prompt (their turns are trained
    there, in the same context); the order of the remaining rows is kept."""
    by_prompt: dict[str, list[int]] = {}
    for index, row in enumerate(rows):
        by_prompt.setdefault(json.dumps(row.prompt, sort_keys=True), []).append(index)
    dropped: set[int] = set()
    for indices in by_prompt.values():
        longest_first = sorted(indices, key=lambda i: len(rows[i].trajectory), reverse=True)
        kept: list[str] = []
        for index in longest_first:
            text = rows[index].trajectory
            if any(other.startswith(text) for other in kept):
                dropped.add(index)
            else:
                kept.append(text)
    tally.folded += len(dropped)
    return [row for index, row in enumerate(rows) if index not in dropped]


# ------------------------------------------------------------------------------------------------ the split


def hold_out(rows: Sequence[SFTRow], fraction: float, seed: int) -> tuple[list[SFTRow], list[SFTRow]]:
    """A seeded hold-out of ``fraction`` of the questions (at least one when there are two or more)."""
    keys = list(dict.fromkeys(_split_key(row) for row in rows))
    count = round(fraction * len(keys))
    if fraction > 0 and len(keys) > 1:
        count = min(max(count, 1), len(keys) - 1)
    held = set(random.Random(seed).sample(keys, count))
    train = [row for row in rows if _split_key(row) not in held]
    return train, [row for row in rows if _split_key(row) in held]


def repeat_multi_search(rows: Sequence[T], copies: int, *, searches: Callable[[T], int]) -> list[T]:
    """``rows``, then ``copies - 1`` more copies of those that search more than once (``searches(row)``).

    A small student copies the pattern most of its trajectories show: a second search is the pattern of the
    multi-hop questions only (a third of the demo's trajectories), and one copy of them does not teach it
    (docs/results/cpu-runs.md, e01 and e02)."""
    if copies < 1:
        raise ValueError(f"copies must be 1 or more, not {copies}")
    multi = [row for row in rows if searches(row) > 1]
    return [*rows, *multi * (copies - 1)]


def _split_key(row: SFTRow) -> str:
    """Trajectories of one question stay together (the prompt stands in when the question is unknown)."""
    return " ".join(row.question.lower().split()) or json.dumps(row.prompt, sort_keys=True)
