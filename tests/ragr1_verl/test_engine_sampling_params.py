"""The rollout's generation request is valid for the vLLM and SGLang versions verl 0.9 pins.

The engines' accepted ``SamplingParams`` names come from their released wheels, read (never imported) by
``scripts/check_engine_sampling_params.py`` into ``tests/data/engine_sampling_params.json``. verl's own
servers translate the request before building ``SamplingParams``; the translation is modelled here after
verl's source, and the test checks that the installed verl still reads that way.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ragr1_verl.agent_loop import round_sampling_params

SNAPSHOT = json.loads((Path(__file__).resolve().parents[1] / "data" / "engine_sampling_params.json").read_text())
# verl/experimental/agent_loop/agent_loop.py (AgentLoopManager): what every agent loop receives.
VERL_SAMPLING = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0, "logprobs": True}


def vllm_request(params: dict) -> dict:
    """verl/workers/rollout/vllm_rollout/vllm_async_server.py, generate(): max_tokens taken out and passed
    on by name, logprobs 0/None, repetition_penalty and ignore_eos defaulted, seed under full determinism."""
    params = dict(params)
    max_tokens = params.pop("max_tokens")
    params["logprobs"] = 0 if params.pop("logprobs", False) else None
    params.setdefault("repetition_penalty", 1.0)
    params.setdefault("ignore_eos", False)
    params.setdefault("seed", 0)
    return {"max_tokens": max_tokens, **params}


def sglang_request(params: dict) -> dict:
    """verl/workers/rollout/sglang_rollout/async_sglang_server.py, generate(): max_tokens becomes
    max_new_tokens, logprobs becomes the request's return_logprob."""
    params = dict(params)
    params["max_new_tokens"] = params.pop("max_tokens")
    params.pop("logprobs", None)
    return params


@pytest.mark.parametrize("stop_strings", [True, False])
@pytest.mark.parametrize("engine, translate", [("vllm", vllm_request), ("sglang", sglang_request)])
def test_every_key_of_a_round_is_accepted_by_the_engine(engine, translate, stop_strings):
    request = translate(round_sampling_params(VERL_SAMPLING, 96, stop_strings))
    accepted = set(SNAPSHOT[engine]["accepted"])
    assert set(request) <= accepted, (engine, sorted(set(request) - accepted))
    assert request.get("stop") == (["</search>", "</answer>"] if stop_strings else None)
    assert request.get("max_tokens", request.get("max_new_tokens")) == 96


def test_verl_still_sends_the_modelled_sampling_parameters():
    source = _verl_source("experimental/agent_loop/agent_loop.py")
    for key in VERL_SAMPLING:
        assert f"{key}=" in source.split("sampling_params = dict(", 1)[1].split(")", 1)[0], key


def test_the_engine_versions_are_the_ones_verl_pins():
    from importlib.metadata import requires

    pinned = {requirement.split(";")[0].strip().replace(" ", "") for requirement in requires("verl") or []}
    for engine, data in SNAPSHOT.items():
        assert data["requirement"] in pinned, f"verl now pins another {engine}: rerun the check script"


def _verl_source(relative: str) -> str:
    import verl  # the servers import vllm/sglang at module level: read them, do not import them

    return (Path(verl.__file__).parent / relative).read_text(encoding="utf-8")


def test_verls_servers_still_translate_the_request_as_modelled():
    vllm = _verl_source("workers/rollout/vllm_rollout/vllm_async_server.py")
    assert 'max_tokens = sampling_params.pop("max_tokens")' in vllm
    assert "SamplingParams(max_tokens=max_tokens, **sampling_params)" in vllm
    assert 'sampling_params["logprobs"] = 0 if sampling_params.pop("logprobs", False) else None' in vllm
    sglang = _verl_source("workers/rollout/sglang_rollout/async_sglang_server.py")
    assert 'max_new_tokens = sampling_params.pop("max_tokens")' in sglang
    assert 'sampling_params["max_new_tokens"] = max_new_tokens' in sglang
