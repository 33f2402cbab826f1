"""What the model reads after a search: retrieved documents rendered as an observation within a token
budget, and the messages that stand in for results (a search that was not run, a retriever that failed).

Nothing here imports verl or a tokenizer library: the budget takes any tokenizer with ``encode``/``decode``.
"""

from __future__ import annotations

import bisect
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from ragr1_verl.protocol.actions import INFORMATION_CLOSE, INFORMATION_OPEN, Mode

ObservationFormat = Literal["ragr1", "search_r1"]


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
    offsets: each unit is encoded on its own, then the block. Without a codec nothing is cut. One renderer
    serves every search of a worker (the rollout keeps one per config and tokenizer).
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
        """The block and its token ids in ``codec`` (None without a codec). The ids come from encoding the
        block once to count the budget, and again only when a unit had to be cut."""
        units = document_units(documents, self.mode, self.observation_format)
        if self.codec is None:
            return self._block(queries, units)[0], None
        text, spans = self._block(queries, units)
        encoded = self._encode_with_offsets(text)
        if encoded is None:  # a slow tokenizer: each unit is counted on its own
            units = [self._within_budget(unit) for unit in units]
            text = self._block(queries, units)[0]
            return text, self.codec.encode(text)
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
