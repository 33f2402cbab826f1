"""The index manifest: what an index was built from, checked by the server before it serves.

``manifest.json`` sits in the index folder next to ``corpus.arrow`` and the index files. It records the
encoder (spec, fingerprint, dimension, and the embedding of a fixed probe sentence), the index type and
size, the corpus source and passage count, and the size and sha256 of every file the server loads.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from retriever_server.corpus import sha256_file

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
# Encoded at build time and again at serve time: a different model, pooling or prefix moves this vector.
PROBE_SENTENCE = "Which river flows through the capital city where the bridge was designed?"
PROBE_MIN_COSINE = 0.99
# int8 and bf16 encoders move the probe's vector by a few hundredths of cosine (MiniLM: 0.95-0.99);
# a wrong pooling or prefix moves it far more
PROBE_MIN_COSINE_LOW_PRECISION = 0.9


class ManifestError(RuntimeError):
    """The index folder is incomplete, or does not match the encoder or corpus the server was given."""


@dataclass
class Manifest:
    kind: str  # "dense", "bm25", or "sharded" (a folder of shard folders, each a dense or BM25 index)
    corpus: dict
    index: dict
    encoder: dict | None = None
    files: dict[str, dict] = field(default_factory=dict)
    shard: dict | None = None  # in a shard's folder: {number, of, start, count}
    shards: list[dict] | None = None  # in a sharded folder: [{dir, number, start, count}, ...]
    format_version: int = FORMAT_VERSION
    created_at: str = ""
    builder: str = ""

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2, sort_keys=True)

    @classmethod
    def read(cls, index_dir: str | os.PathLike) -> Manifest:
        path = Path(index_dir, MANIFEST_NAME)
        if not path.is_file():
            raise ManifestError(f"{index_dir} has no {MANIFEST_NAME}: build it with `ragr1-index build`")
        try:
            data = json.loads(path.read_text())
            manifest = cls(**data)
        except (json.JSONDecodeError, TypeError) as err:
            raise ManifestError(f"{path} is not a valid manifest: {err}") from None
        if manifest.format_version != FORMAT_VERSION:
            raise ManifestError(f"{path} has format version {manifest.format_version}; this server reads "
                                f"version {FORMAT_VERSION}: rebuild the index")
        return manifest

    def write(self, index_dir: str | os.PathLike) -> None:
        self.created_at = self.created_at or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        path = Path(index_dir, MANIFEST_NAME)
        tmp = path.with_name(path.name + ".partial")
        tmp.write_text(self.to_json())
        os.replace(tmp, path)


def describe_file(path: str | os.PathLike) -> dict:
    return {"size": os.path.getsize(path), "sha256": sha256_file(path)}


def check_files(manifest: Manifest, index_dir: str | os.PathLike, *, checksums: bool) -> None:
    """Every file the manifest lists exists with its recorded size (and sha256, when asked)."""
    for relative, expected in manifest.files.items():
        path = Path(index_dir, relative)
        if not path.is_file():
            raise ManifestError(f"{path} is listed in the manifest but missing")
        size = path.stat().st_size
        if size != expected["size"]:
            raise ManifestError(f"{path} has {size} bytes, the manifest says {expected['size']}: the file changed "
                                "after the index was built")
        if checksums and sha256_file(path) != expected["sha256"]:
            raise ManifestError(f"{path} does not match the sha256 in the manifest")


def check_encoder(manifest: Manifest, spec_name: str, fingerprint: str, probe_vector: np.ndarray, *,
                  min_cosine: float = PROBE_MIN_COSINE) -> None:
    """The loaded encoder is the one the index was built with; the error names both."""
    built = manifest.encoder or {}
    built_name = built.get("spec", {}).get("name", "?")
    if fingerprint != built.get("fingerprint"):
        raise ManifestError(f"encoder mismatch: the index was built with {built_name!r} (fingerprint "
                            f"{built.get('fingerprint')}), but the server loaded {spec_name!r} (fingerprint "
                            f"{fingerprint})")
    expected = np.asarray(built.get("probe_embedding", []), dtype=np.float32)
    if expected.shape != probe_vector.shape:
        raise ManifestError(f"encoder mismatch: the index was built with {built_name!r} (dimension "
                            f"{expected.shape[-1] if expected.size else '?'}), but {spec_name!r} gives "
                            f"dimension {probe_vector.shape[-1]}")
    cosine = float(expected @ probe_vector / (np.linalg.norm(expected) * np.linalg.norm(probe_vector) + 1e-12))
    if cosine < min_cosine:
        raise ManifestError(f"encoder mismatch: {spec_name!r} encodes the probe sentence differently from "
                            f"{built_name!r}, which built the index (cosine {cosine:.3f}); check pooling and "
                            "prefixes")


def check_corpus(manifest: Manifest, corpus_path: str | os.PathLike, corpus_size: int) -> None:
    """The corpus the server was given is the one the index was built from; the error names both."""
    built = manifest.corpus
    if corpus_size != built["count"]:
        raise ManifestError(f"corpus mismatch: the index was built from {built['source']} ({built['count']} "
                            f"passages), but {corpus_path} has {corpus_size} passages")
