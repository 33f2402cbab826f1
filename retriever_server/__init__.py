"""A standalone retriever for RAG-R1 / Search-R1 style rollouts: Flask + faiss (dense) or BM25.

This package never imports verl or ragr1_verl: it runs in its own environment next to training.
"""

__version__ = "0.1.0"
