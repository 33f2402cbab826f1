"""Reading question files and writing parquet outputs for ``ragr1-data``.

Every reader error names the file, and where it applies the row (1-based) and the field, so that a user can
fix the input. Outputs are staged in a temporary folder beside ``--out`` and moved into place only when every
file of a command has been written: a failed or interrupted run leaves nothing partial behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def positive_int(value: str) -> int:
    """An argparse type: an integer of at least 1."""
    import argparse

    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


class DataError(Exception):
    """An input file (or hub source) that cannot be used; the message names the file, row and field."""


def where(path: str | os.PathLike[str], row: int | None = None, field: str | None = None) -> str:
    """``file``, ``file, row 3`` or ``file, row 3, field 'question'``: the prefix of every data error."""
    location = str(path)
    if row is not None:
        location += f", row {row}"
    if field is not None:
        location += f", field {field!r}"
    return location


def read_records(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rows of a ``.jsonl``, ``.json`` (a list, or an object with a ``data`` list) or ``.parquet`` file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    suffixes = "".join(path.suffixes[-2:]).lower()
    if suffixes.endswith(".parquet"):
        return _read_parquet(path)
    if suffixes.endswith(".jsonl"):
        return _read_jsonl(path)
    if suffixes.endswith(".json"):
        return _read_json(path)
    raise DataError(f"{path}: unknown file type (expected .jsonl, .json or .parquet)")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{where(path, number)}: not valid JSON ({error.msg})") from None
        rows.append(_as_record(row, path, number))
    return rows


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        line = path.read_bytes()[:error.start].count(b"\n") + 1
        raise DataError(f"{where(path, line)}: not UTF-8 text (byte {error.start})") from None


def _read_json(path: Path) -> list[dict[str, Any]]:
    try:
        document = json.loads(_text(path))
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from None
    if isinstance(document, dict) and isinstance(document.get("data"), list):
        document = document["data"]
    if not isinstance(document, list):
        raise DataError(f"{path}: expected a list of rows (or an object with a 'data' list)")
    return [_as_record(row, path, number) for number, row in enumerate(document, start=1)]


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as error:  # noqa: BLE001 (pyarrow raises several types for a damaged file)
        raise DataError(f"{path}: not a readable parquet file ({error})") from None
    return table.to_pylist()


def _as_record(row: Any, path: Path, number: int) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise DataError(f"{where(path, number)}: expected a JSON object, got {type(row).__name__}")
    return row


@contextlib.contextmanager
def staged_output(out_dir: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary folder to write a command's files into; on success they are moved into ``out_dir``.

    On an exception nothing in ``out_dir`` changes and the temporary folder is removed. Files already in
    ``out_dir`` with the same names are replaced only at the end, each by an atomic rename.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".ragr1-data-", dir=out_dir))
    try:
        yield staging
        for staged in sorted(staging.rglob("*")):
            if staged.is_file():
                target = out_dir / staged.relative_to(staging)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(staged, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
