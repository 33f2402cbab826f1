"""The paper's stage-2 RL data selection (RAG-R1, section 3.2.1).

1. Every question gets one teacher trajectory (attempt 0, the SFT generation).
2. A question the teacher missed is re-sampled at temperature 1.2 (with 10 retrieval rounds) up to 10 times,
   stopping at the first exact match: the attempts are sequential, so a re-sample that hits saves the rest.
3. The selected questions are the missed ones with a hit among the re-samples ("challenging yet
   answerable"), plus a random 25% of those right at attempt 0. Without the answerability filter (the
   paper's "w/o Filter" ablation) every missed question is kept and none is re-sampled.
4. They are split into train and validation (the paper: 95/5) by ``questions.hold_out``.

The draws are seeded: the same log and seed give the same files.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from ragr1_verl.data.questions import Question


@dataclass(frozen=True)
class SelectionSettings:
    """The knobs of the selection; defaults are the paper's."""

    resample_limit: int = 10
    resample_temperature: float = 1.2
    resample_max_turns: int = 10
    easy_fraction: float = 0.25
    answerability_filter: bool = True
    val_fraction: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        if self.resample_limit < 0 or self.resample_max_turns < 0:
            raise ValueError("the re-sample limit and max turns must not be negative")
        if not 0.0 <= self.easy_fraction <= 1.0 or not 0.0 <= self.val_fraction < 1.0:
            raise ValueError("the easy fraction must be in [0, 1] and the validation fraction in [0, 1)")


@dataclass
class QuestionState:
    """The exact-match result of each logged attempt of one question."""

    results: dict[int, int] = field(default_factory=dict)

    def add(self, attempt: int, em: int) -> None:
        self.results.setdefault(attempt, em)

    @property
    def first(self) -> int | None:
        """The exact match of attempt 0, None before it ran."""
        return self.results.get(0)

    @property
    def resamples(self) -> int:
        return sum(1 for attempt in self.results if attempt > 0)

    @property
    def resample_hit(self) -> bool:
        return any(em for attempt, em in self.results.items() if attempt > 0)


def next_attempt(state: QuestionState, selection: SelectionSettings | None) -> int | None:
    """The attempt to run next for a question, or None when it needs no more."""
    if state.first is None:
        return 0
    if selection is None or not selection.answerability_filter or state.first == 1 or state.resample_hit:
        return None
    if state.resamples >= selection.resample_limit:
        return None
    return max(state.results) + 1


@dataclass(frozen=True)
class Selection:
    """The questions by outcome, each list in input order; ``selected`` (answerable and kept easy ones) is
    what stage 2 trains on."""

    easy: list[Question]
    easy_kept: list[Question]
    answerable: list[Question]
    unanswerable: list[Question]
    selected: list[Question]

    def counts(self) -> dict[str, int]:
        return {"easy": len(self.easy), "easy_kept": len(self.easy_kept), "answerable": len(self.answerable),
                "unanswerable": len(self.unanswerable), "selected": len(self.selected)}


def select(questions: Sequence[Question], states: dict[str, QuestionState], settings: SelectionSettings) -> Selection:
    """Sort the questions by outcome and draw the easy ones to keep (``round(easy_fraction * easy)`` of them,
    with ``random.Random(seed)``)."""
    missing = [question.id for question in questions if states[question.id].first is None]
    if missing:
        raise ValueError(f"{len(missing)} questions have no first attempt yet (e.g. {missing[0]!r})")
    easy = [question for question in questions if states[question.id].first == 1]
    missed = [question for question in questions if states[question.id].first == 0]
    if settings.answerability_filter:
        answerable = [question for question in missed if states[question.id].resample_hit]
    else:
        answerable = missed
    rng = random.Random(settings.seed)
    chosen = set(rng.sample(range(len(easy)), round(settings.easy_fraction * len(easy))))
    easy_kept = [question for number, question in enumerate(easy) if number in chosen]
    selected_ids = {question.id for question in answerable} | {question.id for question in easy_kept}
    unanswerable = [question for question in missed if question.id not in selected_ids]
    selected = [question for question in questions if question.id in selected_ids]
    return Selection(easy, easy_kept, answerable, unanswerable, selected)
