"""The files of an ``sft-generate`` run, all in ``--out``.

- ``attempts.jsonl``: every trajectory the teacher produced (first attempts and re-samples), one JSON line
  each, appended and flushed as soon as it is finished, so a crash loses only the trajectories in flight. A
  rerun reads it to skip what is done; a last line cut short by a crash is dropped (and the file repaired).
- ``sft_trajectories.jsonl``: the kept file, the exact-match first attempts of the run's questions that
  ``ragr1-data sft`` can cut into training samples (no format reminder, no ``<information>`` written by the
  teacher itself: such a trajectory would teach the format wrong). It is rewritten from the log (to a
  temporary file, then renamed) at the end of every run, also a failed one.
- ``run.json``: the settings that shape the trajectories. A rerun with different ones is refused, so one
  folder never mixes, say, sq and mq trajectories.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass
from numbers import Integral
from pathlib import Path
from typing import IO, Any

from ragr1_verl.data.sft import TeacherTrajectory
from ragr1_verl.records import DataError, where

logger = logging.getLogger(__name__)

ATTEMPTS_FILE = "attempts.jsonl"
KEPT_FILE = "sft_trajectories.jsonl"
MANIFEST_FILE = "run.json"


@dataclass(frozen=True)
class TrajectoryRecord(TeacherTrajectory):
    """One line of the attempts log (and of the kept file): what ``ragr1-data sft`` reads, and more.

    ``messages`` are the prompt's chat messages; ``trajectory`` the whole assistant text, observations
    included; ``em`` is 1 when ``answer`` exactly matches a gold answer; ``invalid_actions`` counts the rounds
    that got a format reminder instead of results; ``attempt`` is 0 for the SFT
    generation and 1.. for the RL-selection re-samples; ``finish`` says how the trajectory ended (see
    :data:`~ragr1_verl.data.teacher.episode.Finish`).
    """

    searches: int
    invalid_actions: int
    attempt: int
    temperature: float
    turns: int
    finish: str

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)


@dataclass(frozen=True)
class AttemptSummary:
    """What resuming needs to know of a logged trajectory."""

    id: str
    attempt: int
    em: int


class AttemptLog:
    """The append-only ``attempts.jsonl``. :meth:`load` before the first :meth:`append`."""

    def __init__(self, path: Path):
        self.path = path
        self._handle: IO[str] | None = None

    def load(self) -> list[AttemptSummary]:
        """The logged trajectories; an unfinished last line is cut off the file, a damaged one elsewhere is an
        error naming its row."""
        if not self.path.exists():
            self.path.touch()  # an empty log from the start: "the finished trajectories are in ..." always holds
            return []
        summaries, good_bytes, needs_newline = [], 0, False
        with self.path.open("rb") as handle:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    row = self._parse(line, number)
                    if row is None:
                        break
                    summaries.append(_summary(row, self.path, number))
                good_bytes += len(line)
                needs_newline = not line.endswith(b"\n")
        self._repair(good_bytes, needs_newline)
        return summaries

    def append(self, record: TrajectoryRecord) -> None:
        if self._handle is None:
            self._handle = self.path.open("a", encoding="utf-8")
        # One write per line, flushed: a crash leaves whole lines and at most one cut last line.
        self._handle.write(record.to_json() + "\n")
        self._handle.flush()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def _parse(self, line: bytes, number: int) -> Any:
        try:
            return json.loads(line)
        except ValueError:
            if line.endswith(b"\n"):
                raise DataError(f"{where(self.path, number)}: not valid JSON; only an unfinished last line "
                                "is repaired, so this log is damaged") from None
            logger.warning("%s: dropping the unfinished last line (row %d), left by an interrupted run",
                           self.path, number)
            return None

    def _repair(self, good_bytes: int, needs_newline: bool) -> None:
        if good_bytes < self.path.stat().st_size:
            os.truncate(self.path, good_bytes)
        if needs_newline:  # a complete last row that lost only its newline: the next append must not join it
            with self.path.open("ab") as handle:
                handle.write(b"\n")


def _summary(row: Any, path: Path, number: int) -> AttemptSummary:
    if not isinstance(row, dict):
        raise DataError(f"{where(path, number)}: expected a JSON object, got {type(row).__name__}")
    identifier, attempt, em = row.get("id"), row.get("attempt"), row.get("em")
    if not isinstance(identifier, str) or not identifier:
        raise DataError(f"{where(path, number, 'id')}: expected a non-empty string, got {identifier!r}")
    if isinstance(attempt, bool) or not isinstance(attempt, Integral) or attempt < 0:
        raise DataError(f"{where(path, number, 'attempt')}: expected an integer >= 0, got {attempt!r}")
    if isinstance(em, bool) or not isinstance(em, Integral) or em not in (0, 1):
        raise DataError(f"{where(path, number, 'em')}: expected 0 or 1, got {em!r}")
    return AttemptSummary(identifier, int(attempt), int(em))


def write_kept(log_path: Path, kept_path: Path, ids: Collection[str]) -> int:
    """Rewrite the kept file: the first usable exact-match first attempt of each id in ``ids``; returns the count.

    Written to a temporary file that replaces the old one, so a reader never sees a half-written file.
    """
    staging = kept_path.with_name(f".{kept_path.name}.tmp")
    seen: set[str] = set()
    unusable = 0
    try:
        with staging.open("wb") as target, log_path.open("rb") as source:
            for line in source:
                row = _complete_row(line)
                if not _exact_first_attempt(row, ids) or row["id"] in seen:
                    continue
                if not _segmentable(row.get("trajectory")):
                    unusable += 1
                    continue
                seen.add(row["id"])
                target.write(line)
        os.replace(staging, kept_path)
    finally:
        staging.unlink(missing_ok=True)  # only left when something failed before the rename
    if unusable:
        logger.info("%d exact-match trajectories break the tag protocol (a format reminder, or <information> "
                    "written by the teacher) and are not kept", unusable)
    return len(seen)


def _exact_first_attempt(row: dict[str, Any] | None, ids: Collection[str]) -> bool:
    return bool(row) and row.get("attempt") == 0 and row.get("em") == 1 and row.get("id") in ids


def _segmentable(trajectory: Any) -> bool:
    """Whether ``ragr1-data sft`` can cut the trajectory into samples (its own check, so the two agree)."""
    # Imported here: the module imports torch, which only this check needs.
    from ragr1_verl.sft.dataset import TrajectoryError, split_trajectory

    if not isinstance(trajectory, str):
        return False
    try:
        split_trajectory(trajectory)
    except TrajectoryError:
        return False
    return True


def _complete_row(line: bytes) -> dict[str, Any] | None:
    # The log was checked and repaired when the run started; skipping is only for a line that is not finished.
    if not line.endswith(b"\n"):
        return None
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) else None


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 5] + "...'"


def check_manifest(path: Path, settings: Mapping[str, Any]) -> None:
    """Record the run's settings, or refuse a folder whose trajectories were made with other ones.

    Settings the folder has not seen yet (a first run with ``--select-rl-data``) are added.
    """
    recorded: dict[str, Any] = {}
    if path.exists():
        try:
            recorded = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            raise DataError(f"{path}: not valid JSON") from None
        if not isinstance(recorded, dict):
            raise DataError(f"{path}: expected a JSON object")
    for name, value in settings.items():
        if name in recorded and recorded[name] != value:
            raise DataError(f"{where(path, field=name)}: the trajectories in {path.parent} were made with "
                            f"{_short(recorded[name])}, this run asks for {_short(value)}; use another --out or "
                            "the same settings")
    merged = {**recorded, **settings}
    if merged != recorded:
        staging = path.with_name(f".{path.name}.tmp")
        staging.write_text(json.dumps(merged, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(staging, path)
