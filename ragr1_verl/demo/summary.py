"""A run's evaluations as one small file to keep: ``eval/summary.json`` of a ``ragr1-verl-demo`` run folder.

A run folder holds checkpoints and every trajectory (gigabytes) and lives on one machine. This file holds what
the demo's tables are computed from: each held-out question's scores for every evaluated model, each
evaluation's wall time and the run's settings (``run.json``), in tens of kilobytes. ``--compare-modes``
reads it in place of a run folder, so that a table can be rebuilt, and a later run paired with this one
question by question, after the folder is gone.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ragr1_verl.records import staged_output

SUMMARY_FILE = "summary.json"  # in the run folder's eval/
FORMAT_VERSION = 1
# what report.eval_rows reads from a ragr1-eval record; the trajectories stay in eval/<label>/results.jsonl
# (a number each, but the question); format_ok is a float 0/1 in ragr1-eval's records
KEPT_FIELDS = ("question", "em", "f1", "searches", "queries", "format_ok")


class SummaryError(ValueError):
    """A summary file that cannot be read; the message names the file and the field."""


@dataclass(frozen=True)
class ModelEvaluation:
    """One evaluated model: a record per question (:data:`KEPT_FIELDS`) and the evaluation's wall seconds."""

    records: tuple[Mapping[str, Any], ...]
    seconds: float


@dataclass(frozen=True)
class RunSummary:
    run: Mapping[str, Any]  # the run folder's run.json
    models: Mapping[str, ModelEvaluation]  # label (base, sft, rl-seed0, ...) -> its evaluation


def kept_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of a ragr1-eval record that the tables need."""
    return {name: record[name] for name in KEPT_FIELDS}


def write_summary(path: Path, summary: RunSummary) -> None:
    """Write ``summary`` to ``path`` at once (staged, then renamed over it): never half a file."""
    document = {"format": FORMAT_VERSION, "run": dict(summary.run),
                "models": {label: {"seconds": round(model.seconds, 1),
                                   "records": [kept_record(record) for record in model.records]}
                           for label, model in summary.models.items()}}
    with staged_output(path.parent) as staging:
        (staging / path.name).write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")


def read_summary(path: Path) -> RunSummary:
    """The summary in ``path``; :class:`SummaryError` names the file and the first field that is wrong."""
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise SummaryError(f"{path}: not a readable JSON file ({error})") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT_VERSION:
        raise SummaryError(f"{path}: not a ragr1-verl-demo {SUMMARY_FILE} (expected \"format\": {FORMAT_VERSION})")
    run, models = document.get("run"), document.get("models")
    if not isinstance(run, dict):
        raise SummaryError(f"{path}: \"run\" must be an object (the run's run.json)")
    if not isinstance(models, dict):
        raise SummaryError(f"{path}: \"models\" must be an object of label -> evaluation")
    return RunSummary(run, {label: _model(path, label, model) for label, model in models.items()})


def _model(path: Path, label: str, model: Any) -> ModelEvaluation:
    where = f"{path}: models.{label}"
    if not isinstance(model, dict):
        raise SummaryError(f"{where}: must be an object with \"seconds\" and \"records\"")
    seconds, records = model.get("seconds"), model.get("records")
    if not _is_number(seconds) or seconds < 0:
        raise SummaryError(f"{where}.seconds: must be a number >= 0, not {seconds!r}")
    if not isinstance(records, list):
        raise SummaryError(f"{where}.records: must be a list")
    return ModelEvaluation(tuple(_record(f"{where}.records[{row}]", record) for row, record in enumerate(records)),
                           float(seconds))


def _record(where: str, record: Any) -> Mapping[str, Any]:
    if not isinstance(record, dict):
        raise SummaryError(f"{where}: must be an object")
    for name in KEPT_FIELDS:
        value = record.get(name)
        if name == "question" and not isinstance(value, str):
            raise SummaryError(f"{where}.question: expected the question's text, got {value!r}")
        if name != "question" and not (_is_number(value) or isinstance(value, bool)):
            raise SummaryError(f"{where}.{name}: expected a number, got {value!r}")
    return record


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

