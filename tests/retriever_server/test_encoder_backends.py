"""Encoder backends (fp32 torch reference, bf16, int8, ONNX Runtime) and ``--encoder-backend auto``: every
backend on the real MiniLM and the demo index, agreement with the reference measured, the choice of
``auto`` and what it refuses, the ONNX export cache, and the CLI's errors."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from retriever_server import encoder_backends, encoder_choice
from retriever_server.batcher import BatchingConfig
from retriever_server.encoder_backends import ENCODER_BACKENDS, available_backends
from retriever_server.encoder_choice import Trial, agreement, choose
from retriever_server.encoders import TextEncoder, infer_encoder_spec
from retriever_server.environment import CACHE_DIR
from retriever_server.searchers import LoadOptions
from retriever_server.service import RetrievalService

ONNX = pytest.mark.skipif(not encoder_backends.onnx_available(), reason="needs onnxruntime (ragr1-verl[onnx])")
# Texts of several lengths in one batch: the ONNX graph's batch and sequence axes must be dynamic.
TEXTS = ["who designed the bridge over the river", "a", "The Eiffel Tower was built for the 1889 World's Fair "
         "in Paris, and for decades it was the tallest structure in the world; its designer was Gustave Eiffel."]


@pytest.fixture(scope="module")
def encoder_cache(tmp_path_factory):
    """ONNX exports go to a cache folder of this module, not the user's."""
    with pytest.MonkeyPatch.context() as patch:
        folder = tmp_path_factory.mktemp("encoder-cache")
        patch.setenv(CACHE_DIR, str(folder))
        yield folder


@pytest.fixture(scope="module")
def encoders(encoder_cache) -> dict[str, TextEncoder]:
    spec = infer_encoder_spec("minilm")
    return {backend: TextEncoder(spec, device="cpu", batch_size=8, backend=backend)
            for backend in available_backends()}


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_every_backend_gives_normalised_float32_vectors_close_to_the_reference(encoders):
    reference = encoders["torch"].encode_queries(TEXTS)
    for backend, encoder in encoders.items():
        vectors = encoder.encode_queries(TEXTS)
        assert vectors.dtype == np.float32 and vectors.shape == reference.shape, backend
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)
        floor = 0.9999 if backend in ("torch", "onnx") else 0.9  # fp32 exact; lower precision close
        assert _cosines(vectors, reference).min() > floor, backend
        # a batch gives each text the vector it gets alone (padding is masked out of the pooling); dynamic
        # int8 quantises activations with one scale per batch, so there a vector depends on its batchmates
        alone = np.concatenate([encoder.encode_queries([text]) for text in TEXTS])
        assert _cosines(alone, vectors).min() > (0.9 if backend.endswith("int8") else 0.999), backend


@ONNX
def test_the_onnx_export_is_cached_and_reused(encoders, encoder_cache, monkeypatch):
    assert "onnx" not in sys.modules  # exported and quantised in a child process
    files = sorted(encoder_cache.rglob("*.onnx"))
    assert [path.name for path in files] == ["model-int8.onnx", "model.onnx"]
    assert not [path for path in encoder_cache.rglob(".*.onnx")]  # no staging file left behind
    stamps = [path.stat().st_mtime_ns for path in files]
    monkeypatch.setattr(encoder_backends, "_in_child", lambda *args: pytest.fail("exported again"))
    again = TextEncoder(infer_encoder_spec("minilm"), device="cpu", backend="onnx-int8")
    np.testing.assert_allclose(again.encode_queries(TEXTS), encoders["onnx-int8"].encode_queries(TEXTS), atol=1e-6)
    assert [path.stat().st_mtime_ns for path in files] == stamps


@ONNX
def test_a_failed_export_leaves_nothing_and_the_next_start_exports(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_DIR, str(tmp_path))

    def broken(*argv):  # the child process died half-way through writing
        Path(argv[-1]).write_bytes(b"half an ONNX file")
        raise RuntimeError("ONNX export failed (exit code -9)")

    real_child = encoder_backends._in_child
    monkeypatch.setattr(encoder_backends, "_in_child", broken)
    with pytest.raises(RuntimeError, match="export failed"):
        TextEncoder(infer_encoder_spec("minilm"), device="cpu", backend="onnx")
    assert not [path for path in tmp_path.rglob("*.onnx")]
    monkeypatch.setattr(encoder_backends, "_in_child", real_child)
    assert TextEncoder(infer_encoder_spec("minilm"), device="cpu", backend="onnx").encode_queries(["x"]).shape == (1, 384)


def test_agreement_on_the_demo_questions_is_measured_for_every_backend(encoders, demo_index, demo_questions):
    """Top-3 passages of the demo questions with each backend against the reference: fp32 ONNX is the
    reference's arithmetic and must agree on every question; the others are measured and reported."""
    import faiss

    index = faiss.read_index(str(demo_index / "index.faiss"))
    questions = [question["question"] for question in demo_questions[:100]]
    expected = index.search(encoders["torch"].encode_queries(questions), 3)[1]
    shares = {backend: agreement(expected, index.search(encoder.encode_queries(questions), 3)[1])
              for backend, encoder in encoders.items()}
    logging.getLogger(__name__).info("top-3 agreement on the demo questions: %s", {
        backend: f"set {same_set:.3f}, order {same_order:.3f}" for backend, (same_set, same_order) in shares.items()})
    assert shares["torch"] == (1.0, 1.0)
    if "onnx" in shares:
        assert shares["onnx"][0] == 1.0
    for backend, (same_set, same_order) in shares.items():
        assert 0.5 < same_order <= same_set <= 1.0, backend  # close to the reference, never better than equal


def test_choose_takes_the_fastest_backend_that_keeps_the_results():
    trials = [Trial("torch", 1.0, 1.0, 100.0, 10.0), Trial("onnx", 1.0, 1.0, 120.0, 8.0),
              Trial("onnx-int8", 0.95, 0.9, 300.0, 3.0), Trial("torch-bf16", error="RuntimeError: no")]
    assert choose(trials).backend == "onnx"
    assert choose(trials, min_agreement=0.9).backend == "onnx-int8"
    with pytest.raises(ValueError, match="no encoder backend"):
        choose([Trial("onnx-int8", 0.5, 0.5, 300.0, 3.0)])


def test_agreement_counts_sets_and_orders():
    reference = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9], [1, 5, 9]])
    other = np.array([[1, 2, 3], [5, 4, 6], [7, 8, 10], [1, 5, 9]])
    assert agreement(reference, other) == (0.75, 0.5)


@pytest.fixture(scope="module")
def auto_service(demo_index, encoder_cache):
    service = RetrievalService(demo_index, LoadOptions(encoder_backend="auto", encoder_device="cpu",
                                                       torch_threads=1, omp_threads=1), BatchingConfig())
    service.load()
    yield service
    service.close()


def test_auto_measures_every_backend_and_uses_one_that_keeps_the_results(auto_service, encoders, demo_questions):
    report = auto_service.health()["encoder_backends"]
    trials = {trial["backend"]: trial for trial in report["trials"]}
    assert set(trials) == set(encoder_backends.auto_candidates()) and report["probe_queries"] >= 200
    assert "torch-bf16" in trials or not encoder_backends.cpu_has_bf16_units()
    chosen = trials[report["chosen"]]
    assert chosen["set_agreement"] >= encoder_choice.MIN_SET_AGREEMENT
    timed = [trial for trial in trials.values() if trial["batched_qps"] is not None]
    assert chosen["batched_qps"] == max(trial["batched_qps"] for trial in timed)
    for trial in trials.values():  # a backend that lost the results is never timed, so never chosen
        assert (trial["batched_qps"] is None) == (trial["set_agreement"] < encoder_choice.MIN_SET_AGREEMENT)
    assert auto_service.health()["backend"]["encoder_backend"] == report["chosen"]

    questions = [question["question"] for question in demo_questions[:40]]
    served = [[document["id"] for document in row] for row in auto_service.search(questions, 3)[0]]
    reference = auto_service.batcher.retriever.searcher.search(encoders["torch"].encode_queries(questions), 3)[1]
    ids = [[document["id"] for document in documents]
           for documents in (auto_service.corpus.documents(row.tolist()) for row in reference)]
    assert np.mean([set(a) == set(b) for a, b in zip(served, ids)]) >= 0.95


def test_the_default_serves_the_reference(demo_server):
    _, service = demo_server
    assert service.options.encoder_backend == "torch" and "encoder_backends" not in service.health()
    assert service.health()["backend"]["encoder_backend"] == "torch"


def test_the_cli_names_a_missing_onnx_runtime_and_refuses_auto_with_encoder_replicas(tmp_path):
    code = ("import sys; sys.modules['onnxruntime'] = None\n"  # as if onnxruntime were not installed
            "from retriever_server.cli import main\n"
            "sys.exit(main(['serve', '--index', sys.argv[1], '--encoder-backend', 'onnx']))")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode != 0 and "pip install 'ragr1-verl[onnx]'" in result.stderr + result.stdout
    result = subprocess.run([sys.executable, "-m", "retriever_server.cli", "serve", "--index", str(tmp_path),
                             "--ray", "--encoder-replicas", "2", "--encoder-backend", "auto"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "--encoder-replicas" in result.stderr + result.stdout


def test_every_backend_name_is_a_choice_of_the_cli():
    from retriever_server.cli import make_parser

    args = make_parser().parse_args(["serve", "--demo"])
    assert args.encoder_backend == "torch"
    for name in ("auto", *ENCODER_BACKENDS):
        assert make_parser().parse_args(["serve", "--demo", "--encoder-backend", name]).encoder_backend == name
