"""What ``ragr1-verl-demo`` prints and draws: per-step training rows, the before/after table, the PNG.

Everything is read from files the real tools wrote: verl's file-logger metrics (one ``{"step", "data"}`` JSON
object per line) for both trainers, and ``ragr1-eval``'s ``results.jsonl`` for each evaluated model.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ragr1_verl.evaluation import stats
from ragr1_verl.evaluation.stats import Interval

logger = logging.getLogger(__name__)

# (header, metric keys tried in order, format) of one RL training step; the ragr1/* keys are the rollout's own.
REWARD = "critic/score/mean"
# Not a verl metric: the running mean of the reward that format_rl_row_with_history puts beside it.
REWARD_MEAN = "ragr1_demo/reward_mean5"
REWARD_WINDOW = 5
RL_COLUMNS = (
    ("step", (), "{:>4}"),
    ("reward", (REWARD,), "{:>6.3f}"),
    ("mean5", (REWARD_MEAN,), "{:>5.3f}"),
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
    """One step's row. ``mean5`` needs the earlier steps: ``-`` here, see :func:`format_rl_row_with_history`."""
    cells = []
    for header, keys, fmt in RL_COLUMNS:
        value = step if not keys else next((metrics[k] for k in keys if metrics.get(k) is not None), None)
        cells.append(_cell(value, fmt, max(len(header), 4)))
    return "  ".join(cells)


def format_rl_row_with_history(step: int, metrics_by_step: Mapping[int, Mapping[str, Any]]) -> str:
    """Step ``step``'s row with ``mean5``: the mean reward over the last (up to) 5 steps up to this one.

    With 2 prompts a step the per-step reward is 0, 0.5 or 1, so its trend is only readable smoothed.
    """
    metrics = dict(metrics_by_step.get(step, {}))
    rewards = [value for at, value in _rewards(metrics_by_step) if at <= step][-REWARD_WINDOW:]
    if metrics.get(REWARD) is not None and rewards:
        metrics[REWARD_MEAN] = sum(rewards) / len(rewards)
    return format_rl_row(step, metrics)


def reward_window_means(metrics_by_step: Mapping[int, Mapping[str, Any]],
                        window: int = REWARD_WINDOW) -> tuple[float | None, float | None]:
    """(mean train reward over the first ``window`` steps, over the last ``window`` steps); ``None`` without
    rewards. With fewer than ``2 * window`` steps the two windows overlap."""
    rewards = [value for _, value in _rewards(metrics_by_step)]
    if not rewards:
        return None, None
    first, last = rewards[:window], rewards[-window:]
    return sum(first) / len(first), sum(last) / len(last)


def _rewards(metrics_by_step: Mapping[int, Mapping[str, Any]]) -> list[tuple[int, float]]:
    return [(step, float(values[REWARD])) for step, values in sorted(metrics_by_step.items())
            if values.get(REWARD) is not None]


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
    """One evaluated model on one group of questions.

    ``em_low``/``em_high``: EM's 95% interval (bootstrap over the group's questions); ``em_by_question``: each
    question's EM, kept so that :func:`difference_rows` can pair two models question by question.
    """

    label: str
    group: str
    questions: int
    em: float
    f1: float
    searches_per_question: float
    queries_per_search: float
    seconds_per_question: float
    protocol: float  # share of trajectories that follow the protocol (tags well formed, an answer at the end)
    em_low: float | None = None
    em_high: float | None = None
    em_by_question: tuple[tuple[str, float], ...] = field(default=(), repr=False, compare=False)


@dataclass(frozen=True)
class DifferenceRow:
    """``after``'s EM minus ``before``'s on the same questions of ``group``, with its paired 95% interval."""

    after: str
    before: str
    group: str
    difference: Interval

    @property
    def name(self) -> str:
        pair = f"{self.after} - {self.before}"
        return pair if self.group == "all" else f"{pair} ({self.group})"


EVAL_HEADER = ("model", "questions", "EM [95% CI]", "F1", "searches/q", "queries/search", "s/question",
               "protocol %")
DIFFERENCE_HEADER = ("EM difference", "questions", "paired [95% CI]")


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
    em_by_question = stats.scores_by_question(records)
    interval = stats.bootstrap_mean(list(em_by_question.values()))
    return EvalRow(label=label, group=group, questions=count,
                   em=sum(record["em"] for record in records) / count,
                   f1=sum(record["f1"] for record in records) / count,
                   searches_per_question=searches / count,
                   queries_per_search=sum(record["queries"] for record in records) / searches if searches else 0.0,
                   seconds_per_question=per_question,
                   protocol=sum(bool(record["format_ok"]) for record in records) / count,
                   em_low=interval.low, em_high=interval.high, em_by_question=tuple(em_by_question.items()))


def difference_rows(rows: Sequence[EvalRow]) -> list[DifferenceRow]:
    """Each model against the one evaluated before it (``sft - base``, ``rl - sft``), overall and per question
    type: the paired EM difference with its bootstrap interval over questions.

    A pair whose question sets differ is left out, with a warning naming the questions.
    """
    labels = list(dict.fromkeys(row.label for row in rows))
    by_key = {(row.label, row.group): row for row in rows}
    groups = list(dict.fromkeys(row.group for row in rows))
    pairs = list(zip(labels, labels[1:]))
    # as the model rows: every pair on all questions, then each pair by question type
    order = [(pair, "all") for pair in pairs] + [(pair, g) for pair in pairs for g in groups if g != "all"]
    found = (_difference(by_key, [after], before, group, after) for (before, after), group in order)
    return [row for row in found if row is not None]


def pooled_difference_rows(rows: Sequence[EvalRow], seeds: Sequence[str], before: str) -> list[DifferenceRow]:
    """The seeds' runs (``rl-seed0``, ``rl-seed1``, ...) against ``before``, pooled over the seeds, overall and
    per question type: each question's difference is averaged over the seeds before questions are resampled
    (:func:`stats.pooled_paired_difference`), so the interval's ``n`` is the number of questions."""
    by_key = {(row.label, row.group): row for row in rows}
    groups = ["all", *(group for group in dict.fromkeys(row.group for row in rows) if group != "all")]
    name = f"rl ({len(seeds)} seeds pooled)"
    found = (_difference(by_key, seeds, before, group, name) for group in groups)
    return [row for row in found if row is not None]


def _difference(by_key: Mapping[tuple[str, str], EvalRow], afters: Sequence[str], before: str, group: str,
                name: str) -> DifferenceRow | None:
    """The paired difference of ``afters`` (pooled when several) against ``before`` on ``group``; ``None``
    when a row is missing or the question sets differ (warned)."""
    first = by_key.get((before, group))
    seconds = [by_key.get((after, group)) for after in afters]
    if first is None or not first.em_by_question or any(row is None or not row.em_by_question for row in seconds):
        return None
    try:
        interval = stats.pooled_paired_difference([dict(row.em_by_question) for row in seconds],
                                                  dict(first.em_by_question), labels=[*afters, before])
    except ValueError as error:
        logger.warning("no EM difference %s - %s (%s): %s", name, before, group, error)
        return None
    return DifferenceRow(name, before, group, interval)


def eval_table(rows: Sequence[EvalRow], differences: Sequence[DifferenceRow] | None = None) -> str:
    """A plain-text table: the ``all`` row of each model, then each model's rows by question type; then the
    paired EM differences (``differences``, by default :func:`difference_rows` of ``rows``)."""
    overall = [row for row in rows if row.group == "all"]
    by_type = [row for row in rows if row.group != "all"]
    cells = [_eval_cells(row) for row in overall + by_type]
    lines = _aligned(EVAL_HEADER, cells, blank_after=len(overall) if by_type else None)
    differences = difference_rows(rows) if differences is None else differences
    if differences:
        overall_differences = sum(row.group == "all" for row in differences)
        cells = [(row.name, f"{row.difference.n}", row.difference.format(3, signed=True)) for row in differences]
        blank = overall_differences if 0 < overall_differences < len(differences) else None
        lines += ["", *_aligned(DIFFERENCE_HEADER, cells, blank_after=blank)]
    return "\n".join(lines)


MODES_HEADER = ("model", "questions", "EM mq", "EM sq", "mq - sq [95% CI]", "searches/q mq", "searches/q sq",
                "mq/sq", "queries/search mq", "queries/search sq", "s/q mq", "s/q sq")


def modes_table(mq: Sequence[EvalRow], sq: Sequence[EvalRow]) -> str:
    """The paper's Table 5 at the demo's scale: each model and question group evaluated in both runs, mq beside
    sq. EM with the paired difference mq - sq over the same questions, searches per question and their ratio
    (below 1: mq needs fewer retrieval rounds), queries per search and seconds per question. ``questions``
    reads ``66/60`` where the two evaluations did not cover the same questions (no difference then)."""
    sq_by_key = {(row.label, row.group): row for row in sq}
    pairs = [(row, sq_by_key[row.label, row.group]) for row in mq if (row.label, row.group) in sq_by_key]
    labels = list(dict.fromkeys(row.label for row in mq))
    # every model on all questions first (as eval_table), then each model's question types in one order
    pairs.sort(key=lambda pair: (pair[0].group != "all", labels.index(pair[0].label), pair[0].group))
    cells = [_modes_cells(first, second) for first, second in pairs]
    overall = sum(first.group == "all" for first, _ in pairs)
    return "\n".join(_aligned(MODES_HEADER, cells, blank_after=overall if 0 < overall < len(pairs) else None))


def _modes_cells(mq: EvalRow, sq: EvalRow) -> tuple[str, ...]:
    try:
        difference = stats.pooled_paired_difference([dict(mq.em_by_question)], dict(sq.em_by_question),
                                                    labels=["mq", "sq"]).format(3, signed=True)
    except ValueError as error:  # not the same questions (an evaluation cut short, another --eval-limit)
        logger.warning("no EM difference mq - sq for %s: %s", _row_name(mq), error)
        difference = "-"
    questions = f"{mq.questions}" if mq.questions == sq.questions else f"{mq.questions}/{sq.questions}"
    ratio = f"{mq.searches_per_question / sq.searches_per_question:.2f}" if sq.searches_per_question else "-"
    return (_row_name(mq), questions, f"{mq.em:.3f}", f"{sq.em:.3f}", difference,
            f"{mq.searches_per_question:.2f}", f"{sq.searches_per_question:.2f}", ratio,
            f"{mq.queries_per_search:.2f}", f"{sq.queries_per_search:.2f}", _seconds(mq), _seconds(sq))


def _seconds(row: EvalRow) -> str:
    return f"{row.seconds_per_question:.2f}" if row.seconds_per_question else "-"  # 0: no wall time recorded


def _row_name(row: EvalRow) -> str:
    return row.label if row.group == "all" else f"{row.label}/{row.group}"


def _eval_cells(row: EvalRow) -> tuple[str, ...]:
    name = _row_name(row)
    em = f"{row.em:.3f}" if row.em_low is None or row.em_high is None else \
        f"{row.em:.3f} [{row.em_low:.3f}, {row.em_high:.3f}]"
    return (name, f"{row.questions}", em, f"{row.f1:.3f}", f"{row.searches_per_question:.2f}",
            f"{row.queries_per_search:.2f}", f"{row.seconds_per_question:.2f}", f"{100 * row.protocol:.0f}")


def _aligned(header: Sequence[str], rows: Sequence[Sequence[str]], blank_after: int | None = None) -> list[str]:
    """Right-aligned columns as wide as their widest cell (the first at least 14, as model names vary)."""
    widths = [max([len(name), 14 if i == 0 else 0, *(len(row[i]) for row in rows)]) for i, name in enumerate(header)]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(header, widths, strict=True))]
    for number, row in enumerate(rows):
        if number == blank_after:
            lines.append("")
        lines.append("  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)))
    return lines


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
