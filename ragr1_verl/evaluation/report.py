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

from ragr1_verl.evaluation import stats
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


@dataclass(frozen=True)
class EMComparison:
    """One benchmark (or the average) of two runs: each EM with its 95% interval, and this run's paired
    difference (``b - a``, same questions), all in percent. ``difference`` is ``None`` where the two runs do not
    hold the same questions (a paired difference is then undefined)."""

    benchmark: str
    em_a: stats.Interval
    em_b: stats.Interval
    difference: stats.Interval | None


def keyed_em(records: Sequence[dict[str, Any]], benchmarks: Sequence[str]) -> tuple[dict[str, float],
                                                                                    dict[str, str]]:
    """``"benchmark: question" -> EM`` of the records of ``benchmarks`` (for paired statistics), and each such
    key's benchmark (the strata of an average over benchmarks)."""
    em: dict[str, float] = {}
    strata: dict[str, str] = {}
    for name in benchmarks:
        group = [record for record in records if record["data_source"] == name]
        for key, value in stats.scores_by_question(group).items():
            em[f"{name}: {key}"], strata[f"{name}: {key}"] = value, name
    return em, strata


def em_interval(records: Sequence[dict[str, Any]], benchmarks: Sequence[str]) -> stats.Interval:
    """EM (%) over ``benchmarks`` with its bootstrap interval; over several, the unweighted mean of their EMs
    (as :func:`summarize` averages), each benchmark resampled on its own."""
    em, strata = keyed_em(records, benchmarks)
    return stats.bootstrap_mean(list(em.values()), strata=list(strata.values()) if len(benchmarks) > 1 else None
                                ).scaled(100.0)


def em_difference(after: Sequence[Sequence[dict[str, Any]]], before: Sequence[dict[str, Any]],
                  benchmarks: Sequence[str], labels: Sequence[str] | None = None) -> stats.Interval:
    """EM (%) of ``after`` minus ``before`` on ``benchmarks``, paired by question; with several ``after`` runs
    (seeds), pooled: each question's difference averaged over the seeds, then questions resampled. Raises
    ``ValueError`` naming the questions the runs do not share."""
    before_em, strata = keyed_em(before, benchmarks)
    after_em = [keyed_em(records, benchmarks)[0] for records in after]
    return stats.pooled_paired_difference(after_em, before_em, strata=strata if len(benchmarks) > 1 else None,
                                          labels=labels).scaled(100.0)


def compare_em(label_a: str, records_a: Sequence[dict[str, Any]], label_b: str,
               records_b: Sequence[dict[str, Any]]) -> list[EMComparison]:
    """Per benchmark both runs share, then their average: each run's EM interval and ``b - a`` paired."""
    names = [row.benchmark for row in shared_rows(summarize(records_a), summarize(records_b))]
    out = []
    for name in names:
        benchmarks = [n for n in names if n != ALL] if name == ALL else [name]
        try:
            difference: stats.Interval | None = em_difference([records_b], records_a, benchmarks,
                                                               labels=[label_b, label_a])
        except ValueError as error:
            logger.warning("%s: no paired difference: %s", name, error)
            difference = None
        out.append(EMComparison(name, em_interval(records_a, benchmarks), em_interval(records_b, benchmarks),
                                difference))
    return out


def comparison_table(label_a: str, rows_a: Sequence[BenchmarkSummary], label_b: str,
                     rows_b: Sequence[BenchmarkSummary], em: Sequence[EMComparison] | None = None) -> str:
    """Two runs side by side per benchmark: EM (Table 3) and rounds and seconds per question (Table 5).

    With ``em`` (:func:`compare_em`), three columns follow: each run's EM 95% interval (bootstrap over
    questions) and the paired difference ``b - a`` with its interval.
    """
    rows_a, rows_b = shared_rows(rows_a, rows_b), shared_rows(rows_b, rows_a)
    by_a, by_b = {r.benchmark: r for r in rows_a}, {r.benchmark: r for r in rows_b}
    by_em = {c.benchmark: c for c in em or ()}
    names = [r.benchmark for r in rows_a]
    header = (f"| benchmark | EM {label_a} | EM {label_b} | rounds {label_a} | rounds {label_b} | "
              f"s/q {label_a} | s/q {label_b} |")
    rule = "|---|---:|---:|---:|---:|---:|---:|"
    if em is not None:
        header += f" EM {label_a} 95% CI | EM {label_b} 95% CI | EM {label_b} - {label_a} (paired, 95% CI) |"
        rule += "---:|---:|---:|"
    lines = [header, rule]
    for name in names:
        a, b = by_a[name], by_b[name]
        line = (f"| {name} | {a.em:.1f} | {b.em:.1f} | {a.retrieval_rounds:.2f} | {b.retrieval_rounds:.2f} | "
                f"{a.seconds_per_question:.2f} | {b.seconds_per_question:.2f} |")
        if em is not None:
            line += " " + " | ".join(_em_cells(by_em.get(name))) + " |"
        lines.append(line)
    return "\n".join(lines)


def _em_cells(comparison: EMComparison | None) -> tuple[str, str, str]:
    if comparison is None:
        return "-", "-", "-"

    def bounds(interval: stats.Interval) -> str:
        return f"[{interval.low:.1f}, {interval.high:.1f}]"

    difference = comparison.difference
    return (bounds(comparison.em_a), bounds(comparison.em_b),
            "- (other questions)" if difference is None else difference.format(1, signed=True))


def seeds_table(label_before: str, records_before: Sequence[dict[str, Any]],
                runs: Sequence[tuple[str, Sequence[dict[str, Any]]]]) -> tuple[str, list[dict[str, Any]]]:
    """Several seeds of one model against ``before``: per benchmark (and their average), each seed's paired EM
    difference and the pooled one (:func:`em_difference`), in percent. Returns the markdown and its numbers.

    Every run must hold the questions ``before`` holds on the benchmarks they all share (``ValueError``)."""
    shared = summarize(records_before)
    for _, records in runs:
        shared = shared_rows(shared, summarize(records))
    names = [row.benchmark for row in shared]
    labels = [label for label, _ in runs]
    header = ("| benchmark | " + " | ".join(f"{label} - {label_before}" for label in labels)
              + f" | pooled over {len(runs)} seeds |")
    lines = [header, "|---|" + "---:|" * (len(runs) + 1)]
    numbers = []
    for name in names:
        benchmarks = [n for n in names if n != ALL] if name == ALL else [name]
        per_seed = [em_difference([records], records_before, benchmarks, labels=[label, label_before])
                    for label, records in runs]
        pooled = em_difference([records for _, records in runs], records_before, benchmarks,
                               labels=[*labels, label_before])
        cells = [interval.format(1, signed=True) for interval in (*per_seed, pooled)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
        numbers.append({"benchmark": name, "before": label_before,
                        "seeds": {label: interval.as_dict() for label, interval in zip(labels, per_seed, strict=True)},
                        "pooled": pooled.as_dict()})
    return "\n".join(lines), numbers


def shared_rows(rows: Sequence[BenchmarkSummary], other: Sequence[BenchmarkSummary]) -> list[BenchmarkSummary]:
    """``rows`` restricted to the benchmarks ``other`` has too, with the average recomputed over those."""
    names = {row.benchmark for row in other if row.benchmark != ALL}
    kept = [row for row in rows if row.benchmark in names]
    return kept + [_average(kept)] if len(kept) > 1 else kept


def protocol_header(protocol: str, mode: str) -> str:
    """What ``summary.md`` says about how its numbers were measured."""
    if protocol == "paper":
        return (f"Protocol: **paper** (the original evaluation script's rules; see the protocol table "
                f"in docs/guides/evaluation.md). Paper column: RAG-R1-{mode}, Table 3 (EM, Qwen2.5-7B-Instruct, KILT with BGE-large).")
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
                     rows_b: Sequence[BenchmarkSummary], *, records_a: Sequence[dict[str, Any]] | None = None,
                     records_b: Sequence[dict[str, Any]] | None = None,
                     seed_runs: Sequence[tuple[str, Sequence[dict[str, Any]]]] = ()) -> str:
    """``comparison.md`` / ``.json`` / ``.png``; returns the markdown.

    With both runs' records, EM gets its 95% interval and ``b - a`` its paired interval (the JSON rows gain
    ``em_ci95`` and, in ``b``'s rows, ``em_difference``). ``seed_runs``: more runs of ``b``'s model with other
    seeds; a second table gives each seed's paired difference and the pooled one (``b``'s rows gain
    ``em_difference_seeds``).
    """
    em = compare_em(label_a, records_a, label_b, records_b) if records_a is not None and records_b is not None \
        else None
    table = comparison_table(label_a, rows_a, label_b, rows_b, em)
    payload = {label_a: [asdict(r) for r in rows_a], label_b: [asdict(r) for r in rows_b]}
    by_em = {c.benchmark: c for c in em or ()}
    shared = set(by_em) - {ALL}
    for label, rows in ((label_a, payload[label_a]), (label_b, payload[label_b])):
        for row in rows:
            comparison = by_em.get(row["benchmark"])
            if comparison is None or (row["benchmark"] == ALL and {r["benchmark"] for r in rows} - {ALL} != shared):
                continue  # a run's own average over more benchmarks than the two share is another number
            interval = comparison.em_a if label == label_a else comparison.em_b
            row["em_ci95"] = [interval.low, interval.high]
            if label == label_b:
                row["em_difference"] = None if comparison.difference is None else {
                    "vs": label_a, **comparison.difference.as_dict()}
    if seed_runs and records_b is not None and records_a is not None:
        seeds, numbers = seeds_table(label_a, records_a, [(label_b, records_b), *seed_runs])
        table += f"\n\nEM difference per seed (paired, 95% CI) and pooled over the seeds:\n\n{seeds}"
        by_seeds = {entry["benchmark"]: entry for entry in numbers}
        for row in payload[label_b]:
            if row["benchmark"] in by_seeds:
                row["em_difference_seeds"] = by_seeds[row["benchmark"]]
    (out_dir / "comparison.md").write_text(table + "\n", encoding="utf-8")
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
