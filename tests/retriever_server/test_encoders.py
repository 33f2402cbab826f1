import numpy as np
import pytest

from retriever_server.encoders import (
    BGE_QUERY_INSTRUCTION,
    MIN_CHUNK,
    TextEncoder,
    detect_family,
    infer_encoder_spec,
    length_chunks,
    resolve_model_path,
)


@pytest.fixture(scope="module")
def minilm():
    return TextEncoder(infer_encoder_spec("minilm"), device="cpu", batch_size=4)


@pytest.mark.parametrize("name, family", [
    ("intfloat/e5-base-v2", "e5"), ("intfloat/multilingual-e5-large", "e5"), ("/models/e5_large", "e5"),
    ("BAAI/bge-large-en-v1.5", "bge"), ("/data/bge-base", "bge"),
    ("sentence-transformers/all-MiniLM-L6-v2", "sentence-transformers"), ("my/dense5-model", "sentence-transformers"),
])
def test_family_detection(name, family):
    assert detect_family(name) == family


def test_family_defaults_and_overrides():
    e5 = infer_encoder_spec("intfloat/e5-base-v2")
    assert (e5.pooling, e5.query_prefix, e5.passage_prefix, e5.normalize) == ("mean", "query: ", "passage: ", True)
    bge = infer_encoder_spec("BAAI/bge-large-en-v1.5")
    assert (bge.pooling, bge.query_prefix, bge.passage_prefix) == ("cls", BGE_QUERY_INSTRUCTION, "")
    custom = infer_encoder_spec("BAAI/bge-large-en-v1.5", query_prefix="", pooling="mean")
    assert (custom.pooling, custom.query_prefix) == ("mean", "")
    with pytest.raises(ValueError, match="unknown pooling"):
        infer_encoder_spec("intfloat/e5-base-v2", pooling="max")
    with pytest.raises(ValueError, match="unknown encoder family"):
        infer_encoder_spec("x", family="colbert")


def test_sentence_transformers_settings_come_from_the_model_folder():
    spec = infer_encoder_spec("minilm")
    assert (spec.family, spec.pooling, spec.normalize, spec.query_prefix) == ("sentence-transformers", "mean", True, "")


def test_minilm_matches_sentence_transformers_reference(minilm):
    from sentence_transformers import SentenceTransformer

    texts = ["The Nile flows north into the Mediterranean Sea.", "Who painted the Mona Lisa?", "short"]
    reference = SentenceTransformer(resolve_model_path("minilm"), device="cpu").encode(texts)
    ours = minilm.encode_passages(texts)
    assert ours.dtype == np.float32 and ours.shape == (3, 384)
    cosines = (ours * reference).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(reference, axis=1))
    assert np.all(cosines > 0.9999)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_batching_does_not_change_embeddings(minilm):
    texts = [f"passage number {i} about rivers and cities" for i in range(10)]
    one_by_one = np.concatenate([minilm.encode_queries([t]) for t in texts])
    np.testing.assert_allclose(minilm.encode_queries(texts), one_by_one, atol=1e-5)
    assert minilm.encode_queries([]).shape == (0, 384)


def test_texts_of_mixed_lengths_come_back_in_the_order_given(minilm):
    """Encoding sorts texts by length into chunks; each row must still be its own text's vector."""
    words = "the river crosses the old town past the mill and the bridge towards the distant sea".split()
    texts = [" ".join(words[:1 + (7 * i) % len(words)]) for i in range(13)]
    assert sorted(texts, key=len) != texts
    one_by_one = np.concatenate([minilm.encode_queries([t]) for t in texts])
    np.testing.assert_allclose(minilm.encode_queries(texts), one_by_one, atol=1e-5)


def test_length_chunks_cover_every_text_once_sorted_and_within_the_batch_size():
    lengths = [30, 5, 12, 5, 200, 7, 12, 13, 90, 5, 6, 8, 11, 9, 14, 10, 7, 6, 5, 12]
    chunks = length_chunks(lengths, batch_size=6)
    flat = [position for chunk in chunks for position in chunk]
    assert sorted(flat) == list(range(len(lengths)))
    assert [lengths[p] for p in flat] == sorted(lengths)
    assert all(len(chunk) <= 6 for chunk in chunks)


def test_length_chunks_split_where_padding_would_be_wasted():
    short, long = [10] * MIN_CHUNK, [100] * MIN_CHUNK
    chunks = length_chunks(long + short, batch_size=64)
    assert [len(chunk) for chunk in chunks] == [MIN_CHUNK, MIN_CHUNK]
    assert length_chunks([10] * 40, batch_size=64) == [list(range(40))]  # equal lengths: one chunk
    assert length_chunks([10, 100, 11], batch_size=64) == [[0, 2, 1]]  # fewer than MIN_CHUNK: never split
    assert length_chunks([], batch_size=8) == []
    # the 10% bound: 8 x 10 tokens and one of 11 pad to 99 <= 1.1 x 91; one of 12 pads to 108 > 1.1 x 92
    assert [len(chunk) for chunk in length_chunks([10] * 8 + [11], batch_size=64)] == [9]
    assert [len(chunk) for chunk in length_chunks([10] * 8 + [12], batch_size=64)] == [8, 1]
    # below MIN_CHUNK texts a long one joins the short ones
    assert [len(chunk) for chunk in length_chunks([10] * (MIN_CHUNK - 1) + [100], batch_size=64)] == [MIN_CHUNK]
