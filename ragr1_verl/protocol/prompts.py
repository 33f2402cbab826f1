"""The user message that poses a question, and the template a model was trained with.

``MQ_PROMPT_TEMPLATE`` and ``SQ_PROMPT_TEMPLATE`` are the instructions of the paper's two modes (several
queries per search, one query per search). A checkpoint answers best to the instruction it was trained on:
``ragr1-data`` writes ``ragr1_prompt.json`` next to the parquet files it writes (the template, or ``null``
when the rows carry prompts that no single template explains, e.g. released rows with several
instructions); the launch scripts in ``recipes/`` and ``ragr1-verl-demo`` put it beside the checkpoints;
``ragr1-eval`` compares the prompt it renders with the one recorded beside the model and warns when they
differ.

A template is recovered from rows that carry their question (``question`` or ``extra_info.question``: the
user message with the question replaced by ``{question}``), and otherwise from the common beginning and end
of at least two rows' user messages.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from ragr1_verl.protocol.actions import Mode
from ragr1_verl.records import DataError, read_records

logger = logging.getLogger(__name__)

def normalize_question(question: str) -> str:
    """Strip the question and end it with a question mark, as the paper's data preparation does."""
    question = question.strip()
    return question if question.endswith("?") else question + "?"


MQ_PROMPT_TEMPLATE = (
    "Answer the question below. Every time you receive new information, first reason about it inside "
    "<think> and </think>. If you need knowledge you do not have, search for it: write one or more search "
    "queries, separated by commas, between <search> and </search>, for example "
    "<search> first query, second query </search>. You may use up to three queries in one search, and the "
    "results for each query will come back between <information> and </information>. You can search as many "
    "times as you need. Once you need nothing more, write the final answer between <answer> and </answer>, "
    "without explanations, for example <answer> Beijing </answer>. Question: {question}\n"
)


SQ_PROMPT_TEMPLATE = (
    "Answer the question below. Every time you receive new information, first reason about it inside "
    "<think> and </think>. If you need knowledge you do not have, search for it: write a search query between "
    "<search> and </search>, and the results will come back between <information> and </information>. You can "
    "search as many times as you need. Once you need nothing more, write the final answer between <answer> and "
    "</answer>, without explanations, for example <answer> Beijing </answer>. Question: {question}\n"
)


def render_prompt(question: str, template: str) -> str:
    """The user message for a question; the template must contain ``{question}``."""
    if "{question}" not in template:
        raise ValueError("a prompt template needs a {question} placeholder")
    return template.replace("{question}", normalize_question(question))


def default_template(mode: Mode) -> str:
    return MQ_PROMPT_TEMPLATE if mode == "mq" else SQ_PROMPT_TEMPLATE


PROMPT_FILE = "ragr1_prompt.json"
SAMPLE_ROWS = 64  # rows read to recover a template; more only repeat it
SEARCH_LEVELS = 3  # the model folder and this many above it are searched for a record


@dataclass(frozen=True)
class PromptRecord:
    """``template``: the training prompt's template (``{question}`` marks the question), None when unknown."""

    template: str | None
    source: str

    def write(self, folder: str | os.PathLike[str]) -> Path:
        path = Path(folder) / PROMPT_FILE
        path.write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> PromptRecord:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            return cls(data["template"], str(data.get("source", "")))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise DataError(f"{path}: not a prompt record ({err})") from None


def user_message(prompt: Sequence[dict]) -> str | None:
    """The last user message of a chat prompt."""
    contents = [m.get("content") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
    return contents[-1] if contents and isinstance(contents[-1], str) else None


def template_from_rows(rows: Iterable[tuple[str | None, str | None]]) -> str | None:
    """The one template that renders every ``(user message, question)`` row, or None when there is none."""
    rows = [(message, question) for message, question in rows if message is not None]
    with_question = [_with_placeholder(message, question) for message, question in rows if question]
    if with_question and len(with_question) == len(rows):
        found = set(with_question)
        return found.pop() if len(found) == 1 and None not in found else None
    return _common_frame([message for message, _ in rows])


def _with_placeholder(message: str, question: str) -> str | None:
    for form in (normalize_question(question), question.strip(), question):
        if form and message.count(form) == 1:
            return message.replace(form, "{question}")
    return None


def _common_frame(messages: list[str]) -> str | None:
    """``prefix{question}suffix`` from what at least two distinct messages share at both ends.

    Questions that happen to share a first word or a last one belong to the question: the prefix ends at
    whitespace, and the suffix starts after the first question mark, the one every rendered question ends
    with (``normalize_question``).
    """
    distinct = sorted(set(messages))
    if len(distinct) < 2:
        return None
    prefix = os.path.commonprefix(distinct)
    if prefix and not prefix[-1].isspace():
        prefix = prefix[:max(prefix.rfind(" "), prefix.rfind("\n")) + 1]
    suffix = os.path.commonprefix([m[len(prefix):][::-1] for m in distinct])[::-1]
    suffix = suffix[suffix.find("?") + 1:]  # through the question's own mark: the questions' shared ending
    return f"{prefix}{{question}}{suffix}" if prefix or suffix else None


def template_from_file(path: str | os.PathLike[str]) -> str:
    """The template that rendered the prompts of a data file (parquet, jsonl or json); :class:`DataError`
    when no single template explains them."""
    rows = []
    for number, record in enumerate(read_records(path)):
        if number >= SAMPLE_ROWS:
            break
        question = record.get("question") or (record.get("extra_info") or {}).get("question")
        rows.append((user_message(_prompt_of(record)), question))
    template = template_from_rows(rows)
    if template is None:
        raise DataError(f"{path}: no single prompt template renders its rows' user messages (first "
                        f"{len(rows)} rows)")
    return template


def _prompt_of(record: dict) -> list[dict]:
    for key in ("prompt", "messages"):
        if isinstance(record.get(key), list):
            return record[key]
    if isinstance(record.get("instruction"), str):  # released alpaca rows: the instruction is the user message
        return [{"role": "user", "content": record["instruction"]}]
    return []


def find_record(model_path: str | os.PathLike[str]) -> Path | None:
    """The nearest ``ragr1_prompt.json`` in the model's folder or up to :data:`SEARCH_LEVELS` above it."""
    folder = Path(model_path).expanduser()
    if not folder.is_dir():
        return None  # a hub name or a server's model: nothing recorded locally
    for candidate in [folder, *folder.resolve().parents][:SEARCH_LEVELS + 1]:
        if (candidate / PROMPT_FILE).is_file():
            return candidate / PROMPT_FILE
    return None


def warn_if_untrained_prompt(model_path: str | os.PathLike[str], template: str) -> bool:
    """Log a warning when the model's recorded training prompt differs from ``template``; True if it did."""
    path = find_record(model_path)
    if path is None:
        return False
    record = PromptRecord.read(path)
    if record.template is None or record.template == template:
        return False
    logger.warning("the prompt differs from the one %s was trained with (%s, %s): numbers measured with it are "
                   "not the checkpoint's. Pass --prompt-template %s to use the training prompt",
                   model_path, path, record.source, path)
    return True
