"""Generation backends for ``ragr1-eval``, behind the agent loop's token-in/token-out interface.

``RagR1AgentLoop`` calls ``server_manager.generate(request_id, prompt_ids=..., sampling_params=...)`` and
reads ``token_ids`` and ``log_probs`` of the answer, exactly as in training. Two backends provide that call:

- :class:`OpenAIBackend`: an OpenAI-compatible ``/v1/completions`` server (vLLM or SGLang serving a
  checkpoint), through the teacher's HTTP client (retries with jitter). The prompt goes out as token ids;
  the completion comes back as token ids when the server offers them (``return_token_ids``: vLLM >= 0.10.2,
  SGLang), else its text is tokenized.
- :class:`TransformersBackend`: a local transformers model, CPU or GPU, one generation at a time in a
  thread so the event loop (and the retriever client) keeps running.
- :class:`BatchedCPUBackend`: a local model on the CPU, the questions in flight decoded together as one
  left-padded batch by the CPU rollout's generation server (the one verl's trainer uses on CPU), so that
  evaluating many questions costs little more than one.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass
from typing import Any

from ragr1_verl.openai_client import OpenAIClient, TeacherError, TeacherSettings, restore_stop
from ragr1_verl.verl_compat import TokenOutput

logger = logging.getLogger(__name__)

class BackendError(RuntimeError):
    """The generation backend could not produce a completion."""


@dataclass(frozen=True)
class Sampling:
    """The sampling settings of one generation call, from the loop's ``sampling_params``."""

    max_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    top_k: int = -1  # -1: off
    repetition_penalty: float = 1.0

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> Sampling:
        return cls(max_tokens=int(params["max_tokens"]), temperature=float(params.get("temperature", 1.0)),
                   top_p=float(params.get("top_p", 1.0)), stop=tuple(params.get("stop") or ()),
                   top_k=int(params.get("top_k", -1)), repetition_penalty=float(params.get("repetition_penalty", 1.0)))

    def extra_body(self) -> dict[str, Any]:
        """vLLM's and SGLang's sampling extensions, sent only when they change something (a plain OpenAI
        server may refuse unknown fields)."""
        extra: dict[str, Any] = {}
        if self.top_k > 0:
            extra["top_k"] = self.top_k
        if self.repetition_penalty != 1.0:
            extra["repetition_penalty"] = self.repetition_penalty
        return extra


def completion_ids(choice: dict[str, Any], tokenizer: Any) -> list[int]:
    """The completion's token ids from an OpenAI ``choices[0]``: as the server returned them (vLLM >= 0.10.2,
    SGLang: ``return_token_ids``), else its text tokenized, with a stop string the server cut put back."""
    if isinstance(choice.get("token_ids"), list):
        return [int(token) for token in choice["token_ids"]]
    text = choice.get("text")
    if not isinstance(text, str):
        raise BackendError(f"a completion without text or token ids: {str(choice)[:200]}")
    completion = restore_stop(text, str(choice.get("finish_reason") or "stop"), choice)
    return tokenizer.encode(completion.text, add_special_tokens=False)


class OpenAIBackend:
    """Completions from an OpenAI-compatible server (vLLM, SGLang), prompt and completion as token ids."""

    def __init__(self, base_url: str, model: str, tokenizer: Any, *, api_key: str | None = None,
                 seed: int | None = None, timeout_s: float = 600.0, max_retries: int = 3):
        self.tokenizer, self.seed = tokenizer, seed
        self.client = OpenAIClient(TeacherSettings(base_url=base_url, model=model, api_key=api_key,
                                                   timeout_s=timeout_s, max_retries=max_retries,
                                                   role="model server"))

    async def generate(self, request_id: str, *, prompt_ids: list[int], sampling_params: dict[str, Any],
                       **_: Any) -> TokenOutput:
        sampling = Sampling.from_params(sampling_params)
        body = {
            "model": self.client.settings.model, "prompt": list(prompt_ids), "max_tokens": sampling.max_tokens,
            "temperature": sampling.temperature, "top_p": sampling.top_p, "stop": list(sampling.stop) or None,
            # vLLM keeps the stop string with include_stop_str_in_output, SGLang with no_stop_trim; both return
            # the generated ids with return_token_ids. Servers without these fall back to the text.
            "include_stop_str_in_output": True, "no_stop_trim": True, "return_token_ids": True,
            "skip_special_tokens": False, **sampling.extra_body(),
        }
        if self.seed is not None:
            body["seed"] = self.seed
        try:
            payload = await self.client.post(body)
        except TeacherError as error:
            raise BackendError(str(error)) from None
        choices = payload.get("choices") if isinstance(payload, dict) else None
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise BackendError(f"{self.client.settings.endpoint} answered without choices: {str(payload)[:200]}")
        return TokenOutput(token_ids=completion_ids(choices[0], self.tokenizer), stop_reason="completed")

    async def close(self) -> None:
        await self.client.close()


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
            options.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=max(0, sampling.top_k),
                           repetition_penalty=sampling.repetition_penalty)
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


class BatchedCPUBackend:
    """The ``hf_cpu`` rollout's generation server, run in this process: concurrent requests share a batch."""

    def __init__(self, model_dir: str, *, seed: int = 0, max_batch_size: int = 64):
        from ragr1_verl.cpu.rollout import CPUGenerationServer

        # default_max_tokens is never used: the agent loop sends max_tokens with every request
        self.server = CPUGenerationServer(str(model_dir), default_max_tokens=1, seed=seed,
                                          max_batch_size=max_batch_size)

    async def generate(self, request_id: str, *, prompt_ids: list[int], sampling_params: dict[str, Any],
                       **_: Any) -> TokenOutput:
        return await self.server.generate(list(prompt_ids), sampling_params, request_id=request_id)

    async def close(self) -> None:
        await self.server.close()


def _without_padding(ids: list[int], logprobs: list[float], pad_id: int | None,
                     eos_id: int | None) -> tuple[list[int], list[float]]:
    """Drop the padding a finished sequence may carry (never the EOS itself)."""
    end = len(ids)
    while end > 0 and ids[end - 1] == pad_id and pad_id != eos_id:
        end -= 1
    return ids[:end], logprobs[:end]
