"""Token-in/token-out generation with plain transformers: what the CPU rollout server runs.

It follows the contract verl's rollout servers (vLLM) give agent loops: the prompt arrives as token ids, the
answer is the generated token ids with the log-probability of each, and generation stops at EOS (the token is
kept), at a stop token id, at ``max_tokens``, or at the token in which a stop string is completed (that token
is kept whole; a stop string can end inside a token). Requests that arrive together are decoded as one
left-padded batch with a KV cache, which on a CPU costs little more than one sequence.

Log-probabilities are taken from ``log_softmax(logits / temperature)`` over the full vocabulary (greedy
requests use temperature 1), the distribution verl's actor recomputes; top-p and top-k only shape sampling.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

logger = logging.getLogger(__name__)

# Sampling keys understood here; the others verl or agent loops may send are accepted and ignored when they
# are at their neutral value, and logged once otherwise.
_NEUTRAL = {"repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "min_p": 0.0, "n": 1}
_IGNORED = {"include_stop_str_in_output", "skip_special_tokens", "detokenize", "spaces_between_special_tokens"}
_warned: set[str] = set()


@dataclass(frozen=True)
class SamplingSettings:
    """One request's decoding settings (vLLM's names; ``max_new_tokens`` is accepted for ``max_tokens``)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = True
    seed: int | None = None

    @classmethod
    def from_request(cls, params: Mapping[str, Any], default_max_tokens: int) -> SamplingSettings:
        params = dict(params)
        max_tokens = params.pop("max_tokens", None)
        max_tokens = max_tokens or params.pop("max_new_tokens", None) or default_max_tokens
        params.pop("max_new_tokens", None)
        stop = params.pop("stop", None) or ()
        logprobs = params.pop("logprobs", True)  # vLLM: a count of extra top logprobs; 0 still gives the token's
        settings = cls(
            max_tokens=int(max_tokens),
            temperature=float(params.pop("temperature", 1.0)),
            top_p=float(params.pop("top_p", 1.0)),
            top_k=int(params.pop("top_k", -1) or -1),
            stop=(stop,) if isinstance(stop, str) else tuple(stop),
            stop_token_ids=tuple(int(t) for t in params.pop("stop_token_ids", None) or ()),
            ignore_eos=bool(params.pop("ignore_eos", False)),
            logprobs=logprobs is not None and logprobs is not False,
            seed=params.pop("seed", None),
        )
        _note_unsupported(params)
        if settings.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {settings.max_tokens}")
        return settings

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


def _note_unsupported(params: Mapping[str, Any]) -> None:
    for name, value in params.items():
        if name in _IGNORED or _NEUTRAL.get(name, object()) == value or name in _warned:
            continue
        _warned.add(name)
        logger.warning("the CPU rollout ignores the sampling setting %s=%r", name, value)


@dataclass
class Generation:
    """A finished request: generated ids, their log-probabilities, and why it stopped (``stop``/``length``)."""

    token_ids: list[int] = field(default_factory=list)
    log_probs: list[float] = field(default_factory=list)
    finish_reason: str = "length"


@dataclass
class _Row:
    settings: SamplingSettings
    rng: torch.Generator
    output: Generation = field(default_factory=Generation)
    done: bool = False


def eos_token_ids(tokenizer: Any, generation_config: Any = None) -> frozenset[int]:
    """The ids that end a turn: the tokenizer's EOS and the model's generation-config EOS ids."""
    ids: set[int] = set()
    for value in (getattr(tokenizer, "eos_token_id", None), getattr(generation_config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, Iterable):
            ids.update(int(v) for v in value)
    return frozenset(ids)


class TransformersGenerator:
    """Batched autoregressive decoding of a causal LM (any ``AutoModelForCausalLM``) on token ids."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, eos_ids: Iterable[int] | None = None,
                 pad_token_id: int | None = None, seed: int = 0):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.eos_ids = frozenset(eos_ids) if eos_ids is not None else eos_token_ids(
            tokenizer, getattr(model, "generation_config", None))
        pad = pad_token_id if pad_token_id is not None else getattr(tokenizer, "pad_token_id", None)
        self.pad_token_id = pad if pad is not None else min(self.eos_ids, default=0)
        self.rng = torch.Generator().manual_seed(seed)

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]], settings: Sequence[SamplingSettings]) -> list[Generation]:
        """Decode every prompt with its settings; one batch, stopping when every row is done."""
        if len(prompts) != len(settings):
            raise ValueError("one SamplingSettings per prompt is needed")
        if any(len(prompt) == 0 for prompt in prompts):
            raise ValueError("an empty prompt cannot be continued")
        rows = [_Row(s, self.rng if s.seed is None else torch.Generator().manual_seed(int(s.seed)))
                for s in settings]
        input_ids, attention = self._left_pad(prompts)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=True)
        next_position = positions[:, -1:] + 1
        for _ in range(max(s.max_tokens for s in settings)):
            tokens = self._choose(out.logits[:, -1, :].float(), rows)
            if all(row.done for row in rows):
                break
            attention = torch.cat([attention, attention.new_ones((len(rows), 1))], dim=-1)
            out = self.model(input_ids=tokens[:, None], attention_mask=attention, position_ids=next_position,
                             past_key_values=out.past_key_values, use_cache=True)
            next_position = next_position + 1
        return [row.output for row in rows]

    def _left_pad(self, prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(prompt) for prompt in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
            attention[row, width - len(prompt):] = 1
        return input_ids, attention

    def _choose(self, logits: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
        """Pick each live row's next token, record it, and update the row's state; returns the batch's tokens."""
        tokens = torch.full((len(rows),), self.pad_token_id, dtype=torch.long)
        for index, row in enumerate(rows):
            if row.done:
                continue
            token, logprob = self._sample(logits[index], row)
            tokens[index] = token
            row.output.token_ids.append(token)
            row.output.log_probs.append(logprob)
            self._update_done(row)
        return tokens

    @staticmethod
    def _sample(logits: torch.Tensor, row: _Row) -> tuple[int, float]:
        settings = row.settings
        temperature = 1.0 if settings.greedy else settings.temperature
        logprobs = torch.log_softmax(logits / temperature, dim=-1)
        if settings.greedy:
            token = int(torch.argmax(logprobs))
        else:
            token = int(torch.multinomial(_filtered_probs(logprobs, settings), 1, generator=row.rng))
        return token, float(logprobs[token])

    def _update_done(self, row: _Row) -> None:
        output, settings = row.output, row.settings
        last = output.token_ids[-1]
        if ((last in self.eos_ids and not settings.ignore_eos) or last in settings.stop_token_ids
                or (settings.stop and self._ends_with_stop(output.token_ids, settings.stop))):
            row.done, output.finish_reason = True, "stop"
        elif len(output.token_ids) >= settings.max_tokens:
            row.done, output.finish_reason = True, "length"

    def _ends_with_stop(self, token_ids: list[int], stops: tuple[str, ...]) -> bool:
        """A stop string completed by the newest token. Earlier tokens were checked when they came, so any stop
        string in a short decoded tail ends here; each token of an ASCII stop string adds at least a character."""
        window = max(len(stop) for stop in stops) + 4
        tail = self.tokenizer.decode(token_ids[-window:], skip_special_tokens=True)
        return any(stop in tail for stop in stops)


def _filtered_probs(logprobs: torch.Tensor, settings: SamplingSettings) -> torch.Tensor:
    """The sampling distribution after top-k and top-p (nucleus) filtering."""
    probs = logprobs.exp()
    if 0 < settings.top_k < probs.numel():
        threshold = torch.topk(probs, settings.top_k).values[-1]
        probs = torch.where(probs >= threshold, probs, torch.zeros_like(probs))
    if settings.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = sorted_probs.cumsum(-1) / sorted_probs.sum()
        drop = cumulative - sorted_probs / sorted_probs.sum() >= settings.top_p  # keep the token crossing top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    total = probs.sum()
    if not math.isfinite(float(total)) or total <= 0:
        raise FloatingPointError("the sampling distribution is empty or not finite")
    return probs / total
