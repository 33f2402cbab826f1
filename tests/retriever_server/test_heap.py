"""Freed heap memory goes back to the OS between batches, so the resident set stays flat under load."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from retriever_server.heap import HeapTrimmer

PROBE = Path(__file__).with_name("rss_probe.py")
needs_glibc = pytest.mark.skipif(not HeapTrimmer().available, reason="malloc_trim is glibc's")


@needs_glibc
def test_trims_whenever_the_queue_is_idle_and_at_most_once_an_interval_while_busy():
    trimmer = HeapTrimmer(interval_s=3600)
    for _ in range(5):
        trimmer.after_batch(idle=False)
    assert trimmer.trims == 0
    trimmer.after_batch(idle=True)
    trimmer.after_batch(idle=True)
    assert trimmer.trims == 2


@needs_glibc
def test_a_busy_server_still_trims_once_the_interval_has_passed():
    trimmer = HeapTrimmer(interval_s=0.0)
    trimmer.after_batch(idle=False)
    assert trimmer.trims == 1


def test_disabled_trimmer_never_trims():
    trimmer = HeapTrimmer(enabled=False)
    trimmer.after_batch(idle=True)
    assert not trimmer.available and trimmer.trims == 0


@needs_glibc
@pytest.mark.slow
def test_resident_memory_stays_within_ten_percent_over_a_thousand_varied_requests(demo_index):
    """Without trimming, the same load grew RSS by ~110 MB (about 15%) on the demo index."""
    probe = subprocess.run([sys.executable, str(PROBE), str(demo_index), "1000", "1"],
                           capture_output=True, text=True, timeout=600, check=True)
    rss = json.loads(probe.stdout.strip().splitlines()[-1])
    document_cache = 2**20  # the probe's --document-cache-mib 1; the embedding cache is off
    assert rss["trims"] > 0
    assert rss["end"] <= rss["start"] * 1.10 + document_cache, rss
