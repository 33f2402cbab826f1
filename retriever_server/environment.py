"""The environment variables the retriever reads, declared once (this package never imports ragr1_verl, so
it keeps its own list; the token is the same variable the plugin's client reads)."""

from __future__ import annotations

import os
from pathlib import Path

AUTH_TOKEN = "RAGR1_RETRIEVER_TOKEN"  # `serve`: the bearer token to require; `query`: the one to send
CACHE_DIR = "RAGR1_CACHE_DIR"  # where the demo indexes (and the plugin's demo assets) are cached
SUPERVISED = "RAGR1_RETRIEVER_SUPERVISOR_FD"  # internal: set by `serve --ray`'s supervisor for its child

VARIABLES = {
    AUTH_TOKEN: "the bearer token `ragr1-retriever serve` requires and `ragr1-retriever query` sends, where "
                "`--auth-token` is not given",
    CACHE_DIR: "the cache folder of the demo indexes and the CPU demo's model and data (default "
               "`$XDG_CACHE_HOME/ragr1-verl`, else `~/.cache/ragr1-verl`)",
}


def value(name: str) -> str | None:
    """The variable's value, stripped; None when it is unset or empty."""
    return os.environ.get(name, "").strip() or None


def cache_root() -> Path:
    """``$RAGR1_CACHE_DIR``, else ``$XDG_CACHE_HOME/ragr1-verl``, else ``~/.cache/ragr1-verl``."""
    configured = value(CACHE_DIR)
    if configured:
        return Path(configured)
    return Path(value("XDG_CACHE_HOME") or Path.home() / ".cache") / "ragr1-verl"
