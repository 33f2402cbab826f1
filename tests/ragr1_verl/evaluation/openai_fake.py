"""A scripted OpenAI-compatible ``/v1/completions`` server on loopback, for ``ragr1-eval`` tests.

It decodes the prompt token ids with the test tokenizer and replies with the next scripted turn: the script
gets the text from the question on (after the prompt's last ``Question:``) and the number of
``<information>`` blocks in it, which is the round number.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tests.loopback import LoopbackJSONServer

REFUSE = "<refuse with 400>"  # a script turn that makes the server refuse the request


class ScriptedCompletions:
    """Replies ``script(question_on, round_number)`` and records the requests.

    ``flavor="vllm"`` honours vLLM's extensions as vLLM >= 0.10.2 does: ``return_token_ids`` (the generated
    ids), ``include_stop_str_in_output`` (else the matched stop string is cut from the text and named in
    ``stop_reason``). ``flavor="openai"`` ignores them: text only, the stop string cut and not named.
    """

    def __init__(self, tokenizer: Any, script: Callable[[str, int], str], *, flavor: str = "vllm"):
        self.tokenizer, self.script, self.flavor = tokenizer, script, flavor
        self.requests: list[dict[str, Any]] = []
        self._server = LoopbackJSONServer(lambda path, body: self.reply(body))
        self.url = self._server.base_url

    def reply(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        self.requests.append(body)
        question_on = self.tokenizer.decode(body["prompt"]).split("Question:")[-1]
        text = self.script(question_on, question_on.count("<information>"))
        if text == REFUSE:
            return 400, {"error": "This model's maximum context length is 4096 tokens"}
        stop = next((s for s in body.get("stop") or () if text.endswith(s)), None)
        choice: dict[str, Any] = {"finish_reason": "stop"}
        vllm = self.flavor == "vllm"
        if vllm and body.get("return_token_ids"):
            choice["token_ids"] = self.tokenizer.encode(text, add_special_tokens=False)
        if stop and not (vllm and body.get("include_stop_str_in_output")):
            text = text.removesuffix(stop)
        if vllm:
            choice["stop_reason"] = stop
        return 200, {"choices": [{**choice, "text": text}]}

    def __enter__(self) -> ScriptedCompletions:
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop()
