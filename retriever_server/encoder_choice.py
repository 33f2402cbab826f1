"""``--encoder-backend auto``: the fastest encoder backend that keeps the fp32 reference's top-k on this index.

At load, probe queries made from the corpus itself (the opening words of passages spread over it) are
encoded by the reference (``torch``, fp32) and by every other backend this installation can run, and
searched in the index. A backend qualifies when at least ``min_agreement`` of the probes get the same set of
top-``k`` passages as with the reference; among those that qualify, the one that encodes a batch fastest is
chosen (the reference always qualifies). Each trial is logged and reported in ``/health``, so a choice is
never a guess: a backend that loses agreement on this index is not chosen, whatever its speed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from retriever_server.encoder_backends import REFERENCE_BACKEND, auto_candidates

logger = logging.getLogger(__name__)

MIN_SET_AGREEMENT = 0.99  # share of probe queries whose top-k set must match the reference's
PROBE_QUERIES = 256
PROBE_WORDS = 12  # a probe is the opening words of a passage: about a question's length
AGREEMENT_K = 3
TIMING_BATCH = 64
TIMING_ROUNDS = 2  # batches timed: a slow backend (bf16 without bf16 units) must not hold the start up
TIMING_SINGLES = 16


@dataclass(frozen=True)
class Trial:
    """One backend measured against the reference on the probe queries."""

    backend: str
    set_agreement: float | None = None  # share of probes with the reference's top-k set
    ordered_agreement: float | None = None  # share with the reference's top-k in the same order
    batched_qps: float | None = None  # queries/s encoding batches of TIMING_BATCH
    single_ms: float | None = None  # median milliseconds to encode one query alone
    error: str | None = None  # why it could not run

    def qualifies(self, min_agreement: float) -> bool:
        return self.error is None and self.set_agreement is not None and self.set_agreement >= min_agreement

    def as_dict(self) -> dict:
        return {key: round(value, 4) if isinstance(value, float) else value for key, value in asdict(self).items()}


def spread_positions(corpus_size: int, count: int = PROBE_QUERIES) -> list[int]:
    """``count`` passage positions spread evenly over a corpus."""
    return np.unique(np.linspace(0, corpus_size - 1, num=min(count, corpus_size)).astype(int)).tolist()


def probe_queries(passages: Sequence[str]) -> list[str]:
    """A query-length probe from each passage: its opening words."""
    queries = [" ".join(text.split()[:PROBE_WORDS]) for text in passages]
    return [query for query in queries if query]


def agreement(reference: np.ndarray, other: np.ndarray) -> tuple[float, float]:
    """Shares of rows with the same set, and the same order, of positions (``[n, k]`` arrays)."""
    same_set = [set(a.tolist()) == set(b.tolist()) for a, b in zip(reference, other)]
    same_order = [np.array_equal(a, b) for a, b in zip(reference, other)]
    return float(np.mean(same_set)), float(np.mean(same_order))


def time_encoder(encode: Callable[[list[str]], object], queries: Sequence[str], *, batch: int = TIMING_BATCH,
                 rounds: int = TIMING_ROUNDS, singles: int = TIMING_SINGLES) -> tuple[float, float]:
    """Queries/s of ``encode`` on up to ``rounds`` batches of ``batch`` queries (after one warm-up batch) and
    the median milliseconds of one query alone (``singles`` of them)."""
    first = list(queries[:batch])
    encode(first)
    started = time.perf_counter()
    rounds = max(1, min(rounds, len(queries) // len(first)))
    for number in range(rounds):
        encode(list(queries[number * len(first):(number + 1) * len(first)]) or first)
    batched_qps = rounds * len(first) / (time.perf_counter() - started)
    alone = []
    for query in queries[:singles]:
        started = time.perf_counter()
        encode([query])
        alone.append(time.perf_counter() - started)
    return batched_qps, float(np.median(alone) * 1000)


def run_trials(make_encoder: Callable[[str], object], search: Callable[[np.ndarray, int], np.ndarray],
               queries: Sequence[str], backends: Sequence[str] | None = None, k: int = AGREEMENT_K,
               reference: object | None = None, min_agreement: float | None = MIN_SET_AGREEMENT,
               ) -> tuple[list[Trial], dict[str, object]]:
    """Every backend (default: :func:`auto_candidates`) against the reference; returns the trials and the
    encoders that loaded, by backend. ``search(vectors, k)`` gives the ``[n, k]`` positions. A backend below
    ``min_agreement`` is not timed (it cannot be chosen); None times every backend."""
    backends = list(backends or auto_candidates())
    if REFERENCE_BACKEND not in backends:
        backends.insert(0, REFERENCE_BACKEND)
    reference = reference or make_encoder(REFERENCE_BACKEND)
    expected = search(reference.encode_queries(list(queries)), k)
    trials, encoders = [], {}
    for backend in backends:
        try:
            encoder = reference if backend == REFERENCE_BACKEND else make_encoder(backend)
            found = search(encoder.encode_queries(list(queries)), k)
            same_set, same_order = agreement(expected, found)
            timed = min_agreement is None or same_set >= min_agreement
            qps, single_ms = time_encoder(encoder.encode_queries, queries) if timed else (None, None)
        except Exception as err:  # noqa: BLE001 - a backend that cannot run is reported, not fatal
            logger.warning("encoder backend %s could not be measured: %s", backend, err)
            trials.append(Trial(backend, error=f"{type(err).__name__}: {err}"))
            continue
        if timed:
            encoders[backend] = encoder
        trials.append(Trial(backend, same_set, same_order, qps, single_ms))
    return trials, encoders


def choose(trials: Sequence[Trial], min_agreement: float = MIN_SET_AGREEMENT) -> Trial:
    """The fastest trial (batched queries/s) among those that keep the agreement."""
    qualified = [trial for trial in trials if trial.qualifies(min_agreement)]
    if not qualified:
        raise ValueError("no encoder backend kept the reference's results, not even the reference")
    return max(qualified, key=lambda trial: trial.batched_qps or 0.0)


def describe(trials: Sequence[Trial], chosen: Trial, min_agreement: float) -> str:
    lines = [f"encoder backend auto: chose {chosen.backend} (fastest with >= {min_agreement:.0%} of "
             f"{AGREEMENT_K}-passage sets as the fp32 reference's)"]
    for trial in trials:
        if trial.error:
            lines.append(f"  {trial.backend:<11} could not run: {trial.error}")
        else:
            speed = ("not timed (too far from the reference)" if trial.batched_qps is None else
                     f"{trial.batched_qps:.0f} queries/s batched, {trial.single_ms:.1f} ms for one")
            lines.append(f"  {trial.backend:<11} same top-{AGREEMENT_K} set {trial.set_agreement:.1%}, same order "
                         f"{trial.ordered_agreement:.1%}, {speed}")
    return "\n".join(lines)
