"""Build a retrieval index folder from a corpus: ``corpus.arrow``, embeddings, the index, ``manifest.json``.

A build is resumable: the corpus conversion and every embedding shard are written to a temporary name and
renamed when complete, and ``build.json`` records what the shards were computed from, so a rerun with the
same corpus and encoder keeps every finished shard and embeds only the rest. The manifest is written last:
a folder without one is an unfinished build, and the server refuses it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from retriever_server import __version__
from retriever_server.bm25 import BM25_DIR, build_bm25
from retriever_server.corpus import CORPUS_NAME, Corpus, sha256_file, write_corpus_arrow
from retriever_server.dense import EMBEDDINGS_DIR, FAISS_INDEX_NAME, build_faiss_index, iter_embedding_shards
from retriever_server.encoders import EncoderSpec, TextEncoder, infer_encoder_spec
from retriever_server.manifest import MANIFEST_NAME, PROBE_SENTENCE, Manifest, describe_file

logger = logging.getLogger(__name__)

BUILD_STATE_NAME = "build.json"


class BuildError(RuntimeError):
    """The build cannot go on as asked (e.g. a rerun with a different corpus or encoder)."""


@dataclass
class BuildOptions:
    """What to build. Defaults are the project's; the paper's retriever is noted where it differs."""

    corpus: Path
    out_dir: Path
    kind: str = "dense"  # "dense" or "bm25"
    encoder: str = "minilm"  # paper: BAAI/bge-large-en-v1.5 (RAG-R1); intfloat/e5-base-v2 (Search-R1)
    encoder_overrides: dict = field(default_factory=dict)  # family, pooling, query/passage prefix, normalize
    max_length: int = 256
    index_type: str = "Flat"  # any faiss index-factory string; paper: Flat (exact)
    shard_size: int = 100_000
    batch_size: int = 128
    device: str = "auto"
    train_size: int = 200_000
    overwrite: bool = False
    show_progress: bool = True


def build_index(options: BuildOptions) -> Manifest:
    """Run (or resume) a build and return its manifest."""
    out = Path(options.out_dir)
    _prepare_out_dir(out, options.overwrite)
    source_digest = sha256_file(options.corpus)
    spec = infer_encoder_spec(options.encoder, max_length=options.max_length, **options.encoder_overrides) \
        if options.kind == "dense" else None
    _check_build_state(out, options, source_digest, spec)
    count = _ensure_corpus(out, options.corpus)
    corpus_info = {"source": str(options.corpus), "source_sha256": source_digest, "count": count}
    if options.kind == "bm25":
        manifest = _build_bm25(out, options, corpus_info)
    elif options.kind == "dense":
        manifest = _build_dense(out, options, spec, corpus_info)
    else:
        raise BuildError(f"unknown index kind {options.kind!r}: choose dense or bm25")
    manifest.files = {name: describe_file(out / name) for name in _served_files(out, manifest.kind)}
    manifest.builder = f"ragr1-index {__version__}"
    manifest.write(out)
    logger.info("index ready in %s (%d passages)", out, count)
    return manifest


def _prepare_out_dir(out: Path, overwrite: bool) -> None:
    if (out / MANIFEST_NAME).exists() and not overwrite:
        raise BuildError(f"{out} already holds a finished index; pass --overwrite to rebuild it")
    if overwrite and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def _check_build_state(out: Path, options: BuildOptions, source_digest: str, spec: EncoderSpec | None) -> None:
    """Refuse to resume shards computed from another corpus or encoder; record the state otherwise."""
    state = {"kind": options.kind, "source_sha256": source_digest, "shard_size": options.shard_size,
             "encoder": spec.to_dict() if spec else None}
    path = out / BUILD_STATE_NAME
    if path.exists():
        previous = json.loads(path.read_text())
        changed = [key for key in state if previous.get(key) != state[key]]
        if changed:
            raise BuildError(f"{out} holds an unfinished build with a different {', '.join(changed)} "
                             f"(was {[previous.get(k) for k in changed]}, now {[state[k] for k in changed]}); "
                             "pass --overwrite to start over")
        logger.info("resuming the unfinished build in %s", out)
    path.write_text(json.dumps(state, indent=2))


def _ensure_corpus(out: Path, source: Path) -> int:
    target = out / CORPUS_NAME
    if not target.exists():
        logger.info("converting %s to %s", source, target)
        return write_corpus_arrow(source, target)
    return len(Corpus(target))


def _build_dense(out: Path, options: BuildOptions, spec: EncoderSpec, corpus_info: dict) -> Manifest:
    encoder = TextEncoder(spec, device=options.device, batch_size=options.batch_size)
    _embed_missing_shards(out, Corpus(out / CORPUS_NAME), encoder, options)
    index = build_faiss_index(options.index_type, encoder.dim, iter_embedding_shards(out),
                              train_size=options.train_size)
    _write_faiss_atomically(index, out / FAISS_INDEX_NAME)
    encoder_info = {"spec": spec.to_dict(), "fingerprint": encoder.fingerprint, "dim": encoder.dim,
                    "probe_embedding": encoder.encode_queries([PROBE_SENTENCE])[0].round(6).tolist()}
    index_info = {"type": options.index_type, "metric": "inner_product", "ntotal": int(index.ntotal),
                  "shard_size": options.shard_size}
    return Manifest(kind="dense", corpus=corpus_info, index=index_info, encoder=encoder_info)


def _embed_missing_shards(out: Path, corpus: Corpus, encoder: TextEncoder, options: BuildOptions) -> None:
    shard_dir = out / EMBEDDINGS_DIR
    shard_dir.mkdir(exist_ok=True)
    progress = tqdm(total=len(corpus), desc="embedding passages", unit="passage", disable=not options.show_progress)
    for start, texts in corpus.iter_batches(options.shard_size):
        shard_path = shard_dir / f"shard-{start // options.shard_size:05d}.npy"
        if _shard_complete(shard_path, len(texts), encoder.dim):
            progress.update(len(texts))
            continue
        vectors = np.concatenate([_encode_with_progress(encoder, texts[i:i + options.batch_size], progress)
                                  for i in range(0, len(texts), options.batch_size)])
        tmp = shard_path.with_name(shard_path.stem + ".partial.npy")
        np.save(tmp, vectors.astype(np.float16), allow_pickle=False)
        os.replace(tmp, shard_path)
    progress.close()


def _encode_with_progress(encoder: TextEncoder, texts: list[str], progress) -> np.ndarray:
    vectors = encoder.encode_passages(texts)
    progress.update(len(texts))
    return vectors


def _shard_complete(path: Path, rows: int, dim: int) -> bool:
    if not path.exists():
        return False
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False).shape == (rows, dim)
    except ValueError:
        return False


def _write_faiss_atomically(index, path: Path) -> None:
    import faiss

    tmp = path.with_name(path.name + ".partial")
    faiss.write_index(index, str(tmp))
    os.replace(tmp, path)


def _build_bm25(out: Path, options: BuildOptions, corpus_info: dict) -> Manifest:
    corpus = Corpus(out / CORPUS_NAME)
    texts = (text for _, chunk in corpus.iter_batches(options.shard_size) for text in chunk)
    partial = out / (BM25_DIR + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    settings = build_bm25(texts, partial)
    shutil.rmtree(out / BM25_DIR, ignore_errors=True)
    os.replace(partial, out / BM25_DIR)
    index_info = {"type": "bm25", "ntotal": len(corpus), **settings}
    return Manifest(kind="bm25", corpus=corpus_info, index=index_info)


def _served_files(out: Path, kind: str) -> list[str]:
    names = [CORPUS_NAME]
    if kind == "dense":
        names.append(FAISS_INDEX_NAME)
        names += [str(p.relative_to(out)) for p in sorted((out / EMBEDDINGS_DIR).glob("shard-*.npy"))]
    else:
        names += [str(p.relative_to(out)) for p in sorted((out / BM25_DIR).iterdir())]
    return names
