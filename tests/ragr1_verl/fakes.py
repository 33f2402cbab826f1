"""Test doubles for what CPU cannot run, and a recording retriever.

- :func:`build_tiny_qwen2`: an offline byte-level BPE tokenizer with a ChatML template and a ``Qwen2Config``
  folder, enough for verl's HF model config and its Qwen continuous-token builder.
- :class:`ScriptedLLM`: stands in for verl's ``LLMServerClient``; plays scripted turns token-in/token-out.
- :class:`RecordingRetriever`: a ``/retrieve`` server on loopback that records every request and can be
  told to fail, for exact assertions on what the rollout sends. (The real server is used elsewhere.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.loopback import LoopbackJSONServer

CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] %}{{ message['content'] }}{% endif %}"
    "{% if message.get('tool_calls') %}{% for call in message['tool_calls'] %}"
    "{{ '<tool_call>\\n' + (call['function'] | tojson) + '\\n</tool_call>' }}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TRAINING_TEXT = [
    "<think> I need to look this up </think> <search> Eiffel Tower height, Paris population </search>",
    "<information> Doc 1: \"Eiffel Tower\" The tower is 330 metres tall. </information> <answer> Paris </answer>",
    '<tool_call> {"name": "search", "arguments": {"query_list": ["a", "b"]}} </tool_call>',
]


def build_tiny_qwen2(folder: Path) -> Path:
    """Write a tiny tokenizer and Qwen2 config to ``folder`` (no download, about a second)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(TRAINING_TEXT * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    Qwen2Config(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id, tie_word_embeddings=True,
                architectures=["Qwen2ForCausalLM"]).save_pretrained(folder)
    return folder


def fake_logprob(token_id: int) -> float:
    """The scripted model's logprob of a token: distinct per token id, so misalignment shows."""
    return -(token_id + 1) / 1000.0


@dataclass
class GenerateCall:
    request_id: str
    prompt_ids: list[int]
    sampling_params: dict[str, Any]
    token_ids: list[int] = field(default_factory=list)


class ScriptedLLM:
    """Plays ``script(prompt_text, turn_number) -> str`` as the model's output for each trajectory.

    The text is encoded once and returned as token ids with :func:`fake_logprob` logprobs. With
    ``honor_stop`` it stops after the token that completes a stop string (as vLLM does); ``max_tokens``
    is always honoured.
    """

    def __init__(self, tokenizer: Any, script: Callable[[str, int], str], *, honor_stop: bool = True,
                 server_fields: Callable[[int], dict[str, Any]] | None = None):
        self.tokenizer, self.script, self.honor_stop = tokenizer, script, honor_stop
        self.server_fields = server_fields  # call number -> TokenOutput.extra_fields (weight versions, ...)
        self.calls: list[GenerateCall] = []
        self._first_prompt: dict[str, str] = {}

    async def generate(self, request_id: str, *, prompt_ids: list[int], sampling_params: dict[str, Any],
                       **kwargs: Any):
        from verl.workers.rollout.replica import TokenOutput

        prompt_text = self._first_prompt.setdefault(request_id, self.tokenizer.decode(prompt_ids))
        turn = sum(call.request_id == request_id for call in self.calls)
        ids = self.tokenizer.encode(self.script(prompt_text, turn), add_special_tokens=False)
        if self.honor_stop and sampling_params.get("stop"):
            ids = ids[:self._stop_position(ids, sampling_params["stop"])]
        ids = ids[:sampling_params.get("max_tokens", len(ids))]
        self.calls.append(GenerateCall(request_id, list(prompt_ids), dict(sampling_params), ids))
        extra = self.server_fields(len(self.calls)) if self.server_fields else {}
        return TokenOutput(token_ids=ids, log_probs=[fake_logprob(i) for i in ids], stop_reason="completed",
                           extra_fields=extra)

    def _stop_position(self, ids: list[int], stops: Sequence[str]) -> int:
        for end in range(1, len(ids) + 1):
            if any(stop in self.tokenizer.decode(ids[:end]) for stop in stops):
                return end
        return len(ids)


def scripted(turns_by_marker: dict[str, Sequence[str]]) -> Callable[[str, int], str]:
    """A script choosing the turns by a marker found in the prompt (e.g. the question); empty when done."""

    def script(prompt_text: str, turn: int) -> str:
        for marker, turns in turns_by_marker.items():
            if marker in prompt_text:
                return turns[turn] if turn < len(turns) else ""
        raise AssertionError(f"no script for prompt {prompt_text!r}")

    return script


def fake_documents(query: str, topk: int) -> list[dict]:
    return [{"id": f"{query}#{rank}", "contents": f'"{query.title()} {rank}"\nPassage {rank} about {query}.'}
            for rank in range(1, topk + 1)]


class RecordingRetriever:
    """A ``/retrieve`` server on a free loopback port; ``requests`` holds every JSON body received."""

    def __init__(self):
        self.requests: list[dict] = []
        self.failures_left = 0  # answer this many requests with 503 before serving again
        self._server = LoopbackJSONServer(self._respond)

    def _respond(self, path: str, body: dict) -> tuple[int, dict]:
        self.requests.append(body)
        if self.failures_left > 0:
            self.failures_left -= 1
            return 503, {"error": "scripted failure"}
        topk = body.get("topk", 3)
        return 200, {"result": [fake_documents(query, topk) for query in body["queries"]]}

    @property
    def url(self) -> str:
        return f"{self._server.base_url}/retrieve"

    def __enter__(self) -> RecordingRetriever:
        self._server.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._server.stop()
