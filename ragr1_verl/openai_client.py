"""An OpenAI-compatible server (the SFT teacher, the evaluation's ``openai`` backend) as an asyncio client with
retries.

A trajectory is one assistant message that grows: after each ``</search>`` the retrieved text is appended and
the teacher must continue *the same* message. An OpenAI-compatible server offers two ways to ask for that:

- ``completions`` (the default): ``POST /v1/completions`` whose prompt is the chat template rendered here
  with the teacher's tokenizer (``--tokenizer``), followed by the assistant text so far. The teacher is
  conditioned on exactly the text that is recorded, and it works on any server with a completions endpoint
  (vLLM, SGLang, TGI, llama.cpp): nothing server-side can rewrite the partial message.
- ``chat``: ``POST /v1/chat/completions`` with the partial assistant message last and
  ``continue_final_message: true, add_generation_prompt: false``. No tokenizer is needed, but this is a
  vLLM/SGLang extension (OpenAI's own API rejects it); the server's chat template must reproduce the partial
  message verbatim (templates that ``trim`` contents, such as Llama 3's, eat the newline after
  ``</information>``), and a server started with a reasoning parser moves ``<think>`` text out of
  ``content``, so it would be lost from the trajectory.

Both send the protocol's stop strings. OpenAI-style servers leave the matched stop string out of the text;
:func:`restore_stop` puts it back.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp

from ragr1_verl.protocol.actions import ANSWER_CLOSE, ANSWER_OPEN, SEARCH_CLOSE, SEARCH_OPEN, STOP_STRINGS

logger = logging.getLogger(__name__)

Api = Literal["completions", "chat"]
Messages = Sequence[Mapping[str, Any]]

# 408 and 429 say "later", 5xx "broken right now": worth a retry. Any other 4xx would fail again.
_RETRY_STATUSES = frozenset({408, 429})
_MESSAGE_CHARS = 300
# SGLang reports the matched stop string as ``matched_stop``, vLLM as ``stop_reason``.
_STOP_KEYS = ("stop_reason", "matched_stop")
_TAG_PAIRS = ((SEARCH_OPEN, SEARCH_CLOSE), (ANSWER_OPEN, ANSWER_CLOSE))


class TeacherError(RuntimeError):
    """The teacher cannot be used: failing after every retry, or answering something that is not a completion."""


class TeacherRejected(TeacherError):
    """The server refused one request (a 4xx other than 408/429), e.g. a context longer than the model's."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class TeacherSettings:
    """Where the teacher is and how to talk to it.

    ``base_url`` is the server's OpenAI base (``http://host:8000/v1``); a URL without a path gets ``/v1``.
    ``extra_body`` is merged into every request (e.g. ``{"top_k": 20}``).
    """

    base_url: str
    model: str
    api: Api = "completions"
    api_key: str | None = None
    timeout_s: float = 600.0
    connect_timeout_s: float = 10.0
    max_retries: int = 5
    backoff_base_s: float = 1.0
    backoff_max_s: float = 30.0
    extra_body: Mapping[str, Any] = field(default_factory=dict)
    role: str = "teacher"  # how messages name the server ("the teacher at ...")

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"the teacher URL must start with http:// or https://, got {self.base_url!r}")
        if not self.model:
            raise ValueError("the teacher model name is empty")
        if self.api not in ("completions", "chat"):
            raise ValueError(f"api must be 'completions' or 'chat', got {self.api!r}")
        if self.timeout_s <= 0 or self.connect_timeout_s <= 0:
            raise ValueError("teacher timeouts must be positive")
        if self.max_retries < 0 or self.backoff_base_s < 0 or self.backoff_max_s < 0:
            raise ValueError("teacher retries and backoff must not be negative")

    @property
    def endpoint(self) -> str:
        base = self.base_url.rstrip("/")
        if "/" not in base.split("://", 1)[1]:
            base += "/v1"
        return f"{base}/completions" if self.api == "completions" else f"{base}/chat/completions"


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters of one generation round."""

    temperature: float
    top_p: float = 1.0
    max_tokens: int = 1024

    def __post_init__(self) -> None:
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.max_tokens < 1:
            raise ValueError(f"sampling needs temperature >= 0, 0 < top_p <= 1 and max_tokens >= 1, got {self}")


@dataclass(frozen=True)
class Completion:
    """One generation round: the text (with the stop string it ended on put back), why it ended, and which
    protocol stop string ended it, if any."""

    text: str
    finish_reason: str
    stop: str | None = None


@dataclass(frozen=True)
class _Reply:
    payload: dict[str, Any] | None = None
    error: str = ""


def restore_stop(text: str, finish_reason: str, choice: Mapping[str, Any]) -> Completion:
    """The round's completion with its stop string put back into the text.

    vLLM and SGLang name the matched stop string (null after EOS); for a server that does not, it is the
    closing tag of the last unclosed ``<search>`` or ``<answer>``. A server that already kept the stop
    string (vLLM's ``include_stop_str_in_output``) gets nothing appended.
    """
    for stop in STOP_STRINGS:
        if text.rstrip().endswith(stop):
            return Completion(text, finish_reason, stop)
    if finish_reason != "stop":
        return Completion(text, finish_reason)
    reported = [choice[key] for key in _STOP_KEYS if key in choice]
    stop = reported[0] if reported else _unclosed_tag(text)
    if stop in STOP_STRINGS:
        return Completion(text + stop, finish_reason, stop)
    return Completion(text, finish_reason)


def _unclosed_tag(text: str) -> str | None:
    """The closing tag of the last ``<search>``/``<answer>`` opened and not closed in ``text``."""
    open_positions = [(text.rfind(opening), closing) for opening, closing in _TAG_PAIRS
                      if text.rfind(opening) > text.rfind(closing)]
    return max(open_positions)[1] if open_positions else None


def template_renderer(tokenizer: Any) -> Callable[[Messages], str]:
    """Render prompt messages with the teacher's chat template, ready for the assistant's text (completions API).

    When the tokenizer adds BOS itself on encoding, so does the server: the BOS the template writes is dropped,
    or the teacher would see it twice (Llama 3; Qwen has no BOS).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template; give the teacher's own tokenizer with --tokenizer")
    bos = getattr(tokenizer, "bos_token", None)
    adds_bos = bool(bos) and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]

    def render(messages: Messages) -> str:
        text = tokenizer.apply_chat_template([dict(m) for m in messages], tokenize=False,
                                             add_generation_prompt=True)
        return text[len(bos):] if adds_bos and text.startswith(bos) else text

    return render


class OpenAIClient:
    """POSTs to one OpenAI-compatible endpoint with retries, for one event loop; the teacher's and
    ``ragr1-eval``'s transport. ``requests`` counts HTTP attempts, ``retries`` the repeated ones."""

    def __init__(self, settings: TeacherSettings):
        self.settings = settings
        self.requests = 0
        self.retries = 0
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None

    async def post(self, body: dict[str, Any]) -> dict[str, Any]:
        """The JSON answer to ``body``; :class:`TeacherRejected` on a refusal, :class:`TeacherError` when the
        server keeps failing."""
        settings, error = self.settings, ""
        for attempt in range(settings.max_retries + 1):
            if attempt:
                self.retries += 1
                # Full jitter: the workers that failed together do not come back together.
                await asyncio.sleep(random.uniform(0, min(settings.backoff_max_s,
                                                          settings.backoff_base_s * 2 ** (attempt - 1))))
            self.requests += 1
            reply = await self._attempt(body)
            if reply.payload is not None:
                return reply.payload
            error = reply.error
            logger.info("%s request failed (attempt %d of %d): %s", settings.role, attempt + 1,
                        settings.max_retries + 1, error)
        raise TeacherError(f"the {settings.role} at {settings.endpoint} failed {settings.max_retries + 1} times in "
                           f"a row (last: {error}); is the server up and serving {settings.model!r}?")

    async def _attempt(self, body: dict[str, Any]) -> _Reply:
        endpoint, role = self.settings.endpoint, self.settings.role
        try:
            async with self._http().post(endpoint, json=body) as response:
                status, raw = response.status, await response.read()
        except asyncio.TimeoutError:
            return _Reply(error=f"no answer within {self.settings.timeout_s:g}s")
        except aiohttp.ClientError as err:
            return _Reply(error=f"{type(err).__name__}: {err}")
        if 200 <= status < 300:
            try:
                return _Reply(payload=json.loads(raw))
            except ValueError:
                raise TeacherError(f"the {role} at {endpoint} answered {status} with a body that is not JSON: "
                                   f"{_message(raw)}") from None
        error = f"HTTP {status}: {_message(raw)}"
        if status >= 500 or status in _RETRY_STATUSES:
            return _Reply(error=error)
        raise TeacherRejected(status, f"the {role} at {endpoint} refused the request: {error}")

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            headers = {"Authorization": f"Bearer {self.settings.api_key}"} if self.settings.api_key else None
            timeout = aiohttp.ClientTimeout(total=self.settings.timeout_s,
                                            sock_connect=self.settings.connect_timeout_s)
            # No pool limit: the number of workers already bounds the requests in flight.
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), headers=headers,
                                                  timeout=timeout)
        return self._session


class Teacher(OpenAIClient):
    """Generation rounds from the teacher, for one event loop."""

    def __init__(self, settings: TeacherSettings, render: Callable[[Messages], str] | None = None):
        if settings.api == "completions" and render is None:
            raise ValueError("the completions API needs the teacher's chat template: pass --tokenizer")
        super().__init__(settings)
        self._render = render
        self._warned_reasoning = False

    async def complete(self, messages: Messages, partial: str, sampling: Sampling) -> Completion:
        """Continue the assistant message ``partial`` (empty: start it) by one round, up to a stop string.

        Raises :class:`TeacherRejected` when the server refuses the request and :class:`TeacherError` when it
        keeps failing or answers nonsense.
        """
        payload = await self.post(self._body(messages, partial, sampling))
        return self._completion(payload)

    def _body(self, messages: Messages, partial: str, sampling: Sampling) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.settings.model, "max_tokens": sampling.max_tokens,
                                "temperature": sampling.temperature, "top_p": sampling.top_p,
                                "stop": list(STOP_STRINGS)}
        if self.settings.api == "completions":
            body["prompt"] = self._render(messages) + partial
        else:
            body["messages"] = [dict(message) for message in messages]
            if partial:
                body["messages"].append({"role": "assistant", "content": partial})
                body.update(continue_final_message=True, add_generation_prompt=False)
        return {**body, **self.settings.extra_body}

    def _completion(self, payload: Any) -> Completion:
        choices = payload.get("choices") if isinstance(payload, dict) else None
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise TeacherError(f"the teacher at {self.settings.endpoint} answered without choices: "
                               f"{_message(json.dumps(payload).encode())}")
        choice = choices[0]
        if self.settings.api == "completions":
            text = choice.get("text")
        else:
            message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
            text = message.get("content") or ""
            self._check_reasoning(message)
        if not isinstance(text, str):
            raise TeacherError(f"the teacher at {self.settings.endpoint} answered a choice without text")
        return restore_stop(text, str(choice.get("finish_reason") or "stop"), choice)

    def _check_reasoning(self, message: Mapping[str, Any]) -> None:
        if message.get("reasoning_content") and not self._warned_reasoning:
            self._warned_reasoning = True
            logger.warning("the teacher server splits reasoning out of the message (a reasoning parser is on): "
                           "that text is missing from the trajectories; use --api completions")


def _message(raw: bytes) -> str:
    text = " ".join(raw.decode("utf-8", errors="replace").split())
    return text[:_MESSAGE_CHARS] if text else "(empty body)"
