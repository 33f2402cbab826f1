"""The embedded demo: a bundled corpus and question set, and a cached index built from them on first use."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
from pathlib import Path

from retriever_server import __version__
from retriever_server.builder import BuildOptions, build_index
from retriever_server.environment import cache_root
from retriever_server.manifest import MANIFEST_NAME
from retriever_server.wire import DEFAULT_TOPK

logger = logging.getLogger(__name__)

DEMO_DIR = Path(__file__).parent / "demo"
DEMO_CORPUS = DEMO_DIR / "corpus.jsonl"
DEMO_QUESTIONS = DEMO_DIR / "questions.jsonl"
DEMO_ENCODER = "minilm"


def ensure_demo_index(kind: str = "dense", root: Path | None = None, show_progress: bool = False) -> Path:
    """The folder of the demo index, built once per corpus version, encoder and kind; safe across processes."""
    root = root or cache_root()
    root.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(DEMO_CORPUS.read_bytes() + f"{kind}:{DEMO_ENCODER}:{__version__}".encode()).hexdigest()[:12]
    index_dir = root / f"demo-{kind}-{key}"
    with open(root / f".demo-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (index_dir / MANIFEST_NAME).exists():
            logger.info("building the demo %s index in %s", kind, index_dir)
            build_index(BuildOptions(corpus=DEMO_CORPUS, out_dir=index_dir, kind=kind, encoder=DEMO_ENCODER,
                                     show_progress=show_progress))
    return index_dir


def load_demo_questions() -> list[dict]:
    """The demo questions: ``question``, ``golden_answers``, ``type``, ``hops``, ``supporting_ids``, ``split``
    (train, dev or test; ``"validation": false`` marks the dev questions training-time validation leaves out)
    and the scripted ``steps`` per row."""
    with open(DEMO_QUESTIONS, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _title(contents: str) -> str:
    return contents.split("\n", 1)[0].strip('"')


def run_demo(kind: str = "dense", questions_per_request: int = 3) -> list[str]:
    """Serve the demo index on a free loopback port, query it over HTTP, stop; returns the report lines."""
    from retriever_server.http_server import serving

    with serving(ensure_demo_index(kind, show_progress=True)) as (url, service):
        questions = load_demo_questions()
        lines = [f"demo retriever ({kind}, {len(service.corpus)} passages) on {url}", ""]
        sample = [q for q in questions if q["type"] == "multi-hop"][:1] + \
                 [q for q in questions if q["type"] == "single-hop"][:questions_per_request - 1]
        lines += _show_one_request(url, sample)
        lines += _recall_summary(url, questions)
    return lines


def _show_one_request(url: str, sample: list[dict]) -> list[str]:
    import requests

    payload = {"queries": [q["question"] for q in sample], "topk": DEFAULT_TOPK, "return_scores": True}
    result = requests.post(f"{url}/retrieve", json=payload, timeout=60).json()["result"]
    lines = [f"one request, {len(sample)} queries (a RAG-R1 multi-query search):"]
    for question, hits in zip(sample, result):
        lines.append(f"  Q: {question['question']}  (gold: {question['golden_answers'][0]})")
        for rank, hit in enumerate(hits, start=1):
            mark = "*" if hit["document"]["id"] in question["supporting_ids"] else " "
            lines.append(f"    {rank}.{mark} {hit['score']:.3f}  {_title(hit['document']['contents'])}")
    return lines + ["  (* = a passage the question's answer comes from)", ""]


def _recall_summary(url: str, questions: list[dict]) -> list[str]:
    """Supporting-passage recall@3 of the question text, by type, by hops (multi-hop) and by split."""
    import requests

    payload = {"queries": [q["question"] for q in questions], "topk": DEFAULT_TOPK}
    result = requests.post(f"{url}/retrieve", json=payload, timeout=120).json()["result"]
    hits = [(q, any(d["id"] in q["supporting_ids"] for d in docs)) for q, docs in zip(questions, result)]

    def line(label: str, rows: list[tuple[dict, bool]]) -> str:
        found = sum(hit for _, hit in rows)
        return f"  {label:10s}: {found}/{len(rows)} questions have a supporting passage in the top 3"

    lines = ["supporting-passage recall@3 over all demo questions:"]
    for kind in ("single-hop", "multi-hop"):
        lines.append(line(kind, [(q, hit) for q, hit in hits if q["type"] == kind]))
    lines.append("by hops (multi-hop questions):")
    for hops in ("bridge", "comparison"):
        lines.append(line(hops, [(q, hit) for q, hit in hits if q.get("hops") == hops]))
    lines.append("by split:")
    for split in ("train", "dev", "test"):
        rows = [(q, hit) for q, hit in hits if q.get("split") == split]
        if rows:
            lines.append(line(split, rows))
    return lines
