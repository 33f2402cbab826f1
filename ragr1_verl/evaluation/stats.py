"""Confidence intervals for evaluation numbers: percentile bootstrap over questions.

An EM over 66 questions moves by several points when a handful of answers flip, so a single number cannot
say whether one model beats another. Every interval here resamples *questions* (the unit that varies between
benchmarks drawn from the same population), never trajectories or seeds:

- :func:`bootstrap_mean`: one run's EM (or any per-question score) with its interval;
- :func:`paired_difference`: run A minus run B on the same questions. Pairing removes the variation of how
  hard each question is, which both runs share, so the interval is much narrower than two separate EM
  intervals suggest (and the honest one to quote for "did RL help");
- :func:`pooled_paired_difference`: several seeds of run A against run B. Each question's difference is first
  averaged over the seeds, then questions are resampled. Treating seeds x questions as independent draws
  would pretend to have ``seeds`` times more questions and shrink the interval without cause.

``strata`` (e.g. each question's benchmark) makes the statistic the unweighted mean of the per-stratum means,
as the paper averages its benchmarks, and resamples within each stratum so every resample keeps each
benchmark's size. Everything is numpy only, vectorised, and deterministic for a given ``seed``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

CONFIDENCE = 0.95
RESAMPLES = 10_000
# Resampled values drawn at once by the index bootstrap (resamples x questions); bounds its memory to ~64 MB.
_CHUNK_VALUES = 8_000_000


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap confidence interval.

    ``mean`` is the statistic on the data itself (not the mean of the resamples); ``low``/``high`` are the
    percentile bounds at ``confidence``; ``n`` is the number of questions resampled.
    """

    mean: float
    low: float
    high: float
    n: int
    confidence: float = CONFIDENCE

    def scaled(self, factor: float) -> Interval:
        """The same interval in other units (e.g. ``100`` for percent)."""
        return Interval(self.mean * factor, self.low * factor, self.high * factor, self.n, self.confidence)

    def format(self, digits: int = 3, *, signed: bool = False) -> str:
        """``0.212 [0.121, 0.318]`` (``signed``: ``+0.091 [...]``, for differences)."""
        sign = "+" if signed else ""
        return f"{self.mean:{sign}.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"

    def as_dict(self) -> dict[str, float | int]:
        return {"mean": self.mean, "low": self.low, "high": self.high, "n": self.n, "confidence": self.confidence}


def bootstrap_mean(values: Sequence[float] | np.ndarray, *, strata: Sequence[Hashable] | None = None,
                   confidence: float = CONFIDENCE, resamples: int = RESAMPLES, seed: int = 0) -> Interval:
    """The mean of ``values`` (one per question) with its percentile-bootstrap interval over questions.

    With ``strata`` (one label per value), the statistic is the unweighted mean of the per-stratum means and
    each stratum is resampled on its own. All-equal values give the degenerate interval ``[v, v]``: the
    percentile bootstrap cannot see uncertainty the sample does not show (e.g. EM 0 on every question).
    """
    array = _as_values(values)
    _check(confidence, resamples)
    rng = np.random.default_rng(seed)
    if strata is None:
        point, resampled = float(array.mean()), _resampled_means(array, resamples, rng)
    else:
        groups = _stratify(array, strata)
        point = float(np.mean([group.mean() for group in groups]))
        resampled = np.mean([_resampled_means(group, resamples, rng) for group in groups], axis=0)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(resampled, [tail, 1.0 - tail])
    # the point estimate lies inside its own interval even where float rounding of the resamples says otherwise
    return Interval(point, float(min(low, point)), float(max(high, point)), int(array.size), confidence)


def paired_difference(after: Sequence[float] | np.ndarray, before: Sequence[float] | np.ndarray, *,
                      strata: Sequence[Hashable] | None = None, confidence: float = CONFIDENCE,
                      resamples: int = RESAMPLES, seed: int = 0) -> Interval:
    """``after - before`` on the same questions (aligned by position, e.g. by :func:`align_records`), with the
    interval of a paired bootstrap: a resample draws questions, and each keeps both of its scores."""
    after_array, before_array = _as_values(after), _as_values(before)
    if after_array.shape != before_array.shape:
        raise ValueError(f"paired values need one score per question in each run: {after_array.size} after, "
                         f"{before_array.size} before")
    return bootstrap_mean(after_array - before_array, strata=strata, confidence=confidence, resamples=resamples,
                          seed=seed)


def pooled_paired_difference(per_seed_after: Sequence[Mapping[Hashable, float]], before: Mapping[Hashable, float],
                             *, strata: Mapping[Hashable, Hashable] | None = None,
                             labels: Sequence[str] | None = None, confidence: float = CONFIDENCE,
                             resamples: int = RESAMPLES, seed: int = 0) -> Interval:
    """The difference of several seeds of one model against ``before``, pooled over the seeds.

    Each mapping is question -> score (e.g. :func:`scores_by_question`). Per question, the difference is
    averaged over the seeds; then questions are resampled. ``n`` is the number of questions, not
    questions x seeds: the seeds share their questions, so they are not independent draws. With one seed, or
    all seeds equal, this is :func:`paired_difference`. ``strata`` maps a question to its stratum; ``labels``
    names the seeds' runs, then ``before``'s, in the error raised when their questions differ.
    """
    if not per_seed_after:
        raise ValueError("pooled_paired_difference needs at least one seed")
    names = list(labels) if labels else [*(f"seed {i}" for i in range(1, len(per_seed_after) + 1)), "before"]
    if len(names) != len(per_seed_after) + 1:
        raise ValueError(f"labels name each seed's run, then the run before: {len(per_seed_after) + 1} expected")
    for name, after in zip(names, per_seed_after, strict=False):
        check_same_questions(after.keys(), before.keys(), (name, names[-1]))
    questions = list(before)
    differences = np.mean([[after[q] - before[q] for q in questions] for after in per_seed_after], axis=0)
    labels = None if strata is None else [strata[q] for q in questions]
    return bootstrap_mean(differences, strata=labels, confidence=confidence, resamples=resamples, seed=seed)


# -- records of ragr1-eval's results.jsonl -----------------------------------------------------------------

def question_keys(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """The key of each record, in the records' order: its question text.

    A text asked twice in one run (benchmarks do repeat questions) gets ``text #2``, ``text #3``, numbered in
    the order of the records' ``id`` (stable between runs of the same files, unlike the order of
    ``results.jsonl``, which is the order questions finished in).
    """
    order = sorted(range(len(records)), key=lambda i: str(records[i].get("id", "")))
    seen: dict[str, int] = defaultdict(int)
    keys = [""] * len(records)
    for index in order:
        text = str(records[index]["question"])
        seen[text] += 1
        keys[index] = text if seen[text] == 1 else f"{text} #{seen[text]}"
    return keys


def scores_by_question(records: Sequence[Mapping[str, Any]], field: str = "em") -> dict[str, float]:
    """Question key (:func:`question_keys`) -> ``field`` of its record."""
    return {key: float(record[field]) for key, record in zip(question_keys(records), records, strict=True)}


def align_records(first: Sequence[Mapping[str, Any]], second: Sequence[Mapping[str, Any]], *,
                  labels: tuple[str, str] = ("first run", "second run"),
                  ) -> list[tuple[Mapping[str, Any], Mapping[str, Any]]]:
    """The two runs' records paired by question text (in ``first``'s order), for paired statistics.

    Raises ``ValueError`` naming the questions only one run holds: a paired difference over different
    question sets would compare the questions, not the models.
    """
    first_keys, second_keys = question_keys(first), question_keys(second)
    check_same_questions(first_keys, second_keys, labels)
    by_key = dict(zip(second_keys, second, strict=True))
    return [(record, by_key[key]) for key, record in zip(first_keys, first, strict=True)]


def check_same_questions(first: Iterable[Hashable], second: Iterable[Hashable],
                         labels: tuple[str, str] = ("first run", "second run")) -> None:
    """Raise ``ValueError`` naming the questions (keys) only one of the two runs holds."""
    first_set, second_set = set(first), set(second)
    if first_set == second_set:
        return
    parts = []
    for label, missing in ((labels[0], first_set - second_set), (labels[1], second_set - first_set)):
        if missing:
            names = sorted(map(str, missing))
            shown = ", ".join(repr(name) for name in names[:5]) + (f", ... ({len(names) - 5} more)"
                                                                  if len(names) > 5 else "")
            parts.append(f"{len(names)} only in {label}: {shown}")
    raise ValueError(f"the runs hold different questions ({'; '.join(parts)}); evaluate both on the same "
                     "questions for a paired difference")


# -- internals ---------------------------------------------------------------------------------------------

def _as_values(values: Sequence[float] | np.ndarray) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"expected a non-empty sequence of per-question scores, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError("per-question scores must be finite numbers")
    return array


def _check(confidence: float, resamples: int) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if resamples < 1:
        raise ValueError(f"resamples must be positive, got {resamples}")


def _stratify(values: np.ndarray, strata: Sequence[Hashable]) -> list[np.ndarray]:
    labels = list(strata)
    if len(labels) != values.size:
        raise ValueError(f"strata need one label per value: {len(labels)} labels, {values.size} values")
    groups: dict[Hashable, list[int]] = {}
    for index, label in enumerate(labels):
        groups.setdefault(label, []).append(index)
    return [values[indices] for indices in groups.values()]


def _resampled_means(values: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """The means of ``resamples`` bootstrap resamples (``values.size`` draws with replacement each).

    A resample's mean only depends on how often it draws each distinct value, so for scores with few distinct
    values (EM: 0 and 1; differences: -1, 0, 1) one multinomial draw per resample over those values gives the
    same distribution as drawing indices, in time independent of the number of questions. Continuous scores
    draw indices, in chunks that bound memory.
    """
    n = values.size
    distinct, counts = np.unique(values, return_counts=True)
    if distinct.size == 1:
        return np.full(resamples, distinct[0])
    if distinct.size * 4 <= n:
        draws = rng.multinomial(n, counts / n, size=resamples)
        return draws @ distinct / n
    means = np.empty(resamples)
    chunk = max(1, _CHUNK_VALUES // n)
    for start in range(0, resamples, chunk):
        stop = min(resamples, start + chunk)
        means[start:stop] = values[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    return means
