"""``RagR1SFTDataset``: stage-1 (format-learning) SFT on whole teacher trajectories, retrieved text masked.

The paper cuts every teacher trajectory into up to four kinds of samples, so that retrieved documents are
never a training target (:class:`SampleKind`). Here each trajectory is one sequence instead: the prompt, then
the model-written segments (trained) and the ``<information>`` blocks (masked), laid out exactly as the
stage-2 rollout (:mod:`ragr1_verl.agent_loop`) lays them out:

- the prompt is the chat template applied to the prompt messages with ``add_generation_prompt=True``;
- every model segment (``<think>...`` up to and including ``</search>`` or ``</answer>``) and every
  observation (``"\\n<information>\\n...\\n</information>\\n"``, :func:`ragr1_verl.protocol.wrap_information`)
  is encoded on its own and the token ids are concatenated;
- after the final ``</answer>``, the tokenizer's EOS token is appended as a target (``data.eos_after_answer``,
  default true), so that the model also stops where no stop strings are used.

Every model segment is then trained exactly once, with the same context as in the paper's samples: the loss
is the sum of the four sample kinds' losses without repeating the shared prefixes.

Use it with verl's SFT trainer (``python -m verl.trainer.sft_trainer``)::

    data.custom_cls.path=pkg://ragr1_verl.sft.dataset data.custom_cls.name=RagR1SFTDataset

Parquet columns read (``ragr1-data sft`` writes them): ``prompt`` (chat messages; ``data.prompt_key``) and
``trajectory`` (the assistant text, observations included; ``data.trajectory_key``). The ``data.*`` settings
of verl's ``MultiTurnSFTDataset`` that apply to text are honoured: ``pad_mode`` (``no_padding`` or
``right``), ``max_length``, ``truncation`` (``error``, ``left``, ``right``), ``apply_chat_template_kwargs``,
``shuffle``/``seed`` with ``max_samples``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import torch
from torch.utils.data import Dataset

from ragr1_verl import verl_compat
from ragr1_verl.protocol.actions import INFORMATION_CLOSE, INFORMATION_OPEN, parse_action
from ragr1_verl.protocol.observation import policy_codec, wrap_information
from ragr1_verl.records import DataError, where

logger = logging.getLogger(__name__)

PAD_MODES = ("no_padding", "right")
TRUNCATIONS = ("error", "left", "right")


class TrajectoryError(ValueError):
    """A trajectory that does not follow the tag protocol; the message says where it breaks."""


class SampleKind(IntEnum):
    """The paper's four SFT sample kinds, by the model segment they train."""

    ANSWER_DIRECTLY = 1
    SEARCH = 2
    ANSWER_AFTER_INFORMATION = 3
    SEARCH_AGAIN = 4


@dataclass(frozen=True)
class Segment:
    """One piece of a trajectory, encoded on its own: a model segment (``kind`` set) or an observation."""

    text: str
    kind: SampleKind | None = None

    @property
    def trained(self) -> bool:
        return self.kind is not None


@dataclass(frozen=True)
class Trajectory:
    """A trajectory cut into model segments and observations; ``answered`` when it ends with ``</answer>``."""

    segments: tuple[Segment, ...]
    answered: bool

    @property
    def kinds(self) -> list[int]:
        return [int(segment.kind) for segment in self.segments if segment.kind is not None]

    @property
    def searches(self) -> int:
        return sum(segment.kind in (SampleKind.SEARCH, SampleKind.SEARCH_AGAIN) for segment in self.segments)

    @property
    def text(self) -> str:
        """The trajectory as the rollout would have produced it (observation whitespace normalised)."""
        return "".join(segment.text for segment in self.segments)


def split_trajectory(text: str) -> Trajectory:
    """Cut an assistant text into model segments and ``<information>`` observations.

    Each model segment runs to the end of its first ``<search>...</search>`` or ``<answer>...</answer>``
    (:func:`ragr1_verl.protocol.parse_action`, as the rollout does); a search is followed by an observation
    or ends the text, an answer ends the text. Whitespace between ``</search>`` and ``<information>`` and
    around the observation's body is normalised to the rollout's wrapper; text the model wrote after an
    observation is kept as it is.

    Raises:
        TrajectoryError: a turn without a search or answer, a model segment containing ``<information>``,
            a search followed by something else than ``<information>``, an unclosed block, text after the
            answer, or an empty text.
    """
    if not text.strip():
        raise TrajectoryError("the trajectory is empty")
    segments: list[Segment] = []
    rest, position = text, 0
    while True:
        action = parse_action(rest)
        if action.kind == "invalid":
            raise TrajectoryError(f"at character {position}: a model turn without a complete <search> or "
                                  "<answer>")
        model_text = rest[:action.end]
        if INFORMATION_OPEN in model_text or INFORMATION_CLOSE in model_text:
            raise TrajectoryError(f"at character {position}: an <information> tag inside a model turn (the "
                                  "model must not write retrieved text itself)")
        segments.append(Segment(model_text, _kind(action.kind, segments)))
        rest, position = rest[action.end:], position + action.end
        if action.kind == "answer":
            if rest.strip():
                raise TrajectoryError(f"at character {position}: text after the final </answer>")
            return Trajectory(tuple(segments), answered=True)
        if not rest.strip():
            return Trajectory(tuple(segments), answered=False)
        observation, consumed = _take_observation(rest, position)
        segments.append(Segment(observation))
        rest, position = rest[consumed:], position + consumed


def _kind(action: str, previous: Sequence[Segment]) -> SampleKind:
    after_information = any(not segment.trained for segment in previous)
    if action == "answer":
        return SampleKind.ANSWER_AFTER_INFORMATION if after_information else SampleKind.ANSWER_DIRECTLY
    return SampleKind.SEARCH_AGAIN if after_information else SampleKind.SEARCH


def _take_observation(rest: str, position: int) -> tuple[str, int]:
    """The observation after a search, in the rollout's form, and how many characters of ``rest`` it used."""
    start = len(rest) - len(rest.lstrip())
    if not rest.startswith(INFORMATION_OPEN, start):
        raise TrajectoryError(f"at character {position + start}: a search must be followed by "
                              f"{INFORMATION_OPEN}")
    body_start = start + len(INFORMATION_OPEN)
    close = rest.find(INFORMATION_CLOSE, body_start)
    if close < 0:
        raise TrajectoryError(f"at character {position + start}: {INFORMATION_OPEN} is never closed")
    body = rest[body_start:close]
    # The wrapper's own newlines, not the body's: re-wrapping restores exactly the rollout's layout.
    body = body.removeprefix("\n").removesuffix("\n")
    end = close + len(INFORMATION_CLOSE)
    end += rest.startswith("\n", end)
    return wrap_information(body), end


@dataclass(frozen=True)
class TokenizedTrajectory:
    """Token ids and loss mask of one row before truncation and padding."""

    input_ids: list[int]
    loss_mask: list[int]
    prompt_length: int


@dataclass(frozen=True)
class _Row:
    prompt: list[dict[str, str]]
    trajectory: Trajectory


class RagR1SFTDataset(Dataset):
    """Stage-1 SFT rows for verl's SFT trainer: loss on the model-written tokens of each trajectory only.

    Args:
        parquet_files: one or more parquet files with the ``prompt`` and ``trajectory`` columns.
        tokenizer: the policy's tokenizer (or a path to it).
        config: verl's ``data`` config section (see the module docstring for the keys read).
        processor: unused (text only); accepted because verl's ``create_sft_dataset`` passes it.
        max_samples: keep at most this many rows (-1: all), chosen as verl's SFT dataset does.
    """

    def __init__(self, parquet_files: str | Sequence[str], tokenizer: Any, config: Any = None,
                 processor: Any = None, max_samples: int = -1):
        config = config if config is not None else {}
        self.pad_mode = str(config.get("pad_mode", "no_padding"))
        self.truncation = str(config.get("truncation", "error"))
        if self.pad_mode not in PAD_MODES or self.truncation not in TRUNCATIONS:
            raise ValueError(f"data.pad_mode must be one of {PAD_MODES} and data.truncation one of "
                             f"{TRUNCATIONS}; got {self.pad_mode!r} and {self.truncation!r}")
        self.max_length = int(config.get("max_length", 1024))
        self.prompt_key = str(config.get("prompt_key", "prompt"))
        self.trajectory_key = str(config.get("trajectory_key", "trajectory"))
        self.eos_after_answer = bool(config.get("eos_after_answer", True))
        self.chat_template_kwargs = dict(config.get("apply_chat_template_kwargs", None) or {})
        self.tokenizer = _load_tokenizer(tokenizer)
        self._codec = policy_codec(self.tokenizer)
        if self.eos_after_answer and self.tokenizer.eos_token_id is None:
            raise ValueError("data.eos_after_answer is set but the tokenizer has no EOS token")
        files = [parquet_files] if isinstance(parquet_files, str | os.PathLike) else list(parquet_files)
        rows = [row for path in files for row in _read_rows(path, self.prompt_key, self.trajectory_key)]
        self.rows = _subsample(rows, max_samples, bool(config.get("shuffle", False)), config.get("seed"))
        logger.info("RagR1SFTDataset: %d trajectories from %d file(s)", len(self.rows), len(files))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        encoded = self.encode(index)
        input_ids, loss_mask = self._truncate(index, encoded.input_ids, encoded.loss_mask)
        if self.pad_mode == "no_padding":
            return {
                "input_ids": torch.tensor(input_ids, dtype=torch.long),
                "position_ids": torch.arange(len(input_ids), dtype=torch.long),
                "loss_mask": torch.tensor(loss_mask, dtype=torch.long),
            }
        return self._right_padded(input_ids, loss_mask)

    def encode(self, index: int) -> TokenizedTrajectory:
        """The row's token ids and loss mask (1 on model-written tokens), before truncation and padding."""
        row = self.rows[index]
        input_ids = self.prompt_ids(row.prompt)
        prompt_length = len(input_ids)
        loss_mask = [0] * prompt_length
        for segment in row.trajectory.segments:
            ids = self._encode_text(segment.text)
            input_ids.extend(ids)
            loss_mask.extend([int(segment.trained)] * len(ids))
        if self.eos_after_answer and row.trajectory.answered:
            input_ids.append(self.tokenizer.eos_token_id)
            loss_mask.append(1)
        return TokenizedTrajectory(input_ids, loss_mask, prompt_length)

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """The prompt as the agent loop builds it: the chat template with the generation prompt."""
        rendered = verl_compat.apply_chat_template(self.tokenizer, messages, tokenize=True, add_generation_prompt=True,
                                       **self.chat_template_kwargs)
        return list(verl_compat.normalize_token_ids(rendered))

    def _encode_text(self, text: str) -> list[int]:
        return self._codec.encode(text)  # the agent loop's encoder call (the Rust tokenizer when there is one)

    def _truncate(self, index: int, input_ids: list[int],
                  loss_mask: list[int]) -> tuple[list[int], list[int]]:
        if len(input_ids) <= self.max_length:
            return input_ids, loss_mask
        if self.truncation == "error":
            raise ValueError(f"SFT row {index}: {len(input_ids)} tokens, more than data.max_length="
                             f"{self.max_length} (set data.truncation=right or left, or raise "
                             "data.max_length)")
        if self.truncation == "left":
            return input_ids[-self.max_length:], loss_mask[-self.max_length:]
        return input_ids[:self.max_length], loss_mask[:self.max_length]

    def _right_padded(self, input_ids: list[int], loss_mask: list[int]) -> dict[str, torch.Tensor]:
        padding = self.max_length - len(input_ids)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        return {
            "input_ids": torch.tensor(input_ids + [pad_id] * padding, dtype=torch.long),
            "attention_mask": torch.tensor([1] * len(input_ids) + [0] * padding, dtype=torch.long),
            "position_ids": torch.tensor(list(range(len(input_ids))) + [0] * padding, dtype=torch.long),
            "loss_mask": torch.tensor(loss_mask + [0] * padding, dtype=torch.long),
        }


def _load_tokenizer(tokenizer: Any) -> Any:
    if isinstance(tokenizer, str | os.PathLike):
        return verl_compat.hf_tokenizer(str(tokenizer))
    return tokenizer


def _read_rows(path: str | os.PathLike[str], prompt_key: str, trajectory_key: str) -> list[_Row]:
    """Every row of one parquet file, checked up front so a bad row fails here and not mid-training."""
    import pyarrow.parquet as pq
    local = verl_compat.copy_local_path_from_hdfs(str(path), verbose=False)
    columns = pq.read_schema(local).names
    for key in (prompt_key, trajectory_key):
        if key not in columns:
            raise DataError(f"{where(path, field=key)}: no such column (columns: {', '.join(columns)})")
    table = pq.read_table(local, columns=[prompt_key, trajectory_key])
    prompts, trajectories = table.column(prompt_key).to_pylist(), table.column(trajectory_key).to_pylist()
    return [_row(path, number, prompt, text, prompt_key, trajectory_key)
            for number, (prompt, text) in enumerate(zip(prompts, trajectories, strict=True), start=1)]


def _row(path: Any, number: int, prompt: Any, text: Any, prompt_key: str, trajectory_key: str) -> _Row:
    messages = prompt_messages(prompt)
    if messages is None:
        raise DataError(f"{where(path, number, prompt_key)}: expected a non-empty list of "
                        "{role, content} chat messages")
    if not isinstance(text, str):
        raise DataError(f"{where(path, number, trajectory_key)}: expected a string")
    try:
        trajectory = split_trajectory(text)
    except TrajectoryError as error:
        raise DataError(f"{where(path, number, trajectory_key)}: {error}") from None
    return _Row(messages, trajectory)


def prompt_messages(value: Any) -> list[dict[str, str]] | None:
    """Chat messages as ``{role, content}`` dicts (other keys dropped), or None when ``value`` is not that."""
    if not isinstance(value, list | tuple) or not value:
        return None
    messages = []
    for message in value:
        if not isinstance(message, dict):
            return None
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            return None
        messages.append({"role": role, "content": content})
    return messages


def _subsample(rows: list[_Row], max_samples: int, shuffle: bool, seed: Any) -> list[_Row]:
    """At most ``max_samples`` rows: a seeded random choice when shuffling, else the first ones (as verl)."""
    if max_samples is None or max_samples <= 0 or max_samples >= len(rows):
        return rows
    if not shuffle:
        return rows[:max_samples]
    import numpy as np

    generator = np.random.default_rng(*(() if seed is None else (int(seed),)))
    return [rows[index] for index in generator.choice(len(rows), size=max_samples, replace=False).tolist()]
