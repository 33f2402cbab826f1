"""The RAG-R1 tag protocol, as pure functions shared by the rollout, SFT data, evaluation and reward.

The model reasons in ``<think>...</think>``, then either searches, ``<search> q1, q2, q3 </search>``, or
answers, ``<answer> ... </answer>``. Search results come back between ``<information>`` and
``</information>``. Nothing here imports verl or a tokenizer library: the budget of retrieved text takes any
tokenizer with ``encode``/``decode``.
"""

from __future__ import annotations

import bisect
import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

SEARCH_OPEN, SEARCH_CLOSE = "<search>", "</search>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
INFORMATION_OPEN, INFORMATION_CLOSE = "<information>", "</information>"
STOP_STRINGS = (SEARCH_CLOSE, ANSWER_CLOSE)

_INFORMATION = re.compile(r"<information>.*?(?:</information>|$)", re.DOTALL)

Mode = Literal["mq", "sq"]
ObservationFormat = Literal["ragr1", "search_r1"]


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


def split_title(contents: str) -> tuple[str, str]:
    """Title and text of a Search-R1 passage (``"Title"\\ntext``); no title when the first line is not one."""
    first, _, rest = contents.partition("\n")
    if rest and len(first) >= 2 and first.startswith('"') and first.endswith('"'):
        return first[1:-1], rest
    return "", contents


def documents_text(documents: Sequence[dict], observation_format: ObservationFormat) -> str:
    """One query's documents as the model sees them.

    ``ragr1``: ``Doc 1: <contents>`` lines (the passage text as stored). ``search_r1``:
    ``Doc 1 (Title: <title>) <text>`` lines.
    """
    lines = []
    for number, document in enumerate(documents, start=1):
        contents = str(document.get("contents", ""))
        if observation_format == "search_r1":
            title, text = split_title(contents)
            lines.append(f"Doc {number} (Title: {title}) {text}")
        else:
            lines.append(f"Doc {number}: {contents}")
    return "\n".join(lines).strip()


class Codec(Protocol):
    """The policy's tokenizer as the budget of retrieved text counts it (see :func:`policy_codec`)."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class _TokenizerCodec:
    """A Hugging Face (or any ``encode``/``decode``) tokenizer as a :class:`Codec`: the Rust tokenizer when it
    has one, as the rollout and the SFT dataset encode observations, and no special tokens either way."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.backend = getattr(tokenizer, "backend_tokenizer", None)

    def encode(self, text: str) -> list[int]:
        if self.backend is not None:
            return list(self.backend.encode(text, add_special_tokens=False).ids)
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]] | None:
        """Ids and character offsets from the Rust tokenizer; None for a slow (Python) tokenizer."""
        if self.backend is None:
            return None
        encoding = self.backend.encode(text, add_special_tokens=False)
        return list(encoding.ids), list(encoding.offsets)


def policy_codec(tokenizer) -> Codec:
    return _TokenizerCodec(tokenizer)


_BLOCK_OPEN, _BLOCK_CLOSE = f"\n{INFORMATION_OPEN}\n", f"\n{INFORMATION_CLOSE}\n"


def wrap_information(body: str) -> str:
    return f"{_BLOCK_OPEN}{body}{_BLOCK_CLOSE}"


@dataclass(frozen=True)
class ObservationRenderer:
    """The one way search results become an observation: the rollout, the search tool, the SFT teachers and
    the evaluation all render with it, so SFT rows and RL observations hold the same text, hence the same
    tokens.

    ``ragr1`` in mq mode is RAG-R1's JSON object ``{"query": [...], "documents": [...]}`` (indent 2,
    ASCII-escaped as ``json.dumps`` does by default), one document string per query. In sq mode, and in the
    ``search_r1`` format, the documents are plain lines. A *unit* (one query's documents, or all of them in
    sq mode) keeps at most ``max_tokens_per_unit`` tokens of ``codec`` (the policy's tokenizer), counted on
    the unit as it stands in the observation, JSON escapes included. With a Rust (fast) tokenizer the whole
    block is encoded once and a token counts toward the unit its first character lies in; the ids are
    handed back, so the rollout encodes nothing again unless a unit had to be cut. A slow tokenizer has no
    offsets: each unit is encoded on its own. Without a codec nothing is cut.
    """

    mode: Mode = "mq"
    observation_format: ObservationFormat = "ragr1"
    codec: Codec | None = None
    max_tokens_per_unit: int = 1000

    @property
    def json_escaped(self) -> bool:
        return self.observation_format == "ragr1" and self.mode == "mq"

    def render(self, queries: Sequence[str], documents: Sequence[Sequence[dict]]) -> str:
        """The ``<information>`` block of one search."""
        return self.render_with_ids(queries, documents)[0]

    def body(self, queries: Sequence[str], documents: Sequence[Sequence[dict]]) -> str:
        """The block's content, without the tags (a tool response)."""
        return self.render(queries, documents)[len(_BLOCK_OPEN):-len(_BLOCK_CLOSE)]

    def render_with_ids(self, queries: Sequence[str], documents: Sequence[Sequence[dict]]
                        ) -> tuple[str, list[int] | None]:
        """The block and, where counting the budget already encoded it, its token ids (else None)."""
        units = document_units(documents, self.mode, self.observation_format)
        if self.codec is None:
            return self._block(queries, units)[0], None
        text, spans = self._block(queries, units)
        encoded = self._encode_with_offsets(text)
        if encoded is None:  # a slow tokenizer: each unit is counted on its own
            units = [self._within_budget(unit) for unit in units]
            return self._block(queries, units)[0], None
        ids, offsets = encoded
        cuts = _cuts_over_budget(spans, offsets, self.max_tokens_per_unit)
        if not cuts:
            return text, ids
        units = [unit_prefix(unit, cuts[i], self.json_escaped) if i in cuts else unit for i, unit in enumerate(units)]
        text = self._block(queries, units)[0]
        return text, self.codec.encode(text)

    def _block(self, queries: Sequence[str], units: Sequence[str]) -> tuple[str, list[tuple[int, int]]]:
        body, spans = _layout(queries, units, self.mode, self.observation_format)
        shift = len(_BLOCK_OPEN)
        return wrap_information(body), [(start + shift, end + shift) for start, end in spans]

    def _encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]] | None:
        encode = getattr(self.codec, "encode_with_offsets", None)
        return None if encode is None else encode(text)

    def _within_budget(self, unit: str) -> str:
        rendered = json.dumps(unit)[1:-1] if self.json_escaped else unit
        ids = self.codec.encode(rendered)
        if len(ids) <= self.max_tokens_per_unit:
            return unit
        # The decoded prefix is the rendered text up to the last kept token; where a tokenizer does not decode
        # back exactly, the common prefix keeps fewer characters, never more tokens.
        kept = self.codec.decode(ids[:self.max_tokens_per_unit])
        return unit_prefix(unit, len(os.path.commonprefix([rendered, kept])), self.json_escaped)


def _cuts_over_budget(spans: Sequence[tuple[int, int]], offsets: Sequence[tuple[int, int]],
                      budget: int) -> dict[int, int]:
    """For each span holding more than ``budget`` tokens: its index -> characters kept (those before the first
    token past the budget, so that a character split over several tokens is kept whole or not at all). A
    token belongs to the span its first character is in."""
    starts = [start for start, _ in offsets]
    cuts = {}
    for index, (begin, end) in enumerate(spans):
        first, stop = bisect.bisect_left(starts, begin), bisect.bisect_left(starts, end)
        if stop - first > budget:
            cuts[index] = starts[first + budget] - begin
    return cuts


def render_observation(queries: Sequence[str], documents: Sequence[Sequence[dict]], *, mode: Mode = "mq",
                       observation_format: ObservationFormat = "ragr1") -> str:
    """The ``<information>`` block of one search, nothing cut (:class:`ObservationRenderer` cuts)."""
    return ObservationRenderer(mode, observation_format).render(queries, documents)


def document_units(documents: Sequence[Sequence[dict]], mode: Mode, observation_format: ObservationFormat) -> list[str]:
    """The texts that ``max_obs_tokens_per_query`` cuts: one per query, or all documents as one in sq mode."""
    per_query = [documents_text(docs, observation_format) for docs in documents]
    return ["\n".join(per_query)] if mode == "sq" else per_query


def _indented_json_list(items: Sequence[str]) -> str:
    """A list of strings exactly as ``json.dumps(..., indent=2)`` writes it at the second level."""
    if not items:
        return "[]"
    return "[\n    " + ",\n    ".join(json.dumps(item) for item in items) + "\n  ]"


def _layout(queries: Sequence[str], units: Sequence[str], mode: Mode,
            observation_format: ObservationFormat) -> tuple[str, list[tuple[int, int]]]:
    """The block's content and the character range of each unit in it (as rendered: JSON-escaped in mq)."""
    pieces: list[str] = []
    spans: list[tuple[int, int]] = []
    length = 0

    def add(text: str, unit: bool = False) -> None:
        nonlocal length
        if unit:
            spans.append((length, length + len(text)))
        pieces.append(text)
        length += len(text)

    if observation_format == "ragr1" and mode == "mq":
        add(f'{{\n  "query": {_indented_json_list(queries)},\n  "documents": ')
        for number, unit in enumerate(units):
            add('[\n    "' if number == 0 else '",\n    "')
            add(json.dumps(unit)[1:-1], unit=True)
        add('"\n  ]\n}' if units else "[]\n}")
    elif mode == "sq":
        add(units[0], unit=True)
    else:
        for number, (query, unit) in enumerate(zip(queries, units, strict=True)):
            add(f"{chr(10) * 2 if number else ''}Results for: {query}\n")
            add(unit, unit=True)
    return "".join(pieces), spans


_SHORT_JSON_ESCAPES = frozenset('"\\\n\r\t\b\f')


def _json_escaped_length(char: str) -> int:
    """Characters ``json.dumps`` (ASCII-escaping) writes for one character inside a string."""
    if char in _SHORT_JSON_ESCAPES:
        return 2
    code = ord(char)
    if 0x20 <= code <= 0x7E:
        return 1
    return 12 if code > 0xFFFF else 6  # astral characters become a surrogate pair


def unit_prefix(unit: str, rendered_chars: int, json_escaped: bool) -> str:
    """The longest prefix of ``unit`` that takes at most ``rendered_chars`` characters in the observation."""
    if not json_escaped:
        return unit[:rendered_chars]
    used = 0
    for index, char in enumerate(unit):
        used += _json_escaped_length(char)
        if used > rendered_chars:
            return unit[:index]
    return unit


INVALID_ACTION_REMINDER = (
    "\nThat was neither a search nor an answer. To search, write the queries between <search> and "
    "</search>; to finish, write the final answer between <answer> and </answer>.\n"
)


def invalid_search(reason: str) -> str:
    """The message after a search that was not run (no query, or too many with ``over_query_cap: invalid``)."""
    return (f"\nThe search was not run: {reason}. Put the queries between <search> and </search>, or the final "
            "answer between <answer> and </answer>.\n")


def retrieval_failed_text(reason: str) -> str:
    return f"The search failed ({reason}). No results are available for this search."


def retrieval_failed(reason: str) -> str:
    """The observation when the retriever could not answer: the rollout goes on without results."""
    return wrap_information(retrieval_failed_text(reason))


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


def normalize_question(question: str) -> str:
    """Strip the question and end it with a question mark, as the paper's data preparation does."""
    question = question.strip()
    return question if question.endswith("?") else question + "?"


MQ_PROMPT_TEMPLATE = (
    "Answer the question below. Every time you receive new information, first reason about it inside "
    "<think> and </think>. If you need knowledge you do not have, search for it: write one or more search "
    "queries, separated by commas, between <search> and </search>, for example "
    "<search> first query, second query </search>. You may use up to three queries in one search, and the "
    "results for each query will come back between <information> and </information>. You can search as many "
    "times as you need. Once you need nothing more, write the final answer between <answer> and </answer>, "
    "without explanations, for example <answer> Beijing </answer>. Question: {question}\n"
)
SQ_PROMPT_TEMPLATE = (
    "Answer the question below. Every time you receive new information, first reason about it inside "
    "<think> and </think>. If you need knowledge you do not have, search for it: write a search query between "
    "<search> and </search>, and the results will come back between <information> and </information>. You can "
    "search as many times as you need. Once you need nothing more, write the final answer between <answer> and "
    "</answer>, without explanations, for example <answer> Beijing </answer>. Question: {question}\n"
)


def render_prompt(question: str, template: str) -> str:
    """The user message for a question; the template must contain ``{question}``."""
    if "{question}" not in template:
        raise ValueError("a prompt template needs a {question} placeholder")
    return template.replace("{question}", normalize_question(question))


def default_template(mode: Mode) -> str:
    return MQ_PROMPT_TEMPLATE if mode == "mq" else SQ_PROMPT_TEMPLATE
