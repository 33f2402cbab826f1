"""One teacher trajectory under the RAG-R1 protocol, on text, with the real retriever.

It follows :class:`ragr1_verl.agent_loop.RagR1AgentLoop` round for round (both decide each round with
``round_outcome`` and render observations with ``ObservationRenderer``), so the SFT data
shows the student the rollout it will run in RL: each round the teacher writes up to a stop string; an answer
ends the trajectory; a round the teacher ended on its own without an action ends it too; otherwise a search is
answered with ``<information>`` (or a reminder after an invalid action) and the next round continues the same
assistant message. After ``max_turns`` such rounds one last round runs (unless ``final_round`` is off), in
which a search ends the trajectory unanswered.

Unlike the rollout, a failed retrieval is not shown to the model: a trajectory built on a failure message is
no SFT sample, so :class:`RetrievalFailed` stops the run and the question is retried when the run resumes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from ragr1_verl.config import RagR1Config
from ragr1_verl.openai_client import Completion, Messages, Sampling, Teacher, TeacherRejected
from ragr1_verl.protocol.actions import (
    STOP_STRINGS,
    Action,
    extract_answer,
    parse_action,
    round_outcome,
    rounds_allowed,
    split_queries,
    stop_string_prefix,
)
from ragr1_verl.protocol.observation import (
    INVALID_ACTION_REMINDER,
    Codec,
    invalid_search,
)
from ragr1_verl.retrieval_client import RetrievalClient

logger = logging.getLogger(__name__)

# answer: an <answer>; stopped: the teacher ended a round without an action; budget: the last round was not
# an answer; rejected: the server refused to continue (the context outgrew the teacher's window).
Finish = Literal["answer", "stopped", "budget", "rejected"]


class RetrievalFailed(RuntimeError):
    """The retriever failed a search after its own retries."""


@dataclass(frozen=True)
class EpisodeSettings:
    """The rollout's ``ragr1`` settings (mode, query rules, topk, ``max_turns``), the round's sampling and the
    policy's tokenizer, which the per-query budget of retrieved text counts in (no cut without one)."""

    config: RagR1Config
    sampling: Sampling
    codec: Codec | None = None


@dataclass(frozen=True)
class Episode:
    """A finished trajectory: the assistant text with observations, its final answer and counters."""

    trajectory: str
    answer: str | None
    searches: int
    invalid_actions: int
    turns: int
    finish: Finish


@dataclass(frozen=True)
class _Observation:
    text: str
    searched: bool = False
    invalid: bool = False


@dataclass
class _Tally:
    searches: int = 0
    invalid_actions: int = 0

    def add(self, observation: _Observation) -> None:
        self.searches += observation.searched
        self.invalid_actions += observation.invalid


async def run_episode(messages: Messages, settings: EpisodeSettings, teacher: Teacher,
                      retriever: RetrievalClient) -> Episode:
    """Run the teacher on one prompt until it answers, stops, or the rounds run out."""
    text, tally, max_turns = "", _Tally(), settings.config.max_turns
    rounds = rounds_allowed(max_turns, settings.config.final_round)
    for round_number in range(rounds):
        try:
            completion = await teacher.complete(messages, text, settings.sampling)
        except TeacherRejected as err:
            if not text:
                raise  # the bare prompt refused: every question would be, so it is the setup that is wrong
            logger.warning("the teacher refused to continue a trajectory after %d rounds: %s", round_number, err)
            return _episode(text, tally, round_number, "rejected")
        turn = _trimmed(completion.text)
        text += turn
        action = parse_action(turn)
        ended = action.kind == "invalid" and _ended_on_its_own(completion, turn)
        outcome = round_outcome(action, ended, can_search=round_number < max_turns)
        if outcome == "budget":
            break
        if outcome != "continue":
            return _episode(text, tally, round_number + 1, outcome)
        observation = await _observe(action, settings, retriever)
        text += observation.text
        tally.add(observation)
    return _episode(text, tally, rounds, "budget")


def _episode(text: str, tally: _Tally, turns: int, finish: Finish) -> Episode:
    return Episode(text, extract_answer(text), tally.searches, tally.invalid_actions, turns, finish)


def _trimmed(text: str) -> str:
    """The round's text up to its first stop string, for a server that generated past it (characters as
    tokens: the same rule as the rollout's token-level trim)."""
    return text[:stop_string_prefix(list(text), "".join, text=text)]


def _ended_on_its_own(completion: Completion, turn: str) -> bool:
    """EOS or a stop token, not the token cap nor a stop string (the rollout's ``_ended_turn``)."""
    return completion.finish_reason != "length" and not turn.rstrip().endswith(STOP_STRINGS)


async def _observe(action: Action, settings: EpisodeSettings,
                   retriever: RetrievalClient) -> _Observation:
    """The text appended after a non-final round: search results, or a reminder of the format."""
    if action.kind != "search":
        return _Observation(INVALID_ACTION_REMINDER, invalid=True)
    config = settings.config
    queries = split_queries(action.content, config.query_rules)
    if queries.error is not None:
        return _Observation(invalid_search(queries.error), invalid=True)
    result = await retriever.search(queries.queries, config.topk)
    if not result.ok:
        raise RetrievalFailed(f"the retriever at {', '.join(config.retriever.urls)} failed a search "
                              f"({result.error})")
    return _Observation(observation_text(settings, queries.queries, result.documents), searched=True)


def observation_text(settings: EpisodeSettings, queries: Sequence[str], documents: Sequence[Sequence[dict]]) -> str:
    """One search's ``<information>`` block, as the rollout renders it for the policy's tokenizer."""
    return settings.config.observation_renderer(settings.codec).render(queries, documents)
