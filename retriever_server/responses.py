"""``/retrieve`` response bodies assembled from JSON encoded once per document.

Escaping a passage's text is most of what ``json.dumps`` costs for a response, and popular passages come
back in many responses. :class:`DocumentJson` encodes each document once, keeps the encoded text in an LRU
bounded by bytes, and looks up the documents it lacks in one corpus call for a whole batch.
:func:`render_body` joins those fragments into the body of one request, byte for byte what ``json.dumps``
of the wire format (``wire.py``) gives.
"""

from __future__ import annotations

import json
import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Protocol


class DocumentSource(Protocol):
    def documents(self, positions: list[int]) -> list[dict]: ...


class DocumentJson:
    """Position -> the JSON text of its ``{"id", "contents"}`` object, encoded once and cached by size."""

    def __init__(self, corpus: DocumentSource, max_bytes: int = 64 * 1024 * 1024):
        self.corpus = corpus
        self.max_bytes = max_bytes
        self.bytes = 0
        self.lookups = 0  # corpus calls; one per batch with misses
        self._entries: OrderedDict[int, str] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def fragments(self, positions: Sequence[int]) -> dict[int, str]:
        """The JSON text of the documents at ``positions`` (duplicates allowed), one corpus call for misses."""
        found: dict[int, str] = {}
        with self._lock:
            for position in positions:
                text = self._entries.get(position)
                if text is not None:
                    self._entries.move_to_end(position)
                    found[position] = text
        missing = sorted({position for position in positions if position not in found})
        if missing:
            self.lookups += 1
            encoded = [json.dumps(document) for document in self.corpus.documents(missing)]
            found.update(zip(missing, encoded))
            self._remember(zip(missing, encoded))
        return found

    def _remember(self, items) -> None:
        with self._lock:
            for position, text in items:
                if position in self._entries or len(text) > self.max_bytes:
                    continue
                self._entries[position] = text
                self.bytes += len(text)
            while self.bytes > self.max_bytes and self._entries:
                _, text = self._entries.popitem(last=False)
                self.bytes -= len(text)


def _score_text(score: float) -> str:
    value = round(float(score), 6)
    return repr(value) if math.isfinite(value) else "null"  # json.dumps would write NaN, which is not JSON


def render_body(positions: Sequence[Sequence[int]], scores: Sequence[Sequence[float]],
                fragments: dict[int, str], return_scores: bool) -> str:
    """The response for one request: per query its hits (``position < 0`` means no hit) in rank order."""
    rows = []
    for position_row, score_row in zip(positions, scores):
        if return_scores:
            hits = [f'{{"document": {fragments[p]}, "score": {_score_text(s)}}}'
                    for p, s in zip(position_row, score_row) if p >= 0]
        else:
            hits = [fragments[p] for p in position_row if p >= 0]
        rows.append("[" + ", ".join(hits) + "]")
    return '{"result": [' + ", ".join(rows) + "]}"
