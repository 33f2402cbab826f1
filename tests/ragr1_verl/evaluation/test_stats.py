"""Bootstrap intervals over questions: known cases, determinism, pairing, pooling over seeds, alignment."""

from __future__ import annotations

import time

import numpy as np
import pytest

from ragr1_verl.evaluation import stats


def test_all_equal_values_give_a_point_interval():
    assert stats.bootstrap_mean([1.0] * 66) == stats.Interval(1.0, 1.0, 1.0, 66)
    assert stats.bootstrap_mean([0.0] * 22) == stats.Interval(0.0, 0.0, 0.0, 22)


def test_all_equal_pairs_give_a_difference_of_exactly_zero():
    scores = [1.0, 0.0] * 33
    assert stats.paired_difference(scores, scores) == stats.Interval(0.0, 0.0, 0.0, 66)


def test_every_pair_different_in_the_same_direction_gives_exactly_one():
    assert stats.paired_difference([1.0] * 66, [0.0] * 66) == stats.Interval(1.0, 1.0, 1.0, 66)
    assert stats.paired_difference([0.0] * 66, [1.0] * 66) == stats.Interval(-1.0, -1.0, -1.0, 66)


def test_half_and_half_is_uncertain_around_one_half():
    interval = stats.bootstrap_mean([1.0, 0.0] * 33)
    assert interval.mean == 0.5 and 0.0 < interval.low < 0.5 < interval.high < 1.0
    # the normal approximation: 0.5 +- 1.96 * sqrt(0.25 / 66) = 0.5 +- 0.121
    assert interval.low == pytest.approx(0.379, abs=0.03) and interval.high == pytest.approx(0.621, abs=0.03)
    paired = stats.paired_difference([1.0] * 66, [1.0, 0.0] * 33)  # half the questions gained, half kept
    assert paired.mean == 0.5 and 0.0 < paired.low < 0.5 < paired.high < 1.0


def test_pairing_sees_what_two_separate_intervals_cannot():
    # 10 of 66 questions flip from wrong to right, none the other way: separately the EMs overlap, paired
    # the gain is clearly above zero
    before = [1.0] * 20 + [0.0] * 46
    after = [1.0] * 30 + [0.0] * 36
    a, b = stats.bootstrap_mean(after), stats.bootstrap_mean(before)
    assert a.low < b.high
    assert stats.paired_difference(after, before).low > 0


def test_the_seed_makes_it_deterministic():
    scores = np.random.default_rng(7).random(66)  # continuous: the index bootstrap
    assert stats.bootstrap_mean(scores, seed=3) == stats.bootstrap_mean(scores, seed=3)
    assert stats.bootstrap_mean(scores, seed=3) != stats.bootstrap_mean(scores, seed=4)
    binary = [1.0] * 20 + [0.0] * 46  # few distinct values: the multinomial bootstrap
    assert stats.bootstrap_mean(binary, seed=1) == stats.bootstrap_mean(binary, seed=1)
    # (its bounds are multiples of 1/66, so another seed moves them rarely: few resamples show it)
    assert stats.bootstrap_mean(binary, seed=1, resamples=5) != stats.bootstrap_mean(binary, seed=2, resamples=5)


def test_both_resampling_paths_agree():
    # the multinomial over distinct values has the same distribution as drawing indices
    rng = np.random.default_rng(0)
    binary = (rng.random(400) < 0.3).astype(float)
    counts = stats._resampled_means(binary, 20_000, np.random.default_rng(1))
    indices = binary[np.random.default_rng(2).integers(0, 400, size=(20_000, 400))].mean(axis=1)
    assert np.quantile(counts, [0.025, 0.975]) == pytest.approx(np.quantile(indices, [0.025, 0.975]), abs=0.006)


def test_ten_thousand_resamples_of_66_questions_are_fast():
    scores = np.random.default_rng(0).random(66)
    started = time.perf_counter()
    stats.bootstrap_mean(scores)
    stats.paired_difference([1.0, 0.0, 1.0] * 22, [0.0, 0.0, 1.0] * 22)
    assert time.perf_counter() - started < 1.0


def test_strata_average_the_stratum_means_and_keep_their_sizes():
    values = [1.0] * 10 + [0.0] * 90  # stratum a: EM 1 on 10 questions; stratum b: EM 0 on 90
    strata = ["a"] * 10 + ["b"] * 90
    interval = stats.bootstrap_mean(values, strata=strata)
    assert interval == stats.Interval(0.5, 0.5, 0.5, 100)  # each stratum resampled on its own: no variation
    assert stats.bootstrap_mean(values).mean == pytest.approx(0.1)


def test_pooled_over_identical_seeds_is_the_single_seed_result():
    rng = np.random.default_rng(5)
    questions = [f"q{i}" for i in range(66)]
    before = {q: float(v) for q, v in zip(questions, rng.random(66) < 0.3, strict=True)}
    after = {q: float(v) for q, v in zip(questions, rng.random(66) < 0.4, strict=True)}
    single = stats.paired_difference([after[q] for q in questions], [before[q] for q in questions])
    assert stats.pooled_paired_difference([after, after, after], before) == single
    assert stats.pooled_paired_difference([after], before) == single


def test_pooling_averages_each_question_over_the_seeds_and_counts_questions_not_runs():
    before = {"a": 0.0, "b": 0.0, "c": 1.0, "d": 1.0}
    seeds = [{"a": 1.0, "b": 0.0, "c": 1.0, "d": 0.0}, {"a": 1.0, "b": 1.0, "c": 1.0, "d": 1.0}]
    pooled = stats.pooled_paired_difference(seeds, before)
    # per question: a +1, b +0.5, c 0, d -0.5
    expected = stats.bootstrap_mean([1.0, 0.5, 0.0, -0.5])
    assert pooled == expected and pooled.n == 4 and pooled.mean == pytest.approx(0.25)


def test_runs_on_different_questions_are_refused_by_name():
    with pytest.raises(ValueError, match=r"1 only in seed 2: 'e'.*1 only in before: 'd'"):
        stats.pooled_paired_difference([{"a": 1.0, "d": 0.0}, {"a": 1.0, "e": 0.0}], {"a": 0.0, "d": 1.0})
    first = [_record("Who?", 1.0), _record("When?", 0.0)]
    second = [_record("Who?", 0.0), _record("Where?", 1.0)]
    with pytest.raises(ValueError, match=r"1 only in rl: 'When\?'; 1 only in sft: 'Where\?'"):
        stats.align_records(first, second, labels=("rl", "sft"))
    with pytest.raises(ValueError, match="one score per question"):
        stats.paired_difference([1.0, 0.0], [1.0])


def test_records_are_aligned_by_question_text_and_repeated_texts_by_id():
    first = [_record("Who?", 1.0, "nq/2"), _record("When?", 0.0, "nq/0"), _record("Who?", 0.0, "nq/1")]
    second = [_record("When?", 1.0, "nq/0"), _record("Who?", 1.0, "nq/1"), _record("Who?", 0.0, "nq/2")]
    pairs = stats.align_records(first, second)
    assert [(a["id"], b["id"]) for a, b in pairs] == [("nq/2", "nq/2"), ("nq/0", "nq/0"), ("nq/1", "nq/1")]
    assert stats.scores_by_question(first) == {"Who?": 0.0, "When?": 0.0, "Who? #2": 1.0}


def test_intervals_format_and_scale():
    interval = stats.Interval(0.212, 0.121, 0.318, 66)
    assert interval.format() == "0.212 [0.121, 0.318]"
    assert interval.scaled(100).format(1, signed=True) == "+21.2 [12.1, 31.8]"
    assert interval.as_dict()["n"] == 66


def _record(question: str, em: float, id_: str = "") -> dict:
    return {"id": id_ or question, "question": question, "em": em, "f1": em, "searches": 1, "queries": 1,
            "format_ok": True, "data_source": "nq"}
