"""The Flask app: ``POST /retrieve``, ``GET /health``, ``GET /metrics``.

Every error is a JSON ``{"error": "..."}`` with a 4xx/5xx status, never a stack trace; the server keeps
serving. With a bearer token configured, ``/retrieve`` and ``/metrics`` need
``Authorization: Bearer <token>``; ``/health`` stays open for load balancers and readiness probes.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout

from flask import Flask, Response, g, request
from werkzeug.exceptions import HTTPException

from retriever_server.batcher import BatcherStopped
from retriever_server.service import RetrievalService
from retriever_server.sharded import ShardUnavailable
from retriever_server.wire import DEFAULT_TOPK, RequestError, RequestLimits, parse_retrieve_request

logger = logging.getLogger(__name__)
_PROTECTED = {"/retrieve", "/metrics"}


def _json(payload: dict, status: int = 200, headers: dict | None = None) -> Response:
    return Response(json.dumps(payload), status=status, mimetype="application/json", headers=headers)


def create_app(service: RetrievalService, *, limits: RequestLimits | None = None, default_topk: int = DEFAULT_TOPK,
               auth_token: str | None = None) -> Flask:
    """Build the app around a service (loaded, or loading in the background)."""
    limits = limits or RequestLimits()
    app = Flask("ragr1_retriever", static_folder=None)  # no /static route serving the working directory
    app.config["MAX_CONTENT_LENGTH"] = limits.max_body_bytes
    metrics = service.metrics
    searching = threading.BoundedSemaphore(limits.max_concurrent_requests)

    @app.before_request
    def start_request():
        g.started = time.perf_counter()
        if auth_token and request.path in _PROTECTED and not _authorized(request.headers.get("Authorization"),
                                                                          auth_token):
            raise RequestError(401, "missing or wrong bearer token", "unauthorized")

    @app.after_request
    def record_request(response: Response) -> Response:
        endpoint = request.path if request.path in ("/retrieve", "/health", "/metrics") else "other"
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        metrics.request_seconds.labels(endpoint).observe(time.perf_counter() - g.get("started", time.perf_counter()))
        return response

    @app.errorhandler(RequestError)
    def request_error(err: RequestError):
        metrics.errors.labels(err.kind).inc()
        headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else {"Retry-After": "1"} if (
            err.status == 503) else None
        return _json({"error": err.message}, err.status, headers)

    @app.errorhandler(HTTPException)
    def http_error(err: HTTPException):
        metrics.errors.labels(err.name.lower().replace(" ", "_")).inc()
        return _json({"error": f"{err.name}: {err.description}"}, err.code or 500)

    @app.errorhandler(Exception)
    def unexpected_error(err: Exception):
        logger.exception("unexpected error while serving %s", request.path)
        metrics.errors.labels("internal").inc()
        return _json({"error": "internal server error; see the server log"}, 500)

    @app.post("/retrieve")
    def retrieve():
        if not request.is_json:
            raise RequestError(415, "Content-Type must be application/json", "unsupported_media_type")
        parsed = parse_retrieve_request(request.get_data(cache=False), limits, default_topk)
        problem = service.problem
        if problem is not None:  # loading, failed, or the connection to Ray is lost: the reason, as JSON
            raise RequestError(503, problem, "not_ready")
        if not searching.acquire(blocking=False):
            raise RequestError(503, f"the retriever is overloaded: {limits.max_concurrent_requests} requests are "
                               "searching already; retry shortly", "overloaded")
        try:
            metrics.queries.inc(len(parsed.queries))
            body = service.search_body(parsed.queries, parsed.topk, parsed.return_scores)
        except FutureTimeout:
            raise RequestError(503, "the retriever is overloaded: the request timed out", "timeout") from None
        except BatcherStopped as err:
            raise RequestError(503, str(err), "shutting_down") from None
        except ShardUnavailable as err:  # never a partial top-k presented as complete
            raise RequestError(503, str(err), "shard_unavailable") from None
        finally:
            searching.release()
        if len(body) > limits.max_response_bytes:  # the JSON is ASCII: characters are bytes
            raise RequestError(413, f"the response would be {len(body)} bytes; the limit is "
                               f"{limits.max_response_bytes}: send fewer queries or a smaller topk", "response_too_large")
        return Response(body, mimetype="application/json")

    @app.get("/health")
    def health():
        body = service.health()
        return _json(body, 200 if service.ready else 503)

    @app.get("/metrics")
    def prometheus_metrics():
        return Response(metrics.render(), mimetype="text/plain; version=0.0.4")

    return app


def _authorized(header: str | None, token: str) -> bool:
    if not header or not header.startswith("Bearer "):
        return False
    return hmac.compare_digest(header[len("Bearer "):].encode(), token.encode())
