"""Freed heap memory goes back to the OS between batches, so the resident set stays flat under load."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from retriever_server.heap import HeapTrimmer

PROBE = Path(__file__).with_name("rss_probe.py")
needs_glibc = pytest.mark.skipif(not HeapTrimmer().available, reason="malloc_trim is glibc's")


@needs_glibc
def test_trims_once_per_idle_spell_after_work_and_never_while_busy_within_the_interval():
    trimmer = HeapTrimmer(busy_interval_s=3600)
    trimmer.idle()
    assert trimmer.trims == 0  # nothing ran since the start: nothing to give back
    for _ in range(5):
        trimmer.after_batch()
    assert trimmer.trims == 0  # busy: the next batch would fault the pages straight back in
    trimmer.idle()
    trimmer.idle()
    assert trimmer.trims == 1


@needs_glibc
def test_a_server_that_never_goes_idle_still_trims_once_the_interval_has_passed():
    trimmer = HeapTrimmer(busy_interval_s=0.0)
    trimmer.after_batch()
    assert trimmer.trims == 1


def test_disabled_trimmer_never_trims():
    trimmer = HeapTrimmer(enabled=False)
    trimmer.after_batch()
    trimmer.idle()
    assert not trimmer.available and trimmer.trims == 0


@needs_glibc
def test_the_batcher_trims_when_no_request_comes(demo_index):
    from retriever_server.batcher import BatchingConfig
    from retriever_server.service import LoadOptions, RetrievalService

    service = RetrievalService(demo_index, LoadOptions(), BatchingConfig())
    service.load()
    try:
        service.search(["who designed the eiffel tower?"], 3)
        deadline = time.monotonic() + 10
        while service.batcher.heap.trims == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert service.batcher.heap.trims == 1
    finally:
        service.close()


@needs_glibc
@pytest.mark.slow
def test_resident_memory_stays_within_ten_percent_over_a_thousand_varied_requests(demo_index):
    """Without trimming, the same load left RSS ~110 MB (about 15%) higher on the demo index."""
    probe = subprocess.run([sys.executable, str(PROBE), str(demo_index), "1000", "1"],
                           capture_output=True, text=True, timeout=600, check=True)
    rss = json.loads(probe.stdout.strip().splitlines()[-1])
    document_cache = 2**20  # the probe's --document-cache-mib 1; the embedding cache is off
    assert rss["trims"] > 0
    assert rss["end"] <= rss["start"] * 1.10 + document_cache, rss
