"""The CPU evaluation demo: the bundled demo questions, the demo retriever in this process, SmolLM2.

``ragr1-eval --demo --out DIR`` writes the demo questions as an evaluation parquet in ``DIR/data``, builds
(once, cached) and serves the demo index on a free loopback port for the length of the run, and stops it
afterwards, whatever happens. It needs the ``retriever`` extra.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)


def demo_data(out_dir: Path) -> Path:
    """``DIR/data/demo.parquet``, written by ``ragr1-data eval --source demo`` (kept between runs)."""
    from ragr1_verl.data.cli import main as data_main

    data_dir = out_dir / "data"
    parquet = data_dir / "demo.parquet"
    if not parquet.is_file() and data_main(["eval", "--source", "demo", "--out", str(data_dir)]) != 0:
        raise RuntimeError("could not write the demo questions")
    return parquet


@contextlib.contextmanager
def demo_retriever() -> Iterator[str]:
    """The ``/retrieve`` URL of the demo index, served from a thread until the block ends."""
    from retriever_server.demo import ensure_demo_index
    from retriever_server.http_server import serving

    with serving(ensure_demo_index("dense", show_progress=True)) as (url, _):
        logger.info("demo retriever on %s", url)
        yield f"{url}/retrieve"
