"""Generation backends for ``ragr1-eval``, behind the agent loop's token-in/token-out interface.

``RagR1AgentLoop`` calls ``server_manager.generate(request_id, prompt_ids=..., sampling_params=...)`` and
reads ``token_ids`` and ``log_probs`` of the answer, exactly as in training. Two backends provide that call:

- :class:`OpenAIBackend`: an OpenAI-compatible ``/v1/completions`` server (vLLM or SGLang serving a
  checkpoint). The prompt goes out as token ids; the completion comes back as token ids when the server
  offers them (vLLM's ``return_token_ids``, or ``token_id:N`` logprob tokens), else its text is tokenized.
- :class:`TransformersBackend`: a local transformers model, CPU or GPU, one generation at a time in a
  thread so the event loop (and the retriever client) keeps running.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from verl.workers.rollout.replica import TokenOutput

logger = logging.getLogger(__name__)

_TOKEN_ID = re.compile(r"^token_id:(\d+)$")


class BackendError(RuntimeError):
    """The generation backend could not produce a completion (after its retries)."""


@dataclass(frozen=True)
class Sampling:
    """The sampling settings of one generation call, from the loop's ``sampling_params``."""

    max_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...]

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> Sampling:
        return cls(max_tokens=int(params["max_tokens"]), temperature=float(params.get("temperature", 1.0)),
                   top_p=float(params.get("top_p", 1.0)), stop=tuple(params.get("stop") or ()))


def completion_ids(choice: dict[str, Any], tokenizer: Any, stop: Sequence[str]) -> list[int]:
    """The completion's token ids from an OpenAI ``choices[0]``: given by the server, or by tokenizing.

    A server that drops the matched stop string from the text (OpenAI's default) gets it appended back, so
    the loop sees ``</search>`` as the model wrote it.
    """
    if isinstance(choice.get("token_ids"), list):
        return [int(token) for token in choice["token_ids"]]
    tokens = (choice.get("logprobs") or {}).get("tokens")
    if tokens and all(_TOKEN_ID.match(str(token)) for token in tokens):
        return [int(_TOKEN_ID.match(str(token)).group(1)) for token in tokens]
    text = str(choice.get("text", ""))
    matched = choice.get("stop_reason")
    if isinstance(matched, str) and matched in stop and not text.endswith(matched):
        text += matched
    return tokenizer.encode(text, add_special_tokens=False)


class OpenAIBackend:
    """Completions from an OpenAI-compatible server, prompt and completion as token ids where possible."""

    def __init__(self, base_url: str, model: str, tokenizer: Any, *, api_key: str | None = None,
                 timeout_s: float = 600.0, max_retries: int = 3):
        self.url = base_url.rstrip("/").removesuffix("/v1") + "/v1/completions"
        self.model, self.tokenizer, self.max_retries = model, tokenizer, max_retries
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout_s = timeout_s
        self._session = None

    async def generate(self, request_id: str, *, prompt_ids: list[int], sampling_params: dict[str, Any],
                       **_: Any) -> TokenOutput:
        sampling = Sampling.from_params(sampling_params)
        body = {
            "model": self.model, "prompt": list(prompt_ids), "max_tokens": sampling.max_tokens,
            "temperature": sampling.temperature, "top_p": sampling.top_p, "stop": list(sampling.stop) or None,
            # vLLM: keep the stop string and return token ids; SGLang: keep the stop string. Others ignore them.
            "include_stop_str_in_output": True, "no_stop_trim": True, "return_token_ids": True,
            "skip_special_tokens": False,
        }
        choice = (await self._post(body))["choices"][0]
        return TokenOutput(token_ids=completion_ids(choice, self.tokenizer, sampling.stop),
                           stop_reason="completed")

    async def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        error = "no attempt"
        for attempt in range(self.max_retries + 1):
            if attempt:
                await asyncio.sleep(min(30.0, 2.0 ** attempt))
            try:
                async with self._session.post(self.url, json=body, headers=self.headers) as response:
                    if response.status == 200:
                        return await response.json()
                    error = f"HTTP {response.status}: {(await response.text())[:300]}"
                    if response.status < 500 and response.status != 429:
                        break  # the request itself is wrong: retrying will not help
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                error = f"{type(exc).__name__}: {exc}"
        raise BackendError(f"{self.url}: {error}")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class TransformersBackend:
    """Greedy or sampled generation with a local transformers model, with stop strings and logprobs."""

    def __init__(self, model: Any, tokenizer: Any):
        self.model, self.tokenizer = model, tokenizer
        self._lock = threading.Lock()  # one generate() at a time: the model is not re-entrant

    async def generate(self, request_id: str, *, prompt_ids: list[int], sampling_params: dict[str, Any],
                       **_: Any) -> TokenOutput:
        sampling = Sampling.from_params(sampling_params)
        ids, logprobs = await asyncio.to_thread(self._generate, list(prompt_ids), sampling)
        return TokenOutput(token_ids=ids, log_probs=logprobs, stop_reason="completed")

    def _generate(self, prompt_ids: list[int], sampling: Sampling) -> tuple[list[int], list[float]]:
        import torch

        sampled = sampling.temperature > 0
        options = {"do_sample": sampled, "max_new_tokens": sampling.max_tokens,
                   "return_dict_in_generate": True, "output_logits": True,
                   "pad_token_id": self.tokenizer.pad_token_id or self.tokenizer.eos_token_id}
        if sampled:
            options.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
        if sampling.stop:
            options.update(stop_strings=list(sampling.stop), tokenizer=self.tokenizer)
        inputs = torch.tensor([prompt_ids], device=self.model.device)
        with self._lock, torch.inference_mode():
            output = self.model.generate(inputs, attention_mask=torch.ones_like(inputs), **options)
        ids = output.sequences[0, len(prompt_ids):].tolist()
        logprobs = [torch.log_softmax(step[0].float(), dim=-1)[token].item()
                    for step, token in zip(output.logits, ids, strict=False)]
        ids, logprobs = _without_padding(ids, logprobs, options["pad_token_id"], self.tokenizer.eos_token_id)
        return ids, logprobs

    async def close(self) -> None:
        return None


def _without_padding(ids: list[int], logprobs: list[float], pad_id: int | None,
                     eos_id: int | None) -> tuple[list[int], list[float]]:
    """Drop the padding a finished sequence may carry (never the EOS itself)."""
    end = len(ids)
    while end > 0 and ids[end - 1] == pad_id and pad_id != eos_id:
        end -= 1
    return ids[:end], logprobs[:end]
