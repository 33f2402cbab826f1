"""The ``/retrieve`` wire format, compatible with Search-R1, RAG-R1 and verl <= 0.7 clients.

Request: ``{"queries": [str, ...], "topk": int (optional), "return_scores": bool (optional, false)}``.
Response: ``{"result": [per query: [{"document": {"id", "contents"}, "score": float}, ...]]}`` with scores,
or ``{"result": [per query: [{"id", "contents"}, ...]]}`` without. Unknown request fields are ignored, as
the original servers ignore them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

DEFAULT_TOPK = 3  # documents per query when a request gives no topk (the paper's, and the plugin's default)


@dataclass(frozen=True)
class RequestLimits:
    """Caps on one request and on the work in flight (CLI: ``--max-queries-per-request``, ``--max-query-chars``,
    ``--max-topk``, ``--max-results-per-request``, ``--max-body-bytes``, ``--max-response-bytes``,
    ``--max-concurrent-requests``)."""

    max_queries_per_request: int = 512
    max_query_chars: int = 2048
    max_topk: int = 100
    max_results_per_request: int = 5120  # queries x topk: 512 queries at topk 10
    max_body_bytes: int = 4 * 1024 * 1024
    max_response_bytes: int = 8 * 1024 * 1024
    max_concurrent_requests: int = 120  # /retrieve requests searching at once; more are answered 503


class RequestError(ValueError):
    """A client error: answered with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str, kind: str = "bad_request"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


@dataclass(frozen=True)
class RetrieveRequest:
    queries: list[str]
    topk: int
    return_scores: bool


def parse_retrieve_request(body: bytes, limits: RequestLimits, default_topk: int) -> RetrieveRequest:
    """Validate a ``/retrieve`` body; raise :class:`RequestError` saying exactly what is wrong."""
    try:
        payload = json.loads(body)
    except RecursionError:
        raise RequestError(400, "request body is nested too deeply", "malformed_json") from None
    except ValueError as err:  # malformed JSON or text, or an integer past Python's digit limit
        raise RequestError(400, f"request body is not valid JSON: {err}", "malformed_json") from None
    if not isinstance(payload, dict):
        raise RequestError(400, "request body must be a JSON object with a 'queries' list", "malformed_json")
    queries = _parse_queries(payload.get("queries"), limits)
    topk = _parse_topk(payload.get("topk"), limits, default_topk)
    if len(queries) * topk > limits.max_results_per_request:
        raise RequestError(413, f"{len(queries)} queries x topk {topk} = {len(queries) * topk} results; the limit "
                           f"is {limits.max_results_per_request} a request: send fewer queries or a smaller topk",
                           "too_many_results")
    return_scores = payload.get("return_scores", False)
    if not isinstance(return_scores, bool):
        raise RequestError(400, "'return_scores' must be true or false", "bad_field")
    return RetrieveRequest(queries, topk, return_scores)


def _parse_queries(queries, limits: RequestLimits) -> list[str]:
    if queries is None:
        raise RequestError(400, "'queries' is missing: send {\"queries\": [\"...\"]}", "missing_queries")
    if not isinstance(queries, list):
        raise RequestError(400, f"'queries' must be a list of strings, got {type(queries).__name__}", "bad_field")
    if not queries:
        raise RequestError(400, "'queries' is empty", "missing_queries")
    if len(queries) > limits.max_queries_per_request:
        raise RequestError(400, f"too many queries: {len(queries)} > {limits.max_queries_per_request} per "
                           "request", "too_many_queries")
    for number, query in enumerate(queries):
        if not isinstance(query, str):
            raise RequestError(400, f"queries[{number}] must be a string, got {type(query).__name__}", "bad_field")
        if len(query) > limits.max_query_chars:
            raise RequestError(400, f"queries[{number}] has {len(query)} characters; the limit is "
                               f"{limits.max_query_chars}", "query_too_long")
    return queries


def _parse_topk(topk, limits: RequestLimits, default_topk: int) -> int:
    if topk is None:
        return default_topk
    if isinstance(topk, bool) or not isinstance(topk, (int, float)) or (isinstance(topk, float) and (
            not math.isfinite(topk) or topk != int(topk))):
        raise RequestError(400, f"'topk' must be an integer, got {topk!r}", "bad_field")
    if not 1 <= int(topk) <= limits.max_topk:
        raise RequestError(400, f"'topk' must be between 1 and {limits.max_topk}, got {int(topk)}", "bad_topk")
    return int(topk)
