"""Evaluation protocols: ``project`` (the training rollout's rules) and ``paper`` (the original evaluation).

Numbers are only comparable with the paper's under the paper's protocol, and most disagreements about
Search-R1-style results come from a silent difference in it. Each field of :class:`EvalProtocol` is one row
of the protocol table in ``docs/guides/evaluation.md``, where the line of RAG-R1's ``evaluation/eval_multiquery.py`` each ``paper``
value follows is given.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ragr1_verl.config import RagR1Config

logger = logging.getLogger(__name__)

PROTOCOL_NAMES = ("project", "paper")
UNLIMITED_OBSERVATION_TOKENS = 1_000_000  # the original never cuts retrieved text
SERVER_QUERY_CAP = 512  # the original caps nothing; our retriever answers at most this many queries a request


@dataclass(frozen=True)
class EvalProtocol:
    name: str
    max_tokens_per_turn: int
    max_turns: int
    final_round: bool
    max_obs_tokens_per_query: int
    max_queries_per_search: int
    max_response_tokens: int
    temperature: float
    sampling_from_generation_config: bool  # top_p, top_k, repetition_penalty as the checkpoint's generate()
    normalizer: Literal["training", "eval_script"]
    gold: Literal["any_alias", "first"]


_TRAINING = RagR1Config()  # the project protocol keeps the training rollout's per-round rules
PROJECT = EvalProtocol("project", max_tokens_per_turn=_TRAINING.max_tokens_per_turn, max_turns=5,
                       final_round=_TRAINING.final_round, max_obs_tokens_per_query=_TRAINING.max_obs_tokens_per_query,
                       max_queries_per_search=_TRAINING.max_queries_per_search, max_response_tokens=6144,
                       temperature=0.7, sampling_from_generation_config=False, normalizer="training",
                       gold="any_alias")
PAPER = EvalProtocol("paper", max_tokens_per_turn=1024, max_turns=5, final_round=False,
                     max_obs_tokens_per_query=UNLIMITED_OBSERVATION_TOKENS, max_queries_per_search=SERVER_QUERY_CAP,
                     max_response_tokens=30_720, temperature=0.7, sampling_from_generation_config=True,
                     normalizer="eval_script", gold="first")
PROTOCOLS = {protocol.name: protocol for protocol in (PROJECT, PAPER)}

# The paper's Table 3 (EM, Qwen2.5-7B-Instruct backbone), in its column order.
PAPER_COLUMNS = ("nq", "popqa", "triviaqa", "hotpotqa", "2wikimultihopqa", "musique", "bamboogle")
PAPER_TABLE3 = {
    "mq": dict(zip(PAPER_COLUMNS, (42.3, 47.9, 60.8, 49.5, 55.6, 19.2, 43.2), strict=True)),
    "sq": dict(zip(PAPER_COLUMNS, (42.9, 47.7, 59.9, 47.4, 48.1, 18.1, 43.2), strict=True)),
}
PAPER_AVERAGE = {"mq": 45.5, "sq": 43.9}


@dataclass(frozen=True)
class SamplingDefaults:
    top_p: float = 1.0
    top_k: int = -1
    repetition_penalty: float = 1.0
    source: str = "fixed (top_p 1, top_k off)"


def generation_config_sampling(model: str | Path) -> SamplingDefaults:
    """What ``transformers``' ``generate`` samples with for this checkpoint (a folder or hub name): its
    generation config (Qwen2.5-7B-Instruct: top_p 0.8, top_k 20, repetition_penalty 1.05), and transformers'
    defaults (top_p 1, top_k 50, repetition_penalty 1) where it sets none or has none."""
    from transformers import GenerationConfig

    try:
        config = GenerationConfig.from_pretrained(str(model))
        source = f"{model}'s generation config"
    except (OSError, ValueError) as err:
        logger.warning("%s: no generation config (%s); sampling with transformers' defaults, as generate() "
                       "would", model, err)
        config, source = GenerationConfig(), "transformers' defaults (no generation config)"
    return SamplingDefaults(float(config.top_p if config.top_p is not None else 1.0),
                            int(config.top_k if config.top_k is not None else 50),
                            float(config.repetition_penalty if config.repetition_penalty is not None else 1.0),
                            source)
