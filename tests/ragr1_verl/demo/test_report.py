"""The demo's before/after table: EM with its 95% interval, and the paired differences between stages."""

from __future__ import annotations

import re

import pytest

from ragr1_verl.demo import report

QUESTIONS = [f"question {i}?" for i in range(12)]
TYPES = {q: ("bridge" if i % 2 else "comparison") for i, q in enumerate(QUESTIONS)}


def _records(correct: set[int]) -> list[dict]:
    return [{"question": q, "em": float(i in correct), "f1": float(i in correct), "searches": 1, "queries": 2,
             "format_ok": True} for i, q in enumerate(QUESTIONS)]


def _rows() -> list[report.EvalRow]:
    rows = report.eval_rows("base", _records(set()), 12.0, TYPES)
    rows += report.eval_rows("sft", _records({0, 1, 2, 3, 4, 5}), 12.0, TYPES)
    rows += report.eval_rows("rl", _records({0, 1, 2, 3, 4, 5}), 12.0, TYPES)  # the same answers as sft
    return rows


def test_each_em_is_shown_with_its_interval():
    table = report.eval_table(_rows())
    lines = table.splitlines()
    assert "EM [95% CI]" in lines[0]
    assert lines[1].split()[:5] == ["base", "12", "0.000", "[0.000,", "0.000]"]
    sft = next(line for line in lines if line.split()[:1] == ["sft"])
    low, high = map(float, re.search(r"0\.500 \[(\S+), (\S+)\]", sft).groups())
    assert 0.0 < low < 0.5 < high < 1.0
    assert any(line.split()[:1] == ["rl/bridge"] and "[" in line for line in lines)


def test_each_stage_is_compared_with_the_one_before_it_overall_and_per_question_type():
    rows = _rows()
    differences = {(d.after, d.before, d.group): d.difference for d in report.difference_rows(rows)}
    assert set(differences) == {(after, before, group) for after, before in (("sft", "base"), ("rl", "sft"))
                                for group in ("all", "bridge", "comparison")}
    assert differences[("rl", "sft", "all")] == report.Interval(0.0, 0.0, 0.0, 12)  # all pairs equal
    comparison = differences[("sft", "base", "comparison")]  # 3 of its 6 questions gained
    assert (comparison.mean, comparison.n) == (0.5, 6) and 0.0 < comparison.low < 0.5 < comparison.high < 1.0

    table = report.eval_table(rows)
    assert "EM difference" in table and "paired [95% CI]" in table
    assert re.search(r"sft - base\s+12\s+\+0\.500 \[0\.\d+, 0\.\d+\]", table)
    assert re.search(r"rl - sft\s+12\s+\+0\.000 \[0\.000, 0\.000\]", table)
    assert re.search(r"rl - sft \(bridge\)\s+6\s+\+0\.000 \[0\.000, 0\.000\]", table)
    # the model rows come first, then the differences
    assert table.index("rl/comparison") < table.index("sft - base")


def test_differences_can_be_given_or_left_out_and_mismatched_questions_are_skipped(caplog):
    rows = _rows()
    assert "EM difference" not in report.eval_table(rows, differences=[])
    fewer = report.eval_rows("rl", _records({0})[:-1], 11.0, TYPES)
    mixed = [row for row in rows if row.label != "rl"] + fewer
    assert ("rl", "sft", "all") not in {(d.after, d.before, d.group) for d in report.difference_rows(mixed)}
    assert "only in sft: 'question 11?'" in caplog.text


def test_seeds_are_pooled_per_question_before_questions_are_resampled():
    rows = report.eval_rows("sft", _records({0, 1}), 12.0, TYPES)
    rows += report.eval_rows("rl-seed0", _records({0, 1}), 12.0, TYPES)  # no change
    rows += report.eval_rows("rl-seed1", _records({0, 1, 2, 4, 6, 8}), 12.0, TYPES)  # 4 comparison questions gained
    pooled = {d.group: d for d in report.pooled_difference_rows(rows, ["rl-seed0", "rl-seed1"], "sft")}
    assert list(pooled) == ["all", "comparison", "bridge"]
    overall = pooled["all"].difference
    # each gained question counts half (one seed of two gained it), and n is the 12 questions, not 24
    assert (overall.mean, overall.n) == (pytest.approx(4 * 0.5 / 12), 12)
    assert overall.low >= 0.0 and overall.high <= 4 / 12
    assert pooled["bridge"].difference == report.Interval(0.0, 0.0, 0.0, 6)
    assert pooled["all"].name == "rl (2 seeds pooled) - sft"


def test_seeds_with_other_questions_get_no_pooled_row(caplog):
    rows = report.eval_rows("sft", _records({0}), 12.0, TYPES)
    rows += report.eval_rows("rl-seed0", _records({0}), 12.0, TYPES)
    rows += report.eval_rows("rl-seed1", _records({0})[:-1], 11.0, TYPES)
    assert "all" not in {d.group for d in report.pooled_difference_rows(rows, ["rl-seed0", "rl-seed1"], "sft")}
    assert "only in sft: 'question 11?'" in caplog.text


def test_rl_rows_carry_the_running_mean_of_the_reward():
    metrics = {step: {"critic/score/mean": reward, "timing_s/step": 1.0}
               for step, reward in enumerate([0.0, 0.5, 1.0, 0.5, 0.0, 1.0, 1.0], start=1)}
    header = report.rl_header().split()
    assert header[:3] == ["step", "reward", "mean5"]
    assert report.format_rl_row_with_history(2, metrics).split()[:3] == ["2", "0.500", "0.250"]
    # step 7: the mean of steps 3..7
    assert report.format_rl_row_with_history(7, metrics).split()[:3] == ["7", "1.000", "0.700"]
    assert report.format_rl_row(7, metrics[7]).split()[:3] == ["7", "1.000", "-"]
    assert len(report.format_rl_row_with_history(7, metrics).split()) == len(report.RL_COLUMNS)
    assert report.reward_window_means(metrics) == (pytest.approx(0.4), pytest.approx(0.7))
    assert report.reward_window_means({}) == (None, None)
    assert report.reward_window_means(metrics, window=2) == (pytest.approx(0.25), pytest.approx(1.0))


def _mode_records(correct: set[int], searches: int, queries: int) -> list[dict]:
    return [{"question": q, "em": float(i in correct), "f1": float(i in correct), "searches": searches,
             "queries": queries, "format_ok": True} for i, q in enumerate(QUESTIONS)]


def test_the_modes_table_sets_mq_beside_sq_with_the_search_ratio_and_the_paired_difference():
    """Table 5: mq searches once with 2 queries and answers every question; sq searches twice with 1 query
    each and answers half: ratio 0.50, difference +0.500 overall, +1.000 on the questions sq missed."""
    mq = report.eval_rows("sft", _mode_records(set(range(12)), searches=1, queries=2), 24.0, TYPES)
    sq = report.eval_rows("sft", _mode_records({1, 3, 5, 7, 9, 11}, searches=2, queries=2), 48.0, TYPES)
    lines = report.modes_table(mq, sq).splitlines()
    assert lines[0].split()[:5] == ["model", "questions", "EM", "mq", "EM"]
    rows = {line.split()[0]: line.split() for line in lines[1:] if line.strip()}
    assert set(rows) == {"sft", "sft/bridge", "sft/comparison"}
    overall = rows["sft"]
    assert overall[1:4] == ["12", "1.000", "0.500"] and overall[4] == "+0.500"
    assert overall[7:10] == ["1.00", "2.00", "0.50"]  # searches/q mq, sq, and mq/sq
    assert overall[10:14] == ["2.00", "1.00", "2.00", "4.00"]  # queries/search mq, sq; s/q mq, sq
    assert rows["sft/bridge"][2:5] == ["1.000", "1.000", "+0.000"]
    assert rows["sft/comparison"][2:5] == ["1.000", "0.000", "+1.000"]


def test_the_modes_table_leaves_out_models_only_one_run_has():
    mq = report.eval_rows("sft", _mode_records(set(), 1, 2), 12.0, TYPES)
    mq += report.eval_rows("rl-seed0", _mode_records(set(), 1, 2), 12.0, TYPES)
    sq = report.eval_rows("sft", _mode_records(set(), 2, 2), 12.0, TYPES)
    names = {line.split()[0] for line in report.modes_table(mq, sq).splitlines()[1:] if line.strip()}
    assert names == {"sft", "sft/bridge", "sft/comparison"}


def test_the_modes_table_shows_both_counts_and_no_difference_when_the_questions_differ():
    mq = report.eval_rows("sft", _mode_records(set(range(12)), 1, 2), 0.0, TYPES)
    sq = report.eval_rows("sft", _mode_records(set(), 2, 2)[:6], 6.0, TYPES)  # an evaluation cut short
    overall = next(line.split() for line in report.modes_table(mq, sq).splitlines() if line.split()[:1] == ["sft"])
    assert overall[1:5] == ["12/6", "1.000", "0.000", "-"]
    assert overall[-2:] == ["-", "1.00"]  # mq's wall time was not recorded
