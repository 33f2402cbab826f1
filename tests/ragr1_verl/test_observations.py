"""One observation renderer: for fast and slow tokenizers and documents over the per-query budget, the
rollout's observation tokens, the SFT teachers' observation text and the SFT dataset's tokens of that text are
the same, and every query's documents keep at most the budget's tokens."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf
from transformers import PythonBackend

from ragr1_verl.agent_loop import _TokenizerState, observation_ids
from ragr1_verl.config import RagR1Config
from ragr1_verl.data.teacher.episode import EpisodeSettings, observation_text
from ragr1_verl.openai_client import Sampling
from ragr1_verl.protocol.observation import document_units, policy_codec
from ragr1_verl.sft.dataset import RagR1SFTDataset
from tests.ragr1_verl.fakes import CHAT_TEMPLATE


class ByteTokenizer(PythonBackend):
    """A slow tokenizer (transformers' Python backend, no Rust tokenizer): one token per UTF-8 byte, so a cut
    can fall inside a character, and decoding such a prefix does not give back a prefix of the text."""

    def __init__(self, **kwargs):
        super().__init__(eos_token="<|im_end|>", pad_token="<|endoftext|>",
                         additional_special_tokens=["<|im_start|>"], **kwargs)
        self.chat_template = CHAT_TEMPLATE

    @property
    def vocab_size(self) -> int:
        return 256

    def get_vocab(self) -> dict[str, int]:
        return {**{f"<0x{byte:02X}>": byte for byte in range(256)}, **self.added_tokens_encoder}

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return [f"<0x{byte:02X}>" for byte in text.encode("utf-8")]

    def _convert_token_to_id(self, token: str) -> int:
        return int(token[3:5], 16)

    def _convert_id_to_token(self, index: int) -> str:
        return f"<0x{index:02X}>"

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return bytes(int(token[3:5], 16) for token in tokens if token.startswith("<0x")).decode("utf-8", "replace")


@pytest.fixture(scope="module", params=["fast", "slow"])
def tokenizer(request, tiny_model_dir):
    """The tiny model's byte-level BPE (a Rust tokenizer), and a slow byte tokenizer."""
    from transformers import AutoTokenizer

    if request.param == "fast":
        return AutoTokenizer.from_pretrained(tiny_model_dir)
    slow = ByteTokenizer()
    assert getattr(slow, "backend_tokenizer", None) is None  # the code paths without a Rust tokenizer
    return slow


_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=60)
_WORDS = st.lists(st.sampled_from(["tower", "Paris", '"quoted"', "é", "\n", "\\", "330", "metres", " ", "日本"]),
                  max_size=40).map(" ".join)
_DOCUMENTS = st.lists(st.lists(st.one_of(_WORDS, _TEXT).map(lambda text: {"contents": text}), min_size=1,
                               max_size=3), min_size=1, max_size=3)


def sft_observation_ids(dataset_dir, tokenizer, observation: str) -> list[int]:
    """What RagR1SFTDataset feeds the model for the observation of a one-search trajectory (mask 0)."""
    trajectory = f"<think>t</think><search> q </search>{observation}<answer> a </answer>"
    path = dataset_dir / "row.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": [{"role": "user", "content": "Q"}],
                                          "trajectory": trajectory}]), path)
    encoded = RagR1SFTDataset(str(path), tokenizer, OmegaConf.create({"max_length": 100_000})).encode(0)
    untrained = [i for i, bit in enumerate(encoded.loss_mask) if i >= encoded.prompt_length and bit == 0]
    return [encoded.input_ids[i] for i in untrained]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(documents=_DOCUMENTS, budget=st.integers(min_value=1, max_value=24), mode=st.sampled_from(["mq", "sq"]),
       fmt=st.sampled_from(["ragr1", "search_r1"]))
def test_rollout_teacher_and_sft_dataset_see_the_same_observation_tokens(tokenizer, tmp_path, documents, budget,
                                                                         mode, fmt):
    config = RagR1Config(mode=mode, observation_format=fmt, max_obs_tokens_per_query=budget)
    queries = [f"query {n}" for n in range(len(documents))] if mode == "mq" else ["query"]
    documents = documents if mode == "mq" else documents[:1]
    codec = policy_codec(tokenizer)

    text = observation_text(EpisodeSettings(config, Sampling(0.0, 1.0, 100), codec), queries, documents)
    rollout = observation_ids(_TokenizerState(tokenizer), config, queries, documents)
    assert rollout == codec.encode(text)
    assert sft_observation_ids(tmp_path, tokenizer, text) == rollout

    units = document_units(documents, mode, fmt)
    kept = _kept_units(text, mode, fmt, len(units))
    rendered = [json.dumps(unit)[1:-1] if mode == "mq" and fmt == "ragr1" else unit for unit in kept]
    assert all(unit.startswith(kept_unit) for unit, kept_unit in zip(units, kept, strict=True))
    assert max(_unit_token_counts(tokenizer, text, rendered), default=0) <= budget


def _unit_token_counts(tokenizer, text: str, rendered_units: list[str]) -> list[int]:
    """Tokens per unit as the documented rule counts them: a Rust tokenizer's tokens of the whole block by
    the unit their first character lies in; a slow tokenizer's tokens of the unit on its own."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return [len(tokenizer.encode(unit, add_special_tokens=False)) for unit in rendered_units]
    starts = [start for start, _ in backend.encode(text, add_special_tokens=False).offsets]
    counts, position = [], 0
    for unit in rendered_units:
        begin = text.index(unit, position)
        position = begin + len(unit)
        counts.append(sum(begin <= start < position for start in starts))
    return counts


def _kept_units(text: str, mode: str, fmt: str, count: int) -> list[str]:
    body = text.removeprefix("\n<information>\n").removesuffix("\n</information>\n")
    if mode == "mq" and fmt == "ragr1":
        return json.loads(body)["documents"]
    if mode == "sq":
        return [body]
    pieces = body.split("Results for: query ")[1:]
    return [piece.split("\n", 1)[1].removesuffix("\n\n") for piece in pieces][:count]
