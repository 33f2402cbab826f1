"""A scripted OpenAI-compatible ``/v1/completions`` server on loopback, for ``ragr1-eval`` tests.

It decodes the prompt token ids with the test tokenizer and replies with the next scripted turn: the script
gets the text from the question on (after the prompt's last ``Question:``) and the number of
``<information>`` blocks in it, which is the round number.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class ScriptedCompletions:
    """Replies ``script(question_text, round_number)``; counts requests; can answer as vLLM or as OpenAI."""

    def __init__(self, tokenizer: Any, script: Callable[[str, int], str], *, token_ids: bool = True):
        self.tokenizer, self.script, self.token_ids = tokenizer, script, token_ids
        self.requests: list[dict[str, Any]] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

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

    def _handler(self):
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                payload = json.dumps(owner.reply(body)).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        return Handler

    def __enter__(self) -> ScriptedCompletions:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
