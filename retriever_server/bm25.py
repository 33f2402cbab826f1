"""BM25 lexical search with bm25s (sparse scores stored as ``.npy`` arrays, loaded memory-mapped)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

BM25_DIR = "bm25"


def _stemmer(language: str | None):
    if not language:
        return None
    import Stemmer

    return Stemmer.Stemmer(language)


def build_bm25(texts: Iterator[str] | list[str], save_dir: str | os.PathLike, *, language: str = "english",
               stopwords: str = "en", k1: float = 0.9, b: float = 0.4) -> dict:
    """Index passages with BM25 and save them in ``save_dir``; returns the settings for the manifest.

    k1=0.9, b=0.4 are Pyserini's defaults, which Search-R1's BM25 baseline used.
    """
    import bm25s

    corpus_tokens = bm25s.tokenize(list(texts), stopwords=stopwords, stemmer=_stemmer(language), show_progress=True)
    retriever = bm25s.BM25(k1=k1, b=b)
    retriever.index(corpus_tokens, show_progress=True)
    retriever.save(str(save_dir))
    return {"language": language, "stopwords": stopwords, "k1": k1, "b": b}


class Bm25Searcher:
    """Searches a saved bm25s index; returns ``(scores, positions)`` like the dense searchers."""

    device = "cpu"

    def __init__(self, index_dir: str | os.PathLike, settings: dict):
        import bm25s

        self._bm25s = bm25s
        self._stemmer = _stemmer(settings.get("language"))
        self._stopwords = settings.get("stopwords")
        self.retriever = bm25s.BM25.load(str(Path(index_dir, BM25_DIR)), mmap=True, allow_pickle=False)
        self.ntotal = int(self.retriever.scores["num_docs"])

    def search_texts(self, queries: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        k_eff = min(k, self.ntotal)
        tokens = self._bm25s.tokenize(queries, stopwords=self._stopwords, stemmer=self._stemmer,
                                      return_ids=False, show_progress=False)
        scores = np.zeros((len(queries), k), dtype=np.float32)
        positions = np.full((len(queries), k), -1, dtype=np.int64)
        searchable = [i for i, t in enumerate(tokens) if t]
        if searchable:
            found, found_scores = self.retriever.retrieve([tokens[i] for i in searchable], k=k_eff,
                                                          show_progress=False, n_threads=1)
            positions[searchable, :k_eff] = found
            scores[searchable, :k_eff] = found_scores
        # A query made only of stopwords has no terms to match: it gets no hits rather than arbitrary ones.
        positions[scores <= 0] = -1
        return scores, positions
