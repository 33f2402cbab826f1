"""What ``ragr1-verl-demo`` prints and draws: per-step training rows, the before/after table, the PNG.

Everything is read from files the real tools wrote: verl's file-logger metrics (one ``{"step", "data"}`` JSON
object per line) for both trainers, and ``ragr1-eval``'s ``results.jsonl`` for each evaluated model.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# (header, metric keys tried in order, format) of one RL training step; the ragr1/* keys are the rollout's own.
RL_COLUMNS = (
    ("step", (), "{:>4}"),
    ("reward", ("critic/score/mean",), "{:>6.3f}"),
    ("EM", ("ragr1/em",), "{:>5.3f}"),
    ("searches/traj", ("ragr1/searches_per_trajectory",), "{:>13.2f}"),
    ("queries/search", ("ragr1/queries_per_search",), "{:>14.2f}"),
    ("answered", ("ragr1/answered",), "{:>8.2f}"),
    ("KL", ("actor/reward_kl_penalty", "actor/kl_loss"), "{:>9.2e}"),
    ("rollout~actor dp", ("training/rollout_probs_diff_max",), "{:>16.1e}"),
    ("step s", ("timing_s/step",), "{:>6.1f}"),
)
SFT_LOSS, SFT_VAL_LOSS = "train/loss", "val/loss"


def read_metrics(path: Path) -> dict[int, dict[str, Any]]:
    """verl's file logger output: one ``{"step": n, "data": {...}}`` line per step (a cut last line is skipped)."""
    steps: dict[int, dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(json.JSONDecodeError, KeyError, TypeError, ValueError):
                record = json.loads(line)
                steps.setdefault(int(record["step"]), {}).update(record["data"])
    return steps


def _cell(value: Any, fmt: str, width: int) -> str:
    return (fmt.format(value) if value is not None else "-").rjust(width)


def rl_header() -> str:
    return "  ".join(f"{header:>{max(len(header), 4)}}" for header, _, _ in RL_COLUMNS)


def format_rl_row(step: int, metrics: Mapping[str, Any]) -> str:
    cells = []
    for header, keys, fmt in RL_COLUMNS:
        value = step if not keys else next((metrics[k] for k in keys if metrics.get(k) is not None), None)
        cells.append(_cell(value, fmt, max(len(header), 4)))
    return "  ".join(cells)


def validation_summary(metrics: Mapping[int, Mapping[str, Any]]) -> str | None:
    """The last RL validation's EM and searches, from the ``val-core``/``val-aux`` metrics."""
    for step in sorted(metrics, reverse=True):
        em = {k: v for k, v in metrics[step].items() if k.startswith("val-core/") and "/acc/" in k}
        if em:
            searches = [v for k, v in metrics[step].items() if k.startswith("val-aux/") and "/searches/" in k]
            parts = [f"EM {next(iter(em.values())):.3f}"]
            if searches:
                parts.append(f"searches/question {searches[0]:.2f}")
            return f"validation after step {step}: " + ", ".join(parts)
    return None


# -- evaluation table ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EvalRow:
    """One evaluated model on one group of questions."""

    label: str
    group: str
    questions: int
    em: float
    f1: float
    searches_per_question: float
    queries_per_search: float
    seconds_per_question: float
    protocol: float  # share of trajectories that follow the protocol (tags well formed, an answer at the end)


EVAL_HEADER = ("model", "questions", "EM", "F1", "searches/q", "queries/search", "s/question", "protocol %")


def eval_rows(label: str, records: Sequence[Mapping[str, Any]], wall_seconds: float,
              question_types: Mapping[str, str]) -> list[EvalRow]:
    """The row of all questions, then one per question type (``single-hop``, ``bridge``, ``comparison``).

    Seconds per question are the evaluation's wall time over its questions: with several questions decoded
    as one batch, a question's own time includes waiting for the others.
    """
    groups: dict[str, list[Mapping[str, Any]]] = {"all": list(records)}
    for record in records:
        groups.setdefault(question_types.get(record["question"], "other"), []).append(record)
    per_question = wall_seconds / len(records) if records else 0.0
    return [_eval_row(label, name, rows, per_question) for name, rows in groups.items() if rows]


def _eval_row(label: str, group: str, records: Sequence[Mapping[str, Any]], per_question: float) -> EvalRow:
    count = len(records)
    searches = sum(record["searches"] for record in records)
    return EvalRow(label=label, group=group, questions=count,
                   em=sum(record["em"] for record in records) / count,
                   f1=sum(record["f1"] for record in records) / count,
                   searches_per_question=searches / count,
                   queries_per_search=sum(record["queries"] for record in records) / searches if searches else 0.0,
                   seconds_per_question=per_question,
                   protocol=sum(bool(record["format_ok"]) for record in records) / count)


def eval_table(rows: Sequence[EvalRow]) -> str:
    """A plain-text table: the ``all`` row of each model, then each model's rows by question type."""
    widths = [max(len(header), 14) if i == 0 else len(header) for i, header in enumerate(EVAL_HEADER)]
    lines = ["  ".join(header.rjust(width) for header, width in zip(EVAL_HEADER, widths, strict=True))]
    overall = [row for row in rows if row.group == "all"]
    by_type = [row for row in rows if row.group != "all"]
    for row in overall + by_type:
        name = row.label if row.group == "all" else f"{row.label}/{row.group}"
        values = (name, f"{row.questions}", f"{row.em:.3f}", f"{row.f1:.3f}", f"{row.searches_per_question:.2f}",
                  f"{row.queries_per_search:.2f}", f"{row.seconds_per_question:.2f}", f"{100 * row.protocol:.0f}")
        lines.append("  ".join(value.rjust(width) for value, width in zip(values, widths, strict=True)))
        if row is overall[-1] and by_type:
            lines.append("")
    return "\n".join(lines)


# -- plot -------------------------------------------------------------------------------------------------

def write_plot(path: Path, sft_metrics: Mapping[int, Mapping[str, Any]],
               rl_metrics: Mapping[int, Mapping[str, Any]]) -> Path | None:
    """``path`` (PNG): the SFT loss per step (validation loss per epoch as points) and the RL reward and EM per
    step; ``None`` without matplotlib or without anything to draw."""
    if not sft_metrics and not rl_metrics:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plot (pip install 'ragr1-verl[demo]')")
        return None
    figure, (sft_axis, rl_axis) = plt.subplots(1, 2, figsize=(11, 4))
    _series(sft_axis, sft_metrics, ((SFT_LOSS, "train loss", "-"), (SFT_VAL_LOSS, "validation loss", "o")))
    sft_axis.set(title="stage 1: SFT", xlabel="step", ylabel="loss")
    _series(rl_axis, rl_metrics, (("critic/score/mean", "reward", "-"), ("ragr1/em", "train EM", "--")))
    _series(rl_axis, rl_metrics, tuple((key, "validation EM", "o") for key in _val_em_keys(rl_metrics)))
    rl_axis.set(title="stage 2: RL", xlabel="step", ylabel="mean over the batch", ylim=(-0.05, 1.05))
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _val_em_keys(metrics: Mapping[int, Mapping[str, Any]]) -> list[str]:
    return sorted({k for m in metrics.values() for k in m if k.startswith("val-core/") and "/acc/" in k})[:1]


def _series(axis: Any, metrics: Mapping[int, Mapping[str, Any]], series: Sequence[tuple[str, str, str]]) -> None:
    for key, label, style in series:
        points = [(step, values[key]) for step, values in sorted(metrics.items()) if values.get(key) is not None]
        if points:
            axis.plot(*zip(*points, strict=True), style, label=label)
    if axis.get_legend_handles_labels()[0]:
        axis.legend()
