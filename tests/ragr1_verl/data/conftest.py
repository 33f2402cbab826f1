"""Fixtures shared by the data tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def retriever_url(demo_server) -> str:
    """The ``/retrieve`` URL of the real demo retriever on loopback (``tests/conftest.py``)."""
    return f"{demo_server[0]}/retrieve"
