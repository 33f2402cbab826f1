"""A scripted OpenAI-compatible ``/v1/completions`` server on loopback, for ``ragr1-eval`` tests.

It decodes the prompt token ids with the test tokenizer and replies with the next scripted turn: the script
gets the text from the question on (after the prompt's last ``Question:``) and the number of
``<information>`` blocks in it, which is the round number.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tests.loopback import LoopbackJSONServer


class ScriptedCompletions:
    """Replies ``script(question_on, round_number)``; records requests; can answer as vLLM or as OpenAI."""

    def __init__(self, tokenizer: Any, script: Callable[[str, int], str], *, token_ids: bool = True):
        self.tokenizer, self.script, self.token_ids = tokenizer, script, token_ids
        self.requests: list[dict[str, Any]] = []
        self._server = LoopbackJSONServer(lambda path, body: (200, self.reply(body)))
        self.url = self._server.base_url

    def reply(self, body: dict[str, Any]) -> dict[str, Any]:
        self.requests.append(body)
        question_on = self.tokenizer.decode(body["prompt"]).split("Question:")[-1]
        text = self.script(question_on, question_on.count("<information>"))
        if self.token_ids:  # vLLM with return_token_ids: the stop string kept, ids given
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            return {"choices": [{"text": text, "token_ids": ids, "finish_reason": "stop"}]}
        # a plain OpenAI server: the matched stop string is cut from the text and named in stop_reason
        stop = next((s for s in body.get("stop") or () if text.endswith(s)), None)
        return {"choices": [{"text": text.removesuffix(stop) if stop else text, "stop_reason": stop,
                             "finish_reason": "stop"}]}

    def __enter__(self) -> ScriptedCompletions:
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop()
