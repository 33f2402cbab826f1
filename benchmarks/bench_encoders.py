"""Encoder backends and exact-scan variants side by side: agreement with the fp32 reference, and speed.

What it measures (one process, ``--threads`` threads for torch, ONNX Runtime and faiss: 1 by default, as a
server pinned to one core)
--------------------------------------------------------------------------------------------------------------
1. **Agreement (MiniLM).** ``--queries`` fresh queries (default 1,000, from ``bench_retriever``'s query
   generator) are encoded by every backend (``retriever_server.encoder_backends``) and searched top-3 in a
   Flat index of ``--passages`` synthetic passages (default 20,000; built once with the fp32 reference in
   ``--workdir``). Reported: the share of queries with the reference's top-3 set, and in the same order. Also
   the demo questions' supporting-passage recall@3 on the demo index with each backend.
2. **Encoder speed.** Per backend, for MiniLM and for a BERT-base-sized encoder (12 layers x 768, randomly
   initialised and saved offline in ``--workdir``: timing only): queries/s on batches of ``--batch``
   (default 64) and the median milliseconds of one query alone.
3. **Raw limit.** Encode + Flat search, batched and one query at a time: MiniLM on the synthetic index,
   BERT-base on ``--synthetic-vectors`` random unit 768-d vectors (default 100,000). The ratio to the fp32
   reference in the same run is the number to read.
4. **Scan.** On the MiniLM vectors: faiss ``Flat`` against ``SQfp16``, ``SQ8`` and ``SQ8`` with an fp32
   re-rank of ``--rerank-factor`` x k candidates (``IndexRefineFlat``): top-3 agreement with Flat and the
   milliseconds of a batch of ``--batch`` and of one query.

Run from the repository root: ``python benchmarks/bench_encoders.py --json out.json``. The first run builds
the synthetic index (about 2 minutes on one core for 20,000 passages); later runs reuse it. Timings depend on
the CPU (bf16 is fast only with bf16 units: AVX512-BF16 or AMX; the header prints the flags), so compare
ratios within one run, on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # our `benchmarks` and `tests` packages first (see bench_retriever.py)

from benchmarks.bench_common import HelpFormatter, cpu_model  # noqa: E402
from benchmarks.bench_retriever import CORPUS_VERSION, make_query, write_corpus  # noqa: E402
from retriever_server import encoder_choice  # noqa: E402
from retriever_server.cpus import cpu_flags  # noqa: E402
from retriever_server.dense import BLAS_SCAN_THRESHOLD, DIRECT_SCAN_THRESHOLD, FaissSearcher  # noqa: E402

CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_bf16", "amx_int8")
BERT_BASE = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072}
K = 3
ROUNDS, SINGLES = 5, 40  # timed batches, and single queries timed one at a time


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _set_threads(args.threads)
    from retriever_server.encoder_backends import available_backends

    backends = args.backends or list(available_backends())
    workdir = Path(args.workdir)
    results = {"machine": describe_machine(args), "backends": backends}
    index_dir = ensure_minilm_index(workdir, args.passages)
    queries = [make_query(number) for number in range(args.queries)]
    minilm = load_encoders("minilm", backends)
    results["agreement"] = measure_agreement(minilm, index_dir, queries)
    results["demo_recall_at_3"] = measure_demo_recall(minilm)
    bert_dir = ensure_bert_base(workdir)
    bert = load_encoders(str(bert_dir), backends, spec_from=str(bert_dir))
    results["encoder_speed"] = {"minilm": {name: time_encoder(enc, queries, args.batch) for name, enc in minilm.items()},
                                "bert-base": {name: time_encoder(enc, queries, args.batch) for name, enc in bert.items()}}
    flat_minilm = read_flat(index_dir, args.threads)
    flat_bert = synthetic_flat(args.synthetic_vectors, 768, args.threads)
    results["raw_limit"] = {"minilm": raw_limits(minilm, flat_minilm, queries, args.batch),
                            "bert-base": raw_limits(bert, flat_bert, queries, args.batch)}
    results["scan"] = measure_scans(flat_minilm, minilm["torch"].encode_queries(queries), args)
    print_report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def _set_threads(threads: int) -> None:
    import faiss
    import torch

    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)


# -- models and indexes ---------------------------------------------------------------------------------

def ensure_minilm_index(workdir: Path, passages: int) -> Path:
    """A Flat MiniLM index over the synthetic corpus, built with the fp32 reference on first use."""
    from retriever_server.builder import BuildOptions, build_index
    from retriever_server.manifest import MANIFEST_NAME

    index_dir = workdir / f"index-v{CORPUS_VERSION}-{passages}-minilm-Flat"
    if not (index_dir / MANIFEST_NAME).exists():
        workdir.mkdir(parents=True, exist_ok=True)
        corpus = workdir / f"corpus-v{CORPUS_VERSION}-{passages}.jsonl"
        write_corpus(corpus, passages)
        print(f"building a Flat MiniLM index over {passages} passages in {index_dir} (first run only)")
        build_index(BuildOptions(corpus=corpus, out_dir=index_dir, encoder="minilm", index_type="Flat"))
    return index_dir


def ensure_bert_base(workdir: Path) -> Path:
    """A BERT-base-sized encoder (random weights, MiniLM's tokenizer), saved once: timing only."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from retriever_server.encoders import resolve_model_path

    folder = workdir / "bert-base-random"
    if not (folder / "config.json").is_file():
        import torch

        torch.manual_seed(0)
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
        BertModel(BertConfig(vocab_size=tokenizer.vocab_size, **BERT_BASE)).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder


def load_encoders(name: str, backends: list[str], spec_from: str | None = None) -> dict:
    from retriever_server.encoders import TextEncoder, infer_encoder_spec

    spec = infer_encoder_spec(name, family="sentence-transformers", pooling="mean", normalize=True) \
        if spec_from else infer_encoder_spec(name)
    return {backend: TextEncoder(spec, device="cpu", batch_size=128, backend=backend) for backend in backends}


def read_flat(index_dir: Path, threads: int = 1) -> FaissSearcher:
    """The index searched as the server searches it (the scan path chosen by batch size)."""
    import faiss

    return FaissSearcher(faiss.read_index(str(index_dir / "index.faiss")), omp_threads=threads)


def synthetic_flat(count: int, dim: int, threads: int) -> FaissSearcher:
    import faiss

    vectors = np.random.default_rng(0).standard_normal((count, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = faiss.IndexFlatIP(dim)
    index.add(vectors)
    return FaissSearcher(index, omp_threads=threads)


# -- measurements ---------------------------------------------------------------------------------------

def measure_agreement(encoders: dict, index_dir: Path, queries: list[str]) -> dict:
    from retriever_server.encoder_choice import agreement

    index = read_flat(index_dir)
    expected = index.search(encoders["torch"].encode_queries(queries), K)[1]
    rows = {}
    for name, encoder in encoders.items():
        same_set, same_order = agreement(expected, index.search(encoder.encode_queries(queries), K)[1])
        rows[name] = {"same_set": round(same_set, 4), "same_order": round(same_order, 4)}
    return {"queries": len(queries), "passages": index.ntotal, "k": K, "per_backend": rows}


def measure_demo_recall(encoders: dict) -> dict:
    """Supporting-passage recall@3 of the demo questions on the demo index, per backend."""
    from retriever_server.corpus import Corpus
    from retriever_server.demo import ensure_demo_index, load_demo_questions

    index_dir = ensure_demo_index("dense")
    index, corpus = read_flat(index_dir), Corpus(index_dir / "corpus.arrow")
    questions = load_demo_questions()
    recalls = {}
    for name, encoder in encoders.items():
        positions = index.search(encoder.encode_queries([q["question"] for q in questions]), K)[1]
        found = [{document["id"] for document in corpus.documents(row.tolist())} for row in positions]
        hits = [len(found_ids & set(q["supporting_ids"])) / len(q["supporting_ids"])
                for found_ids, q in zip(found, questions)]
        recalls[name] = round(float(np.mean(hits)), 4)
    return {"questions": len(questions), "per_backend": recalls}


def time_encoder(encoder, queries: list[str], batch: int) -> dict:
    """The encoder alone: queries/s on batches of ``batch`` and one query's median ms."""
    qps, one_ms = encoder_choice.time_encoder(encoder.encode_queries, queries, batch=batch, rounds=ROUNDS,
                                              singles=SINGLES)
    return {"batched_queries_per_s": round(qps, 1), "one_query_ms": round(one_ms, 2)}


def raw_limits(encoders: dict, index, queries: list[str], batch: int) -> dict:
    """Encode + search per backend: batched queries/s and one query's ms, and the ratio to fp32."""
    rows = {}
    for name, encoder in encoders.items():
        qps, one_ms = encoder_choice.time_encoder(lambda texts, e=encoder: index.search(e.encode_queries(texts), K),
                                                  queries, batch=batch, rounds=ROUNDS, singles=SINGLES)
        rows[name] = {"batched_queries_per_s": round(qps, 1), "one_query_ms": round(one_ms, 2)}
    reference = rows["torch"]
    for row in rows.values():
        row["batched_vs_fp32"] = round(row["batched_queries_per_s"] / reference["batched_queries_per_s"], 2)
        row["one_query_vs_fp32"] = round(reference["one_query_ms"] / row["one_query_ms"], 2)
    return rows


def measure_scans(searcher: FaissSearcher, query_vectors: np.ndarray, args: argparse.Namespace) -> dict:
    """faiss scans over the same vectors as ``searcher``'s flat index: agreement with it and time per batch and
    per query."""
    import faiss

    from retriever_server.encoder_choice import agreement

    flat = searcher.index
    vectors = flat.reconstruct_n(0, flat.ntotal)
    expected = searcher.search(query_vectors, K)[1]
    variants = {"Flat": flat}
    for name, factory in (("SQfp16", "SQfp16"), ("SQ8", "SQ8")):
        index = faiss.index_factory(flat.d, factory, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
        index.add(vectors)
        variants[name] = index
    coarse = faiss.index_factory(flat.d, "SQ8", faiss.METRIC_INNER_PRODUCT)
    coarse.train(vectors)
    refine = faiss.IndexRefineFlat(coarse)  # SQ8 codes plus an fp32 copy to re-rank its candidates with
    refine.k_factor = args.rerank_factor
    refine.add(vectors)
    variants[f"SQ8+re-rank x{args.rerank_factor}"] = refine
    rows = {}
    for name, index in variants.items():
        scan = FaissSearcher(index, omp_threads=args.threads)
        same_set, same_order = agreement(expected, scan.search(query_vectors, K)[1])
        rows[name] = {"same_set": round(same_set, 4), "same_order": round(same_order, 4),
                      **_scan_times(scan, query_vectors, args.batch)}
    return {"vectors": flat.ntotal, "dim": flat.d, "per_index": rows,
            "flat_small_batches": blas_vs_direct(flat, query_vectors)}


def blas_vs_direct(flat, query_vectors: np.ndarray, sizes=(1, 2, 3, 4, 8, 16), repeats: int = 20) -> dict:
    """A flat scan of a few queries on faiss's direct path and on its BLAS path: median ms per call."""
    import faiss

    saved = faiss.cvar.distance_compute_blas_threshold
    rows = {}
    try:
        for size in sizes:
            row = {}
            for path, threshold in (("direct", DIRECT_SCAN_THRESHOLD), ("blas", BLAS_SCAN_THRESHOLD)):
                faiss.cvar.distance_compute_blas_threshold = threshold
                times = []
                for number in range(repeats):
                    chunk = query_vectors[number * size % len(query_vectors):][:size]
                    started = time.perf_counter()
                    flat.search(chunk, K)
                    times.append(time.perf_counter() - started)
                row[path] = round(statistics.median(times) * 1000, 3)
            rows[str(size)] = row
    finally:
        faiss.cvar.distance_compute_blas_threshold = saved
    return rows


def _scan_times(index, query_vectors: np.ndarray, batch: int, singles: int = 40) -> dict:
    index.search(query_vectors[:batch], K)
    started = time.perf_counter()
    index.search(query_vectors[:batch], K)
    batch_ms = (time.perf_counter() - started) * 1000
    alone = []
    for row in range(singles):
        started = time.perf_counter()
        index.search(query_vectors[row:row + 1], K)
        alone.append(time.perf_counter() - started)
    return {"batch_ms": round(batch_ms, 2), "one_query_ms": round(statistics.median(alone) * 1000, 3)}


# -- report ---------------------------------------------------------------------------------------------

def describe_machine(args: argparse.Namespace) -> dict:
    import faiss
    import torch

    flags = cpu_flags() or frozenset()
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": args.threads,
            "cpu_flags": [flag for flag in CPU_FLAGS if flag in flags], "torch": torch.__version__,
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "faiss": faiss.__version__,
            "python": platform.python_version(),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def print_report(results: dict) -> None:
    machine = results["machine"]
    print(f"{machine['cpu']}, {machine['threads']} thread(s); flags: {', '.join(machine['cpu_flags']) or 'none'}")
    agreement = results["agreement"]
    print(f"\nagreement with fp32 on {agreement['queries']} queries, {agreement['passages']} passages, "
          f"top-{agreement['k']} (and demo recall@3):")
    for name, row in agreement["per_backend"].items():
        print(f"  {name:<11} same set {row['same_set']:.3f}  same order {row['same_order']:.3f}  "
              f"demo recall@3 {results['demo_recall_at_3']['per_backend'][name]:.3f}")
    for model, rows in results["raw_limit"].items():
        print(f"\n{model}: encoder alone, then encode + Flat search")
        for name, row in rows.items():
            speed = results["encoder_speed"][model][name]
            print(f"  {name:<11} encode {speed['batched_queries_per_s']:7.1f} q/s, {speed['one_query_ms']:6.2f} ms "
                  f"| raw {row['batched_queries_per_s']:7.1f} q/s ({row['batched_vs_fp32']:.2f}x), "
                  f"{row['one_query_ms']:6.2f} ms one ({row['one_query_vs_fp32']:.2f}x)")
    scan = results["scan"]
    print("\nflat scan of a few queries, direct vs BLAS path (ms): " + ", ".join(
        f"{size}: {row['direct']:.2f} vs {row['blas']:.2f}" for size, row in scan["flat_small_batches"].items()))
    print(f"\nscans of {scan['vectors']} x {scan['dim']} vectors:")
    for name, row in scan["per_index"].items():
        print(f"  {name:<18} same set {row['same_set']:.3f}  order {row['same_order']:.3f}  "
              f"batch {row['batch_ms']:7.2f} ms  one {row['one_query_ms']:6.3f} ms")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--backends", nargs="+", default=None, help="backends to measure (default: all that run)")
    parser.add_argument("--passages", type=int, default=20_000, help="synthetic passages of the MiniLM index")
    parser.add_argument("--queries", type=int, default=1000, help="fresh queries for agreement and timing")
    parser.add_argument("--synthetic-vectors", type=int, default=100_000, help="768-d vectors of the BERT-base index")
    parser.add_argument("--batch", type=int, default=64, help="queries per timed batch")
    parser.add_argument("--rerank-factor", type=int, default=4, help="SQ8 candidates per result re-ranked in fp32")
    parser.add_argument("--threads", type=int, default=1, help="torch, ONNX Runtime and faiss threads")
    parser.add_argument("--workdir", default="/tmp/ragr1-bench", help="where the index and the BERT-base model go")
    parser.add_argument("--json", default=None, help="write the results here")
    return parser.parse_args(argv)


if __name__ == "__main__":
    raise SystemExit(main())
