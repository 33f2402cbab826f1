"""The generation backends of ``ragr1-eval``: token ids out, as the agent loop expects them."""

from __future__ import annotations

import asyncio

import pytest

from ragr1_verl.evaluation.backends import TransformersBackend, completion_ids


class CharTokenizer:
    def encode(self, text, add_special_tokens=False):
        return [ord(char) for char in text]


def test_completion_ids_prefer_the_servers_token_ids():
    assert completion_ids({"text": "ignored", "token_ids": [5, 6]}, CharTokenizer()) == [5, 6]


@pytest.mark.parametrize("stop_key", ["stop_reason", "matched_stop"])  # vLLM, SGLang
def test_completion_ids_restore_a_stop_string_the_server_cut(stop_key):
    choice = {"text": "<search> a, b ", "finish_reason": "stop", stop_key: "</search>"}
    assert completion_ids(choice, CharTokenizer()) == CharTokenizer().encode("<search> a, b </search>")
    # stopped on EOS (no stop string named): nothing is added
    eos = {"text": "done", "finish_reason": "stop", stop_key: None}
    assert completion_ids(eos, CharTokenizer()) == CharTokenizer().encode("done")


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_model_dir)).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def test_transformers_greedy_ids_and_logprobs_match_a_forward_pass(tiny_model):
    import torch

    model, tokenizer = tiny_model
    prompt = tokenizer.encode("Question: where is the Eiffel Tower?", add_special_tokens=False)
    output = asyncio.run(TransformersBackend(model, tokenizer).generate(
        "r", prompt_ids=prompt, sampling_params={"max_tokens": 6, "temperature": 0.0}))

    ids = list(prompt)
    for token, logprob in zip(output.token_ids, output.log_probs, strict=True):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1]
        expected = torch.log_softmax(logits.float(), dim=-1)
        assert token == int(expected.argmax())
        assert logprob == pytest.approx(float(expected[token]), abs=1e-4)
        ids.append(token)
    assert 0 < len(output.token_ids) <= 6


def test_batched_cpu_backend_decodes_concurrent_questions_as_the_single_backend_does(tiny_model, tmp_path):
    """Questions in flight together are decoded as one left-padded batch, with the same greedy tokens."""
    from ragr1_verl.evaluation.backends import BatchedCPUBackend

    model, tokenizer = tiny_model
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    prompts = [tokenizer.encode(text, add_special_tokens=False)
               for text in ("Question: where is the Eiffel Tower?", "Who?", "Question: when did the wall fall")]
    params = {"max_tokens": 5, "temperature": 0.0, "top_k": -1, "logprobs": False}

    async def run_batched():
        backend = BatchedCPUBackend(str(tmp_path))
        try:
            return await asyncio.gather(*(backend.generate(f"r{i}", prompt_ids=p, sampling_params=params)
                                          for i, p in enumerate(prompts)))
        finally:
            await backend.close()

    single = TransformersBackend(model, tokenizer)
    expected = [asyncio.run(single.generate("s", prompt_ids=p, sampling_params=params)).token_ids for p in prompts]
    assert [output.token_ids for output in asyncio.run(run_batched())] == expected
