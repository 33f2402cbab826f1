"""A teacher that needs no LLM: it plays the demo questions' hop metadata through the real retriever.

The paper's teacher is Qwen2.5-72B behind an API. Offline there is none, so for the bundled demo corpus this
stand-in writes each round from the conversation so far and the question's metadata: every demo question
lists its hops (``steps``: a query, the id of the passage holding the fact and the ``evidence`` sentence, an
exact substring of that passage). It is a :class:`~.runner.TeacherLike`, so the episode logic, round budget,
stop strings, observation rendering, EM filter, attempt log and resume of ``sft-generate`` are the ones the
model teacher goes through.

Each round it reads what was actually retrieved (the ``<information>`` blocks of the text so far) and:

- **plans** the searches: mq mode asks for everything it can in one ``<search>`` (both compared entities'
  queries; for a bridge question, step 1's query, and the question itself with ``BRIDGE_ASKS_THE_QUESTION``),
  then step 2's query, naming the bridge entity, only when its evidence is still missing. sq mode asks one query per search. A single hop is one search, one query.
- **reasons** in a short ``<think>`` that quotes the evidence sentence found in the retrieved text;
- **re-asks** once with a reformulated query when a hop's evidence was not retrieved, within the budget;
- **answers** only from retrieved text: a gold answer found in the retrieved text (as written there), once
  every hop's evidence has been retrieved; otherwise it ends the trajectory without an answer (a turn with no
  action), so the EM filter drops it. Nothing it writes is invented.

The think texts come from a few templates, chosen by a hash of the question id, so that the student does not
learn one fixed sentence. A turn longer than the round's token cap (counted with the policy tokenizer, when
one is given) is shortened, else the trajectory ends without an answer.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ragr1_verl.config import RagR1Config
from ragr1_verl.data.questions import Question
from ragr1_verl.openai_client import Completion, Messages, Sampling
from ragr1_verl.protocol.actions import (
    ANSWER_CLOSE,
    ANSWER_OPEN,
    SEARCH_CLOSE,
    SEARCH_OPEN,
    STOP_STRINGS,
    block_contents,
    split_queries,
)
from ragr1_verl.records import DataError

Kind = Literal["single-hop", "comparison", "bridge"]

TEACHER_NAME = "scripted"
# Whether a bridge question also asks the question itself up front in mq mode (beside step 1's query). Off: on
# the demo data it saves few second searches but adds a passage to every bridge trajectory, and 45 of 166 mq
# trajectories then outgrow 640 tokens (1 of 166 without it; the CPU recipe allows 768).
BRIDGE_ASKS_THE_QUESTION = False
# When a turn would pass the round's token cap, its quotes are cut to these many words, in turn.
QUOTE_WORDS = (24, 14)

_OBSERVATION = re.compile(r"\n<information>\n(.*?)\n</information>\n", re.DOTALL)

# -- think templates (one list per situation; a question always picks the same entry of each list) ------------

_PLAN = {
    "single-hop": ("I need to look this up.", "Let me search for this fact.", "I should check the documents first."),
    "comparison-mq": ("I need facts on both, so I search for each at once.",
                      "Two things to compare: I look up both together.",
                      "Let me search for both sides of the comparison in one go."),
    "comparison-sq": ("I need facts on both; I start with the first.",
                      "I will look them up one at a time, first one side.",
                      "Two things to compare; I start with one of them."),
    "bridge": ("This takes two steps; first I need the link.", "First I must find the intermediate fact.",
               "I need the first hop before the answer."),
}
_QUOTE = ('The result says: "{e}"', 'Retrieved: "{e}"', 'The passage states: "{e}"')
_NEXT = {
    "bridge": ("So the link is {b}; now I look that up.", "That points to {b}; next I search for it.",
               "The next hop is {b}."),
    "bridge-unnamed": ("Now the second hop.", "Next I search for the second step.", "One more hop to go."),
    "other": ("Now the other one.", "Next I check the second.", "That settles one side; now the other."),
}
_RETRY = ("The results do not state it; I try another query.", "Nothing on this yet; let me rephrase.",
          "That did not give the fact; I search again differently.")
_ANSWER = ("So the answer is {a}.", "That gives {a}.", "Hence {a}.")
_GIVE_UP = ("The results do not contain what I need, so I cannot answer reliably.",
            "I could not find the fact in the documents.",
            "The retrieved text does not give the answer.")


@dataclass(frozen=True)
class Hop:
    """One step of a question: the query that finds it and the evidence sentence of passage ``evidence_id``."""

    query: str
    evidence_id: str
    evidence: str


@dataclass(frozen=True)
class HopPlan:
    """A question with the metadata the scripted teacher plays."""

    id: str
    question: str
    answers: tuple[str, ...]
    kind: Kind
    steps: tuple[Hop, ...]


def hop_plan(question: Question) -> HopPlan:
    """The question's hop metadata (``steps``, ``hops``); :class:`DataError` when it has none."""
    metadata = _metadata(question)
    steps = metadata.get("steps")
    if not isinstance(steps, Sequence) or isinstance(steps, str) or not steps:
        raise DataError(f"question {question.id!r}: the scripted teacher needs hop metadata ('steps': a list of "
                        "{query, evidence_id, evidence}), which only the demo questions carry")
    hops = []
    for number, step in enumerate(steps, start=1):
        if not isinstance(step, Mapping) or not all(isinstance(step.get(key), str) and step.get(key).strip()
                                                    for key in ("query", "evidence_id", "evidence")):
            raise DataError(f"question {question.id!r}, step {number}: expected {{query, evidence_id, evidence}} "
                            f"strings, got {step!r:.120}")
        hops.append(Hop(step["query"].strip(), step["evidence_id"].strip(), step["evidence"].strip()))
    kind = "single-hop" if len(hops) == 1 else metadata.get("hops")
    if kind not in ("comparison", "bridge") and len(hops) > 1:
        raise DataError(f"question {question.id!r}: {len(hops)} steps need 'hops': 'comparison' or 'bridge', "
                        f"got {kind!r}")
    return HopPlan(question.id, question.question, tuple(question.answers), kind, tuple(hops))


def _metadata(question: Question) -> Mapping[str, Any]:
    """The hop fields of a question: its own attributes, else the demo file's row of the same id."""
    for name in ("metadata", "extra", "extras", "extra_fields"):
        value = getattr(question, name, None)
        if isinstance(value, Mapping) and "steps" in value:
            return value
    if getattr(question, "steps", None):
        return {"steps": question.steps, "hops": getattr(question, "hops", None)}
    return _demo_rows().get(question.id, {})


_DEMO_ROWS: dict[str, dict[str, Any]] | None = None


def _demo_rows() -> dict[str, dict[str, Any]]:
    global _DEMO_ROWS
    if _DEMO_ROWS is None:
        from importlib import resources

        text = resources.files("retriever_server").joinpath("demo", "questions.jsonl").read_text(encoding="utf-8")
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        _DEMO_ROWS = {str(row.get("id")): row for row in rows}
    return _DEMO_ROWS


# -- reading the conversation ------------------------------------------------------------------------------------

def _squash(text: str) -> str:
    return " ".join(text.split())


@dataclass(frozen=True)
class _State:
    """What the trajectory so far holds: the rounds played, the queries asked, the text retrieved."""

    rounds: int
    asked: tuple[str, ...]
    retrieved: str  # every retrieved document text, whitespace squashed
    latest: str  # the last observation's documents, whitespace squashed


def observation_documents(body: str, config: RagR1Config) -> list[str]:
    """The document texts of one ``<information>`` body (the JSON object's strings in RAG-R1's mq format)."""
    if config.observation_format == "ragr1" and config.mode == "mq":
        try:
            value = json.loads(body)
        except ValueError:  # a failure or budget message, not results
            return [body]
        documents = value.get("documents") if isinstance(value, dict) else None
        if isinstance(documents, list):
            return [str(document) for document in documents]
    return [body]


def searched_queries(trajectory: str, config: RagR1Config) -> list[tuple[str, ...]]:
    """The queries of each search the model wrote in a trajectory (observations left out)."""
    model_text = _OBSERVATION.sub(" ", trajectory)
    return [split_queries(content, config.query_rules).queries for content in
            block_contents(model_text, SEARCH_OPEN, SEARCH_CLOSE)]


def _state(partial: str, config: RagR1Config) -> _State:
    bodies = _OBSERVATION.findall(partial)
    asked = [query for queries in searched_queries(partial, config) for query in queries]
    documents = [_squash("\n".join(observation_documents(body, config))) for body in bodies]
    return _State(len(bodies), tuple(asked), " \n ".join(documents), documents[-1] if documents else "")


def token_counter(tokenizer: Any) -> Callable[[str], int]:
    """A turn's length in the policy tokenizer's tokens, encoded on its own as the rollout's turns are."""
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False))


# -- the teacher -------------------------------------------------------------------------------------------------

class ScriptedTeacher:
    """The demo corpus's stand-in teacher: each round is computed from the conversation and the question's hops.

    Args:
        questions: the questions it may be asked (each must carry hop metadata, see :func:`hop_plan`).
        config: the run's ``ragr1`` settings (mode, query rules, observation format, ``max_turns``).
        count_tokens: the policy tokenizer's token count of a turn, to keep turns under the round's cap.
    """

    requests = 0
    retries = 0

    def __init__(self, questions: Sequence[Question], config: RagR1Config,
                 count_tokens: Callable[[str], int] | None = None):
        self.config = config
        self.count_tokens = count_tokens
        self.plans = {plan.question: plan for plan in map(hop_plan, questions)}
        # Longest first: a question that contains another one's text is matched as itself.
        self._order = sorted(self.plans, key=len, reverse=True)
        self.requests = 0

    @staticmethod
    def fields() -> dict[str, Any]:
        """How the run's manifest names this teacher."""
        return {"teacher_model": TEACHER_NAME, "api": TEACHER_NAME, "extra_body": {}}

    async def close(self) -> None:
        return None

    async def complete(self, messages: Messages, partial: str, sampling: Sampling) -> Completion:
        self.requests += 1
        plan = self._plan(messages)
        for turn in _Round(plan, _state(partial, self.config), self.config).candidates():
            if self.count_tokens is None or self.count_tokens(turn) <= sampling.max_tokens:
                return _completion(turn)
        return _completion(_think(_pick(plan.id, "give-up", _GIVE_UP)))

    def _plan(self, messages: Messages) -> HopPlan:
        prompt = str(messages[-1].get("content", "")) if messages else ""
        for text in self._order:
            if text in prompt:
                return self.plans[text]
        raise DataError(f"the scripted teacher has no hop metadata for the prompt {prompt[-120:]!r}")


def _completion(turn: str) -> Completion:
    """A turn as a server honouring the stop strings returns it (the stop string kept), or an ended turn."""
    for stop in STOP_STRINGS:
        if turn.endswith(stop):
            return Completion(turn, "stop", stop)
    return Completion(turn, "stop")


def _pick(question_id: str, situation: str, templates: Sequence[str]) -> str:
    return templates[zlib.crc32(f"{question_id}:{situation}".encode()) % len(templates)]


def _think(text: str) -> str:
    return f"<think>{text}</think>"


def _shorten(text: str, words: int) -> str:
    pieces = text.split()
    return text if len(pieces) <= words else " ".join(pieces[:words]) + " ..."


class _Round:
    """One round's possible turns, longest first (the teacher takes the first under the token cap)."""

    def __init__(self, plan: HopPlan, state: _State, config: RagR1Config):
        self.plan, self.state, self.config = plan, state, config
        self.found = [_squash(step.evidence) in state.retrieved for step in plan.steps]
        self.final = state.rounds >= config.max_turns  # a search in this round gets no results

    def candidates(self) -> list[str]:
        plan, state = self.plan, self.state
        if state.rounds == 0:
            return [self._search(self._opening_queries(), _pick(plan.id, self._plan_key(), _PLAN[self._plan_key()]))]
        if all(self.found):
            answer = self._answer()
            if answer is None:
                return []
            return [self._answer_turn(answer, words) for words in (None, *QUOTE_WORDS)]
        queries = None if self.final else self._next_queries()
        if not queries:
            return []  # the evidence is not there and no search is left: no answer (the EM filter drops it)
        return [self._search(queries, self._progress(words)) for words in (None, *QUOTE_WORDS)]

    # -- the searches

    def _plan_key(self) -> str:
        if self.plan.kind == "comparison":
            return f"comparison-{self.config.mode}"
        return self.plan.kind

    def _opening_queries(self) -> list[str]:
        steps = self.plan.steps
        if self.plan.kind == "comparison":
            queries = [step.query for step in steps]
        elif self.plan.kind == "bridge":
            queries = [steps[0].query] + [_question_query(self.plan.question)] * BRIDGE_ASKS_THE_QUESTION
        else:
            queries = [steps[0].query]
        return self._fit(queries)

    def _next_queries(self) -> list[str]:
        """A query for each hop still missing (a bridge's second hop only once the first is found): its own
        query if not asked yet, else one reformulation; none when a missing hop has no query left."""
        queries = []
        for number, (step, found) in enumerate(zip(self.plan.steps, self.found, strict=True)):
            if found or (self.plan.kind == "bridge" and number == 1 and not self.found[0]):
                continue
            query = next((candidate for candidate in map(self._clean, self._alternatives(step))
                          if candidate not in self.state.asked), None)
            if query is None:
                return []
            queries.append(query)
        return self._fit(queries)

    def _alternatives(self, step: Hop) -> list[str]:
        """The hop's query, then its one reformulation: the question itself, or both together when the question
        was asked already."""
        question = _question_query(self.plan.question)
        reformulation = question if self._clean(question) not in self.state.asked else f"{step.query} {question}"
        return [step.query, reformulation]

    def _clean(self, query: str) -> str:
        """The query as the search will split it back: in mq mode a separator would cut it in two."""
        if self.config.mode == "mq":
            query = query.replace(self.config.query_separator, " ")
        return " ".join(query.split())

    def _fit(self, queries: list[str]) -> list[str]:
        cleaned = list(dict.fromkeys(map(self._clean, queries)))
        return cleaned[:1] if self.config.mode == "sq" else cleaned[:self.config.max_queries_per_search]

    def _search(self, queries: list[str], think: str) -> str:
        separator = f"{self.config.query_separator} "
        return f"{_think(think)}\n{SEARCH_OPEN} {separator.join(queries)} {SEARCH_CLOSE}"

    # -- the thinks

    def _new_evidence(self) -> list[str]:
        """The evidence sentences the last observation brought (in the order of the hops)."""
        return [step.evidence for step in self.plan.steps if _squash(step.evidence) in self.state.latest
                and self._first_seen_last(step)]

    def _first_seen_last(self, step: Hop) -> bool:
        earlier = self.state.retrieved[:len(self.state.retrieved) - len(self.state.latest)]
        return _squash(step.evidence) not in earlier

    def _quotes(self, evidence: list[str], words: int | None) -> str:
        first = zlib.crc32(f"{self.plan.id}:quote".encode())
        return " ".join(_QUOTE[(first + number) % len(_QUOTE)].format(
            e=(_shorten(text, words) if words else text).rstrip(" .")) + "." for number, text in enumerate(evidence))

    def _progress(self, words: int | None) -> str:
        plan, new = self.plan, self._new_evidence()
        if not new:
            return _pick(plan.id, "retry", _RETRY)
        quoted = self._quotes(new, words)
        if plan.kind == "bridge" and self.found[0] and not self.found[1]:
            bridge = _shared_span(plan.steps[1].query, plan.steps[0].evidence)
            if bridge:
                return f"{quoted} {_pick(plan.id, 'next', _NEXT['bridge']).format(b=bridge)}"
            return f"{quoted} {_pick(plan.id, 'next', _NEXT['bridge-unnamed'])}"
        if plan.kind == "comparison" and any(self.found):
            return f"{quoted} {_pick(plan.id, 'next', _NEXT['other'])}"
        return f"{quoted} {_pick(plan.id, 'retry', _RETRY)}"

    # -- the answer

    def _answer(self) -> str | None:
        """A gold answer as the retrieved text writes it, or None when the retrieved text holds none.

        A compared entity is looked for in everything retrieved (both hops' passages were); any other answer
        in the evidence sentences first, the answer hop's first.
        """
        evidence = " ".join(_squash(step.evidence) for step in reversed(self.plan.steps))
        places = (self.state.retrieved,) if self.plan.kind == "comparison" else (evidence, self.state.retrieved)
        for text in places:
            for answer in self.plan.answers:
                match = re.search(rf"(?<!\w){re.escape(_squash(answer))}(?!\w)", text, re.IGNORECASE)
                if match and match.group(0) in self.state.retrieved:
                    return match.group(0)
        return None

    def _answer_turn(self, answer: str, words: int | None) -> str:
        new = self._new_evidence() or [self.plan.steps[-1].evidence]
        think = f"{self._quotes(new, words)} {_pick(self.plan.id, 'answer', _ANSWER).format(a=answer)}"
        return f"{_think(think)}\n{ANSWER_OPEN} {answer} {ANSWER_CLOSE}"


def _question_query(question: str) -> str:
    return question.strip().rstrip("?").strip()


_WORD = re.compile(r"[\w'’.-]+")


def _shared_span(query: str, evidence: str) -> str | None:
    """The longest run of the query's words that the evidence also contains (the bridge entity the second hop
    names), if it has a capitalised word; None otherwise."""
    words = _WORD.findall(query)
    lowered = _squash(evidence).lower()
    best = ""
    for start in range(len(words)):
        for end in range(len(words), start, -1):
            span = " ".join(words[start:end]).strip(".")
            if len(span) > len(best) and re.search(rf"(?<!\w){re.escape(span.lower())}(?!\w)", lowered):
                best = span
                break
    return best if any(word[:1].isupper() for word in best.split()) else None
