"""One shard replica killed while clients search, for the sharded-server tests.

Ray Serve may answer the searches that meet the dead replica in either of two ways, both correct: 503s naming
the shard until the replacement answers, or (when the replacement starts within the shard timeout, or the
router retries a request the dead replica never took) complete 200s a little later. What must never happen:
another status, a partial top-k, a wait past the shard timeout, or a shard that does not come back.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Outcome:
    question: str
    status: int
    body: dict
    seconds: float


def search_through_a_kill(kill: Callable[[], None], replaced: Callable[[], bool],
                          query: Callable[[str], tuple[int, dict, float]], questions: list[str],
                          timeout_s: float = 120.0) -> list[Outcome]:
    """Kill the replica, then search ``questions`` 8 at a time until a replacement runs (``replaced()``) and
    a whole batch sent after that is answered 200; every answer meanwhile, in order."""
    outcomes: list[Outcome] = []
    deadline = time.monotonic() + timeout_s
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        kill()
        while True:
            is_replaced = replaced()
            batch = [Outcome(q, *answer) for q, answer in zip(questions, pool.map(query, questions))]
            outcomes += batch
            if is_replaced and all(outcome.status == 200 for outcome in batch):
                return outcomes
            assert time.monotonic() < deadline, (
                f"shard not back within {timeout_s:g} s: replaced={is_replaced}, "
                f"last statuses {[outcome.status for outcome in batch]}")
            time.sleep(0.2)


def assert_served_through_the_kill(outcomes: list[Outcome], shard: int, max_seconds: float,
                                   complete: Callable[[str, dict], None]) -> None:
    """Every answer is a 503 naming ``shard`` or a complete 200 (checked by ``complete``), within
    ``max_seconds``."""
    statuses = {outcome.status for outcome in outcomes}
    assert statuses <= {200, 503}, statuses
    for outcome in outcomes:
        assert outcome.seconds < max_seconds, outcome
        if outcome.status == 503:
            assert f"index shard {shard}" in outcome.body["error"], outcome.body
        else:  # never a partial top-k
            complete(outcome.question, outcome.body)
