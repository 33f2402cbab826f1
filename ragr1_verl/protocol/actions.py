"""What the model writes, as pure functions: the tags, its action in a round, the queries of a search and
the final answer.

The model reasons in ``<think>...</think>``, then either searches, ``<search> q1, q2, q3 </search>``, or
answers, ``<answer> ... </answer>``. Search results come back between ``<information>`` and
``</information>``. Parsers here are total (any text gives a result) and linear in the text's length.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

SEARCH_OPEN, SEARCH_CLOSE = "<search>", "</search>"


ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"


INFORMATION_OPEN, INFORMATION_CLOSE = "<information>", "</information>"


STOP_STRINGS = (SEARCH_CLOSE, ANSWER_CLOSE)


_INFORMATION = re.compile(r"<information>.*?(?:</information>|$)", re.DOTALL)


Mode = Literal["mq", "sq"]


@dataclass(frozen=True)
class Action:
    """What the model asked for in one turn.

    ``end`` is the offset just past the closing tag in the turn's text, or -1 for an invalid action.
    """

    kind: Literal["search", "answer", "invalid"]
    content: str = ""
    end: int = -1


# What a round's action does to its trajectory: answer and stopped end it (an answer, or a turn the model ended
# without an action), budget ends it because no search is left, continue runs the search or a reminder.
RoundOutcome = Literal["answer", "stopped", "budget", "continue"]


def rounds_allowed(max_turns: int, final_round: bool) -> int:
    """Generation rounds of one trajectory: ``max_turns`` that may search, then one that may only answer."""
    return max_turns + int(final_round)


def round_outcome(action: Action, ended_on_its_own: bool, can_search: bool) -> RoundOutcome:
    """The one rule for a round, shared by the rollout and the SFT teachers' episodes.

    ``ended_on_its_own``: the model stopped by itself (EOS or a stop token), not on a stop string or the
    token cap; only an invalid action reads it.
    """
    if action.kind == "answer":
        return "answer"
    if action.kind == "invalid" and ended_on_its_own:
        return "stopped"
    return "continue" if can_search else "budget"


def parse_action(text: str, start: int = 0) -> Action:
    """The first complete ``<search>...</search>`` or ``<answer>...</answer>`` of a turn, else invalid.

    Only ``text[start:]`` is read; ``end`` counts from the start of ``text``, so a caller walks a long text
    action by action without copying it. The content runs to the first closing tag of the opener's kind.
    Linear in the text on any input (a regex with a lazy group is quadratic on thousands of unclosed
    openers, which a model can write).

    >>> parse_action("<think>hm</think><search> a, b </search> trailing")
    Action(kind='search', content=' a, b ', end=40)
    >>> parse_action("<answer>Paris").kind
    'invalid'
    """
    found = [block for block in (_first_block(text, SEARCH_OPEN, SEARCH_CLOSE, start),
                                 _first_block(text, ANSWER_OPEN, ANSWER_CLOSE, start)) if block is not None]
    if not found:
        return Action("invalid")
    opened, closed, kind = min(found)
    content_start = opened + len(SEARCH_OPEN if kind == "search" else ANSWER_OPEN)
    return Action(kind, text[content_start:closed], closed + len(f"</{kind}>"))  # type: ignore[arg-type]


def _first_block(text: str, opener: str, closer: str, start: int) -> tuple[int, int, str] | None:
    """(opener position, closer position, tag) of the first complete block at or after ``start``.

    If the first opener has no closer after it, no later opener has one either: two ``find`` calls suffice.
    """
    opened = text.find(opener, start)
    if opened < 0:
        return None
    closed = text.find(closer, opened + len(opener))
    return (opened, closed, opener[1:-1]) if closed >= 0 else None


def iter_actions(text: str) -> Iterator[Action]:
    """The complete actions of a text in order, each parsed after the previous one (as the rollout reads turns).

    Linear in the text: each kind's next block is found once and reused until an action passes it.

    >>> [action.kind for action in iter_actions("<search>a</search> <answer>b</answer> <search>c")]
    ['search', 'answer']
    """
    tags = {"search": (SEARCH_OPEN, SEARCH_CLOSE), "answer": (ANSWER_OPEN, ANSWER_CLOSE)}
    upcoming = {kind: _first_block(text, *tags[kind], 0) for kind in tags}
    position = 0
    while found := [block for block in upcoming.values() if block is not None]:
        opened, closed, kind = min(found)
        end = closed + len(tags[kind][1])
        yield Action(kind, text[opened + len(tags[kind][0]):closed], end)  # type: ignore[arg-type]
        position = end
        for other, block in upcoming.items():
            if block is not None and block[0] < position:
                upcoming[other] = _next_block(text, *tags[other], position, block)


def _next_block(text: str, opener: str, closer: str, start: int,
                previous: tuple[int, int, str]) -> tuple[int, int, str] | None:
    """The first block at or after ``start``, knowing the previous first block (its closer is reused)."""
    opened = text.find(opener, start)
    if opened < 0:
        return None
    if opened < previous[1]:  # the first closer after this opener is the one already found
        return opened, previous[1], previous[2]
    return _first_block(text, opener, closer, opened)


def block_contents(text: str, opener: str, closer: str) -> list[str]:
    """The contents of the non-overlapping ``opener...closer`` blocks, left to right (unclosed ones ignored).

    What ``re.findall(opener + "(.*?)" + closer)`` returns, in linear time on any input.

    >>> block_contents("<a>1</a> <a>2<a>3</a> <a>4", "<a>", "</a>")
    ['1', '2<a>3']
    """
    contents, position = [], 0
    while (block := _first_block(text, opener, closer, position)) is not None:
        opened, closed, _ = block
        contents.append(text[opened + len(opener):closed])
        position = closed + len(closer)
    return contents


def stop_string_prefix(token_ids: Sequence[int], decode: Callable[[Sequence[int]], str],
                       stops: Sequence[str] = STOP_STRINGS, *, text: str | None = None) -> int:
    """How many of a turn's tokens a backend honouring ``stops`` would have returned.

    vLLM and SGLang stop after the token in which the first stop string completes; a backend that ignores
    stop strings generates past it. The tokens after that one are dropped (at token level: nothing is
    re-tokenized); whitespace after the stop string is kept. One decode when nothing needs trimming,
    O(log n) decodes otherwise; ``text``, when given, is ``decode(token_ids)`` already computed.

    >>> stop_string_prefix(list("<answer>a</answer> more"), "".join)
    18
    """
    if text is None:
        text = decode(token_ids)
    found = [(text.find(stop), stop) for stop in stops if stop in text]
    if not found:
        return len(token_ids)
    position, stop = min(found)
    if not text[position + len(stop):].strip():
        return len(token_ids)
    low, high = 1, len(token_ids)
    while low < high:  # "the prefix holds a stop string" only turns true once as the prefix grows
        middle = (low + high) // 2
        if any(stop in decode(token_ids[:middle]) for stop in stops):
            high = middle
        else:
            low = middle + 1
    return low


@dataclass(frozen=True)
class QueryRules:
    """How a search's content becomes queries (config: ``ragr1.mode``, ``ragr1.query_separator``,
    ``ragr1.max_queries_per_search``, ``ragr1.over_query_cap``)."""

    mode: Mode = "mq"
    separator: str = ","
    max_queries: int = 3
    over_cap: Literal["truncate", "invalid"] = "truncate"


@dataclass(frozen=True)
class Queries:
    """The queries of one search, with what was removed; ``error`` is set when the search is invalid."""

    queries: tuple[str, ...]
    duplicates_removed: int = 0
    dropped_over_cap: int = 0
    error: str | None = None


def _json_list(content: str) -> list[str] | None:
    stripped = content.strip()
    if not (stripped.startswith("[") and stripped.endswith("]")):
        return None
    try:
        value = json.loads(stripped)
    except (ValueError, RecursionError):  # also deep nesting and integers past Python's digit limit
        return None
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value
    return None


def split_queries(content: str, rules: QueryRules = QueryRules()) -> Queries:
    """Split a search's content into queries: strip, drop empties, deduplicate in order, apply the cap.

    >>> split_queries(" Paris population, , Paris population,Berlin population ").queries
    ('Paris population', 'Berlin population')
    >>> split_queries('["a, b", "c"]').queries
    ('a, b', 'c')
    >>> split_queries("a, b", QueryRules(mode="sq")).queries
    ('a, b',)
    """
    if rules.mode == "sq":
        pieces = [content]
    else:
        listed = _json_list(content)
        pieces = listed if listed is not None else content.split(rules.separator)
    return clean_queries(pieces, rules)


def clean_queries(pieces: Sequence[str], rules: QueryRules = QueryRules()) -> Queries:
    """Strip, drop empties, deduplicate in order and apply the cap to already separated queries."""
    cleaned = [piece.strip() for piece in pieces if piece.strip()]
    unique = list(dict.fromkeys(cleaned))
    duplicates = len(cleaned) - len(unique)
    if not unique:
        return Queries((), duplicates, 0, "the search has no query")
    if len(unique) <= rules.max_queries:
        return Queries(tuple(unique), duplicates)
    over = len(unique) - rules.max_queries
    if rules.over_cap == "invalid":
        return Queries((), duplicates, over, f"{len(unique)} queries in one search; at most {rules.max_queries}")
    return Queries(tuple(unique[:rules.max_queries]), duplicates, over)


def strip_information(text: str) -> str:
    """The text without ``<information>`` blocks (an unclosed block runs to the end)."""
    return _INFORMATION.sub(" ", text)


def extract_answer(text: str) -> str | None:
    """The last ``<answer>`` the model wrote, ignoring any inside retrieved ``<information>``; else None.

    >>> extract_answer("<answer>Rome</answer><information><answer>x</answer></information><answer> Paris </answer>")
    'Paris'
    """
    answers = block_contents(strip_information(text), ANSWER_OPEN, ANSWER_CLOSE)
    return answers[-1].strip() if answers else None
