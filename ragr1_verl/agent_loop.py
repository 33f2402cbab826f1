"""``RagR1AgentLoop``: the RAG-R1 multi-turn rollout as a verl agent loop, registered as ``ragr1_agent``.

One trajectory is one assistant turn that grows by generation rounds. In each round the model writes
``<think>...</think>`` and then a search or an answer; generation stops at ``</search>`` / ``</answer>``.
A search is answered inline with ``<information>...</information>`` tokens (response mask 0, logprob 0),
an answer or EOS ends the trajectory, anything else gets a short reminder (mask 0). After ``max_turns``
rounds with search, one last round runs in which a search gets no results. Everything is token-in /
token-out: the model's tokens are never re-tokenized.

verl creates one instance per trajectory, so ``__init__`` only looks up state cached per worker process:
the parsed ``ragr1:`` config, the tokenizer's fixed encodings and the shared retrieval client.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar
from uuid import uuid4

from ragr1_verl.config import ConfigError, RagR1Config, load_config, resolve_prompt_template
from ragr1_verl.protocol.actions import (
    STOP_STRINGS,
    Action,
    parse_action,
    round_outcome,
    rounds_allowed,
    split_queries,
    stop_string_prefix,
)
from ragr1_verl.protocol.observation import (
    INVALID_ACTION_REMINDER,
    ObservationRenderer,
    invalid_search,
    policy_codec,
    retrieval_failed,
)
from ragr1_verl.protocol.prompts import render_prompt
from ragr1_verl.retrieval_client import DEFAULT_RETRIEVER_URL, shared_client
from ragr1_verl.verl_compat import AgentLoopBase, AgentLoopMetrics, AgentLoopOutput, register_agent_loop

logger = logging.getLogger(__name__)

AGENT_NAME = "ragr1_agent"
# Per-round server counters that add up over a trajectory (speculative decoding statistics).
_SUMMED_SERVER_FIELDS = ("spec_num_draft_tokens", "spec_num_accepted_tokens", "spec_num_verify_steps")


def round_sampling_params(sampling_params: dict[str, Any], max_tokens: int, stop_strings: bool) -> dict[str, Any]:
    """What one generation round asks verl's server for: verl's sampling parameters, this round's token
    budget and the protocol's stop strings. vLLM and SGLang both return the stop string's tokens in the
    token ids (they trim only the text), so the round keeps them and trims after the stop string itself."""
    params = dict(sampling_params, max_tokens=max_tokens)
    if stop_strings:
        params["stop"] = list(STOP_STRINGS)
    return params


@dataclass
class TrajectoryStats:
    """Per-trajectory counters, returned in ``extra_fields`` (``ragr1/<name>``) for logging and the reward."""

    turns: int = 0
    searches: int = 0
    queries: int = 0
    duplicates_removed: int = 0
    queries_dropped: int = 0
    invalid_actions: int = 0
    retrieval_failures: int = 0
    trimmed_tokens: int = 0
    answered: bool = False
    budget_hit: bool = False
    truncated: bool = False
    generation_s: float = 0.0
    retrieval_s: float = 0.0
    # What the LLM servers report (weight versions, speculative decoding, preemptions), merged over rounds.
    server_fields: dict[str, Any] = field(default_factory=dict)
    num_preempted: int = -1

    def add_server_output(self, output: Any) -> None:
        """Merge one generation's server fields as verl's stock loops do: weight versions span from the first
        round's ``min_global_steps`` to the last one's ``max_global_steps`` (verl's trainer reads both)."""
        fields = dict(getattr(output, "extra_fields", None) or {})
        if not self.server_fields:
            self.server_fields = fields
        else:
            if fields.get("max_global_steps") is not None:
                self.server_fields["max_global_steps"] = fields["max_global_steps"]
            for key in _SUMMED_SERVER_FIELDS:
                if key in fields and key in self.server_fields:
                    self.server_fields[key] = int(self.server_fields[key]) + int(fields[key])
        preempted = getattr(output, "num_preempted", None)
        if preempted is not None:
            self.num_preempted = max(self.num_preempted, 0) + int(preempted)

    def as_extra_fields(self) -> dict[str, Any]:
        fields = {name: value for name, value in vars(self).items()
                  if not name.endswith("_s") and name not in ("server_fields", "num_preempted")}
        fields["queries_per_search"] = self.queries / self.searches if self.searches else 0.0
        fields["retrieval_ms"] = 1000.0 * self.retrieval_s
        return {**self.server_fields, **{f"ragr1/{name}": value for name, value in fields.items()}}


@dataclass
class _Response:
    """The growing response: token ids, loss mask and rollout logprobs, always the same length."""

    ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    logprobs: list[float] | None = field(default_factory=list)

    def add_generated(self, ids: Sequence[int], logprobs: Sequence[float] | None) -> None:
        self.ids.extend(ids)
        self.mask.extend([1] * len(ids))
        if logprobs is None or len(logprobs) != len(ids):
            self.logprobs = None  # a backend without logprobs: report none rather than misaligned ones
        elif self.logprobs is not None:
            self.logprobs.extend(logprobs)

    def add_observation(self, ids: Sequence[int]) -> None:
        self.ids.extend(ids)
        self.mask.extend([0] * len(ids))
        if self.logprobs is not None:
            self.logprobs.extend([0.0] * len(ids))

    def truncate(self, length: int) -> bool:
        """Cut to ``length`` tokens; True when something was cut."""
        if len(self.ids) <= length:
            return False
        del self.ids[length:], self.mask[length:]
        if self.logprobs is not None:
            del self.logprobs[length:]
        return True


class _TokenizerState:
    """What the loop needs from one tokenizer, computed once per worker process."""

    _by_tokenizer: ClassVar[dict[int, _TokenizerState]] = {}

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        # The Rust tokenizer of a fast tokenizer, called directly: transformers' wrapper costs ~1 ms a search.
        self.codec = policy_codec(tokenizer)
        self.eos_ids = {tokenizer.eos_token_id} - {None}
        self._encoded: dict[str, list[int]] = {}
        self._renderers: dict[RagR1Config, ObservationRenderer] = {}

    @classmethod
    def of(cls, tokenizer: Any) -> _TokenizerState:
        state = cls._by_tokenizer.get(id(tokenizer))
        if state is None or state.tokenizer is not tokenizer:
            state = cls._by_tokenizer[id(tokenizer)] = cls(tokenizer)
        return state

    def decode(self, ids: Sequence[int]) -> str:
        return self.codec.decode(ids)

    def encode(self, text: str) -> list[int]:
        return self.codec.encode(text)

    def renderer(self, config: RagR1Config) -> ObservationRenderer:
        """The observation renderer of ``config`` with this tokenizer's budget, built once per worker."""
        renderer = self._renderers.get(config)
        if renderer is None:
            renderer = self._renderers[config] = config.observation_renderer(self.codec)
        return renderer

    def encode_fixed(self, text: str) -> list[int]:
        """Encodings of the loop's fixed messages (reminders), cached."""
        ids = self._encoded.get(text)
        if ids is None:
            ids = self._encoded[text] = self.encode(text)
        return ids


def observation_ids(tokens: _TokenizerState, config: RagR1Config, queries: Sequence[str],
                    documents: Sequence[Sequence[dict]]) -> list[int]:
    """The tokens of one search's ``<information>`` block: the text the SFT teachers write for it, encoded."""
    return tokens.renderer(config).render_with_ids(queries, documents)[1]


_CONFIGS: dict[int, tuple[Any, RagR1Config, str | None]] = {}


def config_for(trainer_config: Any) -> tuple[RagR1Config, str | None]:
    """The parsed ``ragr1`` section of a trainer config and its prompt template (None: keep the data's prompt).

    Cached per config object: verl hands the same object to every trajectory of a worker.
    """
    cached = _CONFIGS.get(id(trainer_config))
    if cached is not None and cached[0] is trainer_config:
        return cached[1], cached[2]
    section = trainer_config.get("ragr1") if hasattr(trainer_config, "get") else None
    if section is None:
        raise ConfigError(
            "the ragr1_agent loop found no 'ragr1' section in the trainer config. Launch with +recipe=ragr1 "
            "(if `--info defaults` does not list recipe/ragr1, ragr1-verl is not installed in this environment), "
            f"or add the section yourself, e.g. +ragr1.retriever.url={DEFAULT_RETRIEVER_URL}")
    config = load_config(section)
    template = resolve_prompt_template(config.prompt_template, config.mode) if config.prompt_template else None
    _CONFIGS[id(trainer_config)] = (trainer_config, config, template)
    return config, template


@register_agent_loop(AGENT_NAME)
class RagR1AgentLoop(AgentLoopBase):
    """The RAG-R1 rollout. Settings come from the trainer config's ``ragr1:`` section (see ``docs/reference/configuration.md``)."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.pop("tools", None)  # the loop speaks the tag protocol; verl's tool list is not used
        super().__init__(*args, **kwargs)
        self.settings, self.prompt_template = config_for(self.config)
        self.tokens = _TokenizerState.of(self.tokenizer)
        self.response_length = int(self.rollout_config.response_length)
        self.client = shared_client(self.settings.retriever)

    async def run(self, sampling_params: dict[str, Any], **kwargs: Any) -> AgentLoopOutput:
        messages = self._prompt_messages(kwargs.get("raw_prompt"), kwargs.get("extra_info"))
        prompt_ids = await self.ct_build_initial_tokens(messages)
        response, stats = _Response(), TrajectoryStats()
        request_id = uuid4().hex
        rounds = rounds_allowed(self.settings.max_turns, self.settings.final_round)
        for round_number in range(rounds):
            can_search = round_number < self.settings.max_turns
            if not await self._round(request_id, prompt_ids, sampling_params, response, stats, can_search):
                break
        else:  # reached only without a final round: the last search's results were the end
            stats.budget_hit = stats.searches > 0
        stats.truncated = response.truncate(self.response_length) or stats.truncated
        return AgentLoopOutput(
            prompt_ids=prompt_ids,
            response_ids=response.ids,
            response_mask=response.mask,
            response_logprobs=response.logprobs,
            num_turns=1 + stats.turns + stats.searches + stats.invalid_actions,
            metrics=AgentLoopMetrics(generate_sequences=stats.generation_s, tool_calls=stats.retrieval_s,
                                     num_preempted=stats.num_preempted),
            extra_fields=stats.as_extra_fields(),
        )

    async def _round(self, request_id: str, prompt_ids: list[int], sampling_params: dict[str, Any],
                     response: _Response, stats: TrajectoryStats, can_search: bool) -> bool:
        """One generation and its observation; False when the trajectory is over."""
        budget = min(self.settings.max_tokens_per_turn, self.response_length - len(response.ids))
        if budget <= 0:
            stats.truncated = True
            return False
        ids, logprobs, text = await self._generate(request_id, prompt_ids + response.ids, sampling_params, budget,
                                                   stats)
        response.add_generated(ids, logprobs)
        stats.turns += 1
        action = parse_action(text)
        ended = action.kind == "invalid" and self._ended_turn(ids, text, budget)
        outcome = round_outcome(action, ended, can_search)
        if outcome != "continue":
            stats.answered = outcome == "answer"
            stats.budget_hit = outcome == "budget" and action.kind == "search"
            return False
        self._drop_trailing_eos(response, stats)
        observation = await self._observe(action, stats)
        response.add_observation(observation)
        return len(response.ids) < self.response_length

    def _ended_turn(self, ids: list[int], text: str, budget: int) -> bool:
        """The model stopped on its own (EOS or a stop token), not on a stop string or the token cap."""
        if ids and ids[-1] in self.tokens.eos_ids:
            return True
        return len(ids) < budget and not text.rstrip().endswith(STOP_STRINGS)

    def _drop_trailing_eos(self, response: _Response, stats: TrajectoryStats) -> None:
        """A search followed by EOS (a backend without stop strings) continues without the EOS in context."""
        end = len(response.ids)
        while end > 0 and response.mask[end - 1] == 1 and response.ids[end - 1] in self.tokens.eos_ids:
            end -= 1
        stats.trimmed_tokens += len(response.ids) - end
        response.truncate(end)

    async def _generate(self, request_id: str, context_ids: list[int], sampling_params: dict[str, Any],
                        max_tokens: int, stats: TrajectoryStats) -> tuple[list[int], list[float] | None, str]:
        """The round's tokens and logprobs, trimmed at the first stop string, and their decoded text."""
        params = round_sampling_params(sampling_params, max_tokens, self.settings.stop_strings)
        started = time.perf_counter()
        output = await self.server_manager.generate(request_id, prompt_ids=context_ids, sampling_params=params)
        stats.generation_s += time.perf_counter() - started
        stats.add_server_output(output)
        ids, logprobs = list(output.token_ids[:max_tokens]), output.log_probs
        text = self.tokens.decode(ids)
        keep = stop_string_prefix(ids, self.tokens.decode, text=text)
        if keep < len(ids):
            stats.trimmed_tokens += len(ids) - keep
            ids = ids[:keep]
            text = self.tokens.decode(ids)
        return ids, (list(logprobs[:len(ids)]) if logprobs is not None else None), text

    async def _observe(self, action: Action, stats: TrajectoryStats) -> list[int]:
        """The tokens appended after a non-final round: search results, or a reminder of the format."""
        if action.kind != "search":
            stats.invalid_actions += 1
            return self.tokens.encode_fixed(INVALID_ACTION_REMINDER)
        queries = split_queries(action.content, self.settings.query_rules)
        stats.duplicates_removed += queries.duplicates_removed
        stats.queries_dropped += queries.dropped_over_cap
        if queries.error is not None:
            stats.invalid_actions += 1
            return self.tokens.encode(invalid_search(queries.error))
        stats.searches += 1
        stats.queries += len(queries.queries)
        result = await self.client.search(queries.queries, self.settings.topk)
        stats.retrieval_s += result.elapsed_ms / 1000.0
        if not result.ok:
            stats.retrieval_failures += 1
            logger.warning("retrieval failed, the rollout goes on without results: %s", result.error)
            return self.tokens.encode(retrieval_failed(result.error or "unknown error"))
        return observation_ids(self.tokens, self.settings, queries.queries, result.documents)

    def _prompt_messages(self, raw_prompt: Any, extra_info: Any) -> list[dict[str, Any]]:
        """The dataset's chat messages; with ``ragr1.prompt_template`` set, the last user message is re-rendered
        from ``extra_info.question``."""
        if raw_prompt is None:
            raise ValueError("the ragr1_agent loop needs the dataset's 'raw_prompt' (set data.return_raw_chat=true)")
        messages = [dict(message) for message in raw_prompt]
        if self.prompt_template is None:
            return messages
        question = extra_info.get("question") if isinstance(extra_info, dict) else None
        if not question:
            raise ValueError("ragr1.prompt_template is set but the sample has no extra_info.question")
        user_turns = [message for message in messages if message.get("role") == "user"]
        if not user_turns:
            raise ValueError("ragr1.prompt_template is set but the sample's raw_prompt has no user message")
        user_turns[-1]["content"] = render_prompt(question, self.prompt_template)
        return messages
