"""Summaries of ``ragr1-eval`` runs: per-benchmark tables (the paper's Table 3 and Table 5), JSON and plots.

Everything here is computed from ``results.jsonl``, never from the rollout's live state, so a summary can be
rebuilt, and two runs compared, at any time.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ragr1_verl.evaluation.protocols import PAPER_AVERAGE, PAPER_COLUMNS, PAPER_TABLE3

logger = logging.getLogger(__name__)

ALL = "average"
# The paper's column order (Table 3); other data sources follow alphabetically.
BENCHMARK_ORDER = PAPER_COLUMNS


@dataclass(frozen=True)
class BenchmarkSummary:
    benchmark: str
    questions: int
    em: float                   # exact match, %
    f1: float                   # token F1, %
    retrieval_rounds: float     # searches per question
    queries_per_search: float
    seconds_per_question: float
    answered: float             # questions with an answer, %


def read_results(run_dir: Path) -> list[dict[str, Any]]:
    """The records of a run (read only: another run may still be appending to it)."""
    from ragr1_verl.evaluation.runner import RESULTS_FILE, read_result_lines

    path = Path(run_dir) / RESULTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no results (run ragr1-eval with --out {run_dir} first)")
    records, broken = read_result_lines(path)
    if broken:
        logger.warning("%s: %d unreadable line(s) left out of the summary", path, broken)
    return records


def _ordered(names: Sequence[str]) -> list[str]:
    known = [name for name in BENCHMARK_ORDER if name in names]
    return known + sorted(set(names) - set(known))


def summarize(records: Sequence[dict[str, Any]]) -> list[BenchmarkSummary]:
    """One row per benchmark, then the unweighted average over benchmarks (as the paper averages)."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        groups[record["data_source"]].append(record)
    rows = [_summary(name, groups[name]) for name in _ordered(list(groups))]
    if len(rows) > 1:
        rows.append(_average(rows))
    return rows


def _summary(name: str, records: Sequence[dict[str, Any]]) -> BenchmarkSummary:
    count = len(records)
    searches = sum(record["searches"] for record in records)
    return BenchmarkSummary(
        benchmark=name, questions=count,
        em=100.0 * sum(record["em"] for record in records) / count,
        f1=100.0 * sum(record["f1"] for record in records) / count,
        retrieval_rounds=searches / count,
        queries_per_search=sum(record["queries"] for record in records) / searches if searches else 0.0,
        seconds_per_question=sum(record["seconds"] for record in records) / count,
        answered=100.0 * sum(record["answer"] is not None for record in records) / count,
    )


def _average(rows: Sequence[BenchmarkSummary]) -> BenchmarkSummary:
    def mean(name: str) -> float:
        return sum(getattr(row, name) for row in rows) / len(rows)

    return BenchmarkSummary(ALL, sum(row.questions for row in rows), mean("em"), mean("f1"),
                            mean("retrieval_rounds"), mean("queries_per_search"), mean("seconds_per_question"),
                            mean("answered"))


def markdown_table(rows: Sequence[BenchmarkSummary]) -> str:
    lines = ["| benchmark | questions | EM | F1 | retrieval rounds | queries/search | s/question | answered % |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r.benchmark} | {r.questions} | {r.em:.1f} | {r.f1:.1f} | {r.retrieval_rounds:.2f} | "
              f"{r.queries_per_search:.2f} | {r.seconds_per_question:.2f} | {r.answered:.0f} |" for r in rows]
    return "\n".join(lines)


def comparison_table(label_a: str, rows_a: Sequence[BenchmarkSummary], label_b: str,
                     rows_b: Sequence[BenchmarkSummary]) -> str:
    """Two runs side by side per benchmark: EM (Table 3) and rounds and seconds per question (Table 5)."""
    rows_a, rows_b = shared_rows(rows_a, rows_b), shared_rows(rows_b, rows_a)
    by_a, by_b = {r.benchmark: r for r in rows_a}, {r.benchmark: r for r in rows_b}
    names = [r.benchmark for r in rows_a]
    header = (f"| benchmark | EM {label_a} | EM {label_b} | rounds {label_a} | rounds {label_b} | "
              f"s/q {label_a} | s/q {label_b} |")
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|"]
    for name in names:
        a, b = by_a[name], by_b[name]
        lines.append(f"| {name} | {a.em:.1f} | {b.em:.1f} | {a.retrieval_rounds:.2f} | {b.retrieval_rounds:.2f} | "
                     f"{a.seconds_per_question:.2f} | {b.seconds_per_question:.2f} |")
    return "\n".join(lines)


def shared_rows(rows: Sequence[BenchmarkSummary], other: Sequence[BenchmarkSummary]) -> list[BenchmarkSummary]:
    """``rows`` restricted to the benchmarks ``other`` has too, with the average recomputed over those."""
    names = {row.benchmark for row in other if row.benchmark != ALL}
    kept = [row for row in rows if row.benchmark in names]
    return kept + [_average(kept)] if len(kept) > 1 else kept


def protocol_header(protocol: str, mode: str) -> str:
    """What ``summary.md`` says about how its numbers were measured."""
    if protocol == "paper":
        return (f"Protocol: **paper** (the original evaluation script's rules; see the README's protocol "
                f"table). Paper column: RAG-R1-{mode}, Table 3 (EM, Qwen2.5-7B-Instruct, KILT with BGE-large).")
    return (f"Protocol: **project** (the training rollout's rules). EM here is not comparable with the paper's "
            f"column, which is RAG-R1-{mode} under the paper's protocol: rerun with `--protocol paper` for that.")


def paper_table(rows: Sequence[BenchmarkSummary], mode: str) -> str:
    """EM per benchmark beside the paper's Table 3 value for the same method, in the paper's column order."""
    paper = PAPER_TABLE3.get(mode, {})
    known = [paper[row.benchmark] for row in rows if row.benchmark in paper]
    # the paper's average is over its seven benchmarks: over fewer, the mean of their paper values
    average = PAPER_AVERAGE.get(mode) if len(known) == len(paper) else (sum(known) / len(known) if known else None)
    lines = [f"| benchmark | EM | paper EM (RAG-R1-{mode}) |", "|---|---:|---:|"]
    for row in rows:
        reference = average if row.benchmark == ALL else paper.get(row.benchmark)
        lines.append(f"| {row.benchmark} | {row.em:.1f} | {'-' if reference is None else f'{reference:.1f}'} |")
    return "\n".join(lines)


def read_run(run_dir: Path) -> dict[str, Any]:
    """The run's settings (``run.json``); empty when there are none to read."""
    from ragr1_verl.evaluation.runner import RUN_FILE

    try:
        return json.loads((Path(run_dir) / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def write_summary(run_dir: Path, records: Sequence[dict[str, Any]]) -> list[BenchmarkSummary]:
    """``summary.md``, ``summary.json`` and the plots of one run; returns the rows."""
    rows = summarize(records)
    run = read_run(run_dir)
    protocol, mode = run.get("protocol", "project"), run.get("ragr1", {}).get("mode", "mq")
    text = f"{protocol_header(protocol, mode)}\n\n{markdown_table(rows)}\n\n{paper_table(rows, mode)}\n"
    (run_dir / "summary.md").write_text(text, encoding="utf-8")
    (run_dir / "summary.json").write_text(json.dumps([asdict(row) for row in rows], indent=2) + "\n",
                                          encoding="utf-8")
    plot_run(run_dir, rows, [record["searches"] for record in records])
    return rows


def write_comparison(out_dir: Path, label_a: str, rows_a: Sequence[BenchmarkSummary], label_b: str,
                     rows_b: Sequence[BenchmarkSummary]) -> str:
    table = comparison_table(label_a, rows_a, label_b, rows_b)
    (out_dir / "comparison.md").write_text(table + "\n", encoding="utf-8")
    payload = {label_a: [asdict(r) for r in rows_a], label_b: [asdict(r) for r in rows_b]}
    (out_dir / "comparison.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    plot_comparison(out_dir, label_a, rows_a, label_b, rows_b)
    return table


def _pyplot():
    """matplotlib's pyplot for files, or None (with a warning) when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        logger.warning("no plots: matplotlib is not installed (pip install 'ragr1-verl[eval]')")
        return None

    matplotlib.use("Agg")  # files only: never open a window, works without a display
    import matplotlib.pyplot as plt

    return plt


def plot_run(run_dir: Path, rows: Sequence[BenchmarkSummary], searches: Sequence[int]) -> None:
    """``em_per_benchmark.png`` and ``retrieval_rounds.png`` (histogram of searches per question)."""
    plt = _pyplot()
    if plt is None:
        return
    figure, axes = plt.subplots(figsize=(8, 4))
    axes.bar([r.benchmark for r in rows], [r.em for r in rows], color="tab:blue")
    axes.set_ylabel("exact match (%)")
    axes.set_title("EM per benchmark")
    axes.tick_params(axis="x", rotation=30)
    figure.tight_layout()
    figure.savefig(run_dir / "em_per_benchmark.png", dpi=120)
    plt.close(figure)

    figure, axes = plt.subplots(figsize=(6, 4))
    bins = range(max(searches, default=0) + 2)
    axes.hist(searches, bins=bins, align="left", rwidth=0.8, color="tab:green")
    axes.set_xlabel("retrieval rounds (searches) per question")
    axes.set_ylabel("questions")
    figure.tight_layout()
    figure.savefig(run_dir / "retrieval_rounds.png", dpi=120)
    plt.close(figure)


def plot_comparison(out_dir: Path, label_a: str, rows_a: Sequence[BenchmarkSummary], label_b: str,
                    rows_b: Sequence[BenchmarkSummary]) -> None:
    """``comparison.png``: EM, retrieval rounds and seconds per question, the two runs side by side."""
    plt = _pyplot()
    if plt is None:
        return
    shared, rows_b = shared_rows(rows_a, rows_b), shared_rows(rows_b, rows_a)
    by_b = {r.benchmark: r for r in rows_b}
    names = [r.benchmark for r in shared]
    positions = list(range(len(names)))
    figure, panels = plt.subplots(1, 3, figsize=(15, 4))
    for axes, metric, title in zip(panels, ("em", "retrieval_rounds", "seconds_per_question"),
                                   ("exact match (%)", "retrieval rounds per question", "seconds per question"),
                                   strict=True):
        axes.bar([p - 0.2 for p in positions], [getattr(r, metric) for r in shared], 0.4, label=label_a)
        axes.bar([p + 0.2 for p in positions], [getattr(by_b[n], metric) for n in names], 0.4, label=label_b)
        axes.set_xticks(positions, names, rotation=30)
        axes.set_title(title)
    panels[0].legend()
    figure.tight_layout()
    figure.savefig(out_dir / "comparison.png", dpi=120)
    plt.close(figure)
