"""Passage corpora: streaming readers for the input formats and memory-mapped storage.

Input formats
-------------
* Search-R1 / FlashRAG jsonl: one ``{"id": ..., "contents": "\\"Title\\"\\ntext"}`` object per line.
  Rows that carry ``title`` and ``text`` instead of ``contents`` are accepted and rendered the same way.
* KILT/DPR-style tsv: either with a header row ``id<TAB>text<TAB>title`` (DPR's ``psgs_w100.tsv``), or
  without a header as ``id<TAB>contents`` (RAG-R1's KILT split) or ``id<TAB>text<TAB>title``.

Either may be gzip-compressed (``.gz``). Storage is an Arrow IPC file (``corpus.arrow``) that the server
memory-maps, so a 21-29M passage corpus never becomes millions of Python objects.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

CORPUS_NAME = "corpus.arrow"
CORPUS_SCHEMA = pa.schema([("id", pa.string()), ("contents", pa.string())])
_WRITE_BATCH_ROWS = 8192


class CorpusFormatError(ValueError):
    """A corpus file has a malformed row; the message names the file, line and field."""

    def __init__(self, path: str | os.PathLike, line: int, field: str, problem: str):
        self.path, self.line, self.field = str(path), line, field
        super().__init__(f"{path}, line {line}, field '{field}': {problem}")


@dataclass(frozen=True)
class Passage:
    id: str
    contents: str


def render_contents(title: str, text: str) -> str:
    """Render a passage as Search-R1's corpus does: the quoted title, a newline, the text."""
    return f'"{title}"\n{text}'


def _open_text(path: Path):
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def _id_from(value, path: Path, line: int) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise CorpusFormatError(path, line, "id", f"expected a string or integer, got {type(value).__name__}")
    text = str(value)
    if not text:
        raise CorpusFormatError(path, line, "id", "is empty")
    return text


def _jsonl_passage(raw: str, path: Path, line: int) -> Passage:
    try:
        row = json.loads(raw)
    except json.JSONDecodeError as err:
        raise CorpusFormatError(path, line, "<row>", f"not valid JSON ({err.msg})") from None
    if not isinstance(row, dict):
        raise CorpusFormatError(path, line, "<row>", "expected a JSON object")
    if "id" not in row:
        raise CorpusFormatError(path, line, "id", "is missing")
    passage_id = _id_from(row["id"], path, line)
    if "contents" in row:
        contents = row["contents"]
        if not isinstance(contents, str):
            raise CorpusFormatError(path, line, "contents", "expected a string")
        return Passage(passage_id, contents)
    if isinstance(row.get("text"), str):
        title = row.get("title", "")
        if not isinstance(title, str):
            raise CorpusFormatError(path, line, "title", "expected a string")
        return Passage(passage_id, render_contents(title, row["text"]) if title else row["text"])
    raise CorpusFormatError(path, line, "contents", "is missing (expected 'contents', or 'text' and 'title')")


def _iter_jsonl(path: Path) -> Iterator[Passage]:
    with _open_text(path) as handle:
        for line_no, raw in enumerate(handle, start=1):
            if raw.strip():
                yield _jsonl_passage(raw, path, line_no)


def _iter_tsv(path: Path) -> Iterator[Passage]:
    with _open_text(path) as handle:
        reader = csv.reader(handle, delimiter="\t", quotechar='"')
        header: list[str] | None = None
        for line_no, cells in enumerate(reader, start=1):
            if not cells:
                continue
            if line_no == 1 and [c.strip().lower() for c in cells[:3]] == ["id", "text", "title"]:
                header = cells
                continue
            yield _tsv_passage(cells, header, path, reader.line_num)


def _tsv_passage(cells: list[str], header: list[str] | None, path: Path, line: int) -> Passage:
    if len(cells) == 2:
        return Passage(_id_from(cells[0], path, line), cells[1])
    if len(cells) == 3:
        text, title = cells[1], cells[2]
        return Passage(_id_from(cells[0], path, line), render_contents(title, text))
    expected = "id, text, title" if header else "id and contents, or id, text and title"
    raise CorpusFormatError(path, line, "<row>", f"expected {expected} separated by tabs, got {len(cells)} columns")


def iter_passages(path: str | os.PathLike) -> Iterator[Passage]:
    """Stream passages from a jsonl or tsv corpus (optionally ``.gz``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"corpus file not found: {path}")
    stem_suffix = Path(path.stem).suffix if path.suffix == ".gz" else path.suffix
    if stem_suffix in (".jsonl", ".json"):
        return _iter_jsonl(path)
    if stem_suffix in (".tsv", ".txt"):
        return _iter_tsv(path)
    raise CorpusFormatError(path, 0, "<file>", "unknown corpus format: use .jsonl or .tsv (optionally .gz)")


def write_corpus_arrow(source: str | os.PathLike, destination: str | os.PathLike) -> int:
    """Convert a corpus file to an Arrow IPC file; returns the passage count.

    Writes to a temporary file and renames it, so an interrupted conversion leaves nothing behind. Duplicate
    ids are rejected because the server maps search hits back to documents by position, and users map
    them back to their data by id.
    """
    destination = Path(destination)
    tmp = destination.with_name(destination.name + ".partial")
    seen: set[str] = set()
    count = 0
    try:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, CORPUS_SCHEMA) as writer:
            ids: list[str] = []
            contents: list[str] = []
            for passage in iter_passages(source):
                if passage.id in seen:
                    raise CorpusFormatError(source, count + 1, "id", f"duplicate id {passage.id!r}")
                seen.add(passage.id)
                ids.append(passage.id)
                contents.append(passage.contents)
                count += 1
                if len(ids) >= _WRITE_BATCH_ROWS:
                    writer.write_batch(pa.record_batch([ids, contents], schema=CORPUS_SCHEMA))
                    ids, contents = [], []
            if ids:
                writer.write_batch(pa.record_batch([ids, contents], schema=CORPUS_SCHEMA))
        if count == 0:
            raise CorpusFormatError(source, 0, "<file>", "contains no passages")
        os.replace(tmp, destination)
    finally:
        tmp.unlink(missing_ok=True)
    return count


class Corpus:
    """A memory-mapped Arrow corpus addressed by row position (the index's vector id)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        source = pa.memory_map(str(self.path), "r")
        self._table = pa.ipc.open_file(source).read_all()
        if self._table.schema.names[:2] != ["id", "contents"]:
            raise ValueError(f"{self.path} is not a corpus file (columns {self._table.schema.names})")
        self._ids = self._table.column("id")
        self._contents = self._table.column("contents")
        # Row offset of each record batch. Table.take over a many-chunk memory-mapped table costs ~1 ms per
        # chunk whatever the rows; taking from the chunks that hold the rows costs microseconds.
        self._offsets = np.cumsum([0] + [len(chunk) for chunk in self._ids.chunks], dtype=np.int64)

    def __len__(self) -> int:
        return self._table.num_rows

    def documents(self, positions: list[int]) -> list[dict[str, str]]:
        """The ``{"id", "contents"}`` documents at these row positions, in order."""
        if not len(positions):
            return []
        wanted = np.asarray(positions, dtype=np.int64)
        if wanted.min() < 0 or wanted.max() >= len(self):
            raise IndexError(f"corpus positions must be in [0, {len(self)}), got {wanted.min()}..{wanted.max()}")
        chunk_of = np.searchsorted(self._offsets, wanted, side="right") - 1
        documents: list[dict[str, str]] = [{}] * len(wanted)
        for chunk in np.unique(chunk_of):
            rows = np.flatnonzero(chunk_of == chunk)
            local = pa.array(wanted[rows] - self._offsets[chunk])
            ids = self._ids.chunk(int(chunk)).take(local).to_pylist()
            contents = self._contents.chunk(int(chunk)).take(local).to_pylist()
            for row, identifier, text in zip(rows.tolist(), ids, contents):
                documents[row] = {"id": identifier, "contents": text}
        return documents

    def iter_batches(self, batch_rows: int) -> Iterator[tuple[int, list[str]]]:
        """Yield ``(first_position, contents)`` chunks of at most ``batch_rows`` passages."""
        for start in range(0, len(self), batch_rows):
            chunk = self._contents.slice(start, batch_rows)
            yield start, chunk.to_pylist()


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()
