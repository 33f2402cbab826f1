"""Serving the Flask app with waitress (a production WSGI server; never Flask's development server)."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from waitress.server import create_server

logger = logging.getLogger(__name__)


class WaitressServer:
    """A waitress server bound at construction (port 0 picks a free port), run in the foreground or a thread."""

    def __init__(self, app, *, host: str = "127.0.0.1", port: int = 8000, threads: int = 64,
                 max_body_bytes: int = 4 * 1024 * 1024, connection_limit: int = 1000):
        # Flask answers oversized bodies with a JSON 413; waitress's own cap, set higher, only bounds what
        # it buffers before Flask sees the request.
        self._server = create_server(app, host=host, port=port, threads=threads, connection_limit=connection_limit,
                                     max_request_body_size=4 * max_body_bytes, ident="ragr1-retriever",
                                     clear_untrusted_proxy_headers=True)
        self.host = host
        self.port = int(self._server.effective_port)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def serve_forever(self) -> None:
        logger.info("serving on %s", self.url)
        self._server.run()

    def start_in_thread(self) -> WaitressServer:
        self._thread = threading.Thread(target=self._server.run, name="ragr1-http", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.close()
        self._server.task_dispatcher.shutdown()
        if self._thread is not None:
            self._thread.join(timeout=5)


@contextlib.contextmanager
def serving(index_dir: Path, *, options: Any = None, batching: Any = None, load: bool = True,
            **app_kwargs: Any) -> Iterator[tuple[str, Any]]:
    """Serve an index from a thread on a free loopback port for the block; yields (base URL, service).

    The embedded demos and the tests use it; ``ragr1-retriever serve`` runs its server in the foreground.
    """
    from retriever_server.app import create_app
    from retriever_server.batcher import BatchingConfig
    from retriever_server.service import LoadOptions, RetrievalService

    service = RetrievalService(index_dir, options or LoadOptions(), batching or BatchingConfig())
    if load:
        service.load()
    server = WaitressServer(create_app(service, **app_kwargs), port=0).start_in_thread()
    try:
        yield server.url, service
    finally:
        server.stop()
        service.close()
