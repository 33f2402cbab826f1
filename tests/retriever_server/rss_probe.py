"""Resident memory of an in-process retrieval service over many varied batches (run by test_heap.py).

Usage: python rss_probe.py INDEX_DIR REQUESTS TRIM(0|1); prints one JSON line with the RSS in bytes after
a warm-up and once the service has been idle for a second after the load.
"""

import json
import os
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from retriever_server.batcher import BatchingConfig
from retriever_server.service import LoadOptions, RetrievalService

WORDS = ("river city tower war king painter novel island mountain bridge film born capital founded "
         "river museum university album director singer ocean forest").split()


def resident_bytes() -> int:
    fields = Path("/proc/self/statm").read_text().split()
    return int(fields[1]) * os.sysconf("SC_PAGE_SIZE")


def fresh_queries(rng: random.Random, serial: int) -> list[str]:
    return [f"{' '.join(rng.choices(WORDS, k=6))} {serial}-{i}" for i in range(rng.randint(1, 24))]


def run_load(service: RetrievalService, requests: int, seed: int) -> None:
    rng = random.Random(seed)
    batches = [fresh_queries(rng, seed * 1_000_000 + n) for n in range(requests)]
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(lambda queries: service.search_body(queries, 3, True), batches))


def main(index_dir: str, requests: int, trim: bool) -> None:
    service = RetrievalService(index_dir, LoadOptions(cache_size=0, document_cache_mib=1.0),
                               BatchingConfig(trim_heap=trim))
    service.load()
    run_load(service, 200, seed=1)
    time.sleep(1.0)
    start = resident_bytes()
    run_load(service, requests, seed=2)
    time.sleep(1.0)
    end = resident_bytes()
    sys.stdout.write(json.dumps({"start": start, "end": end, "trims": service.batcher.heap.trims}) + "\n")
    service.close()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1")
