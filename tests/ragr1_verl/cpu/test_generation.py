"""The CPU rollout's generation against a direct transformers forward pass: token-in/token-out, per-token
log-probabilities, batching with left padding, stop strings and stop tokens, and the server actor's calls
(run in-process, without Ray)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from ragr1_verl.cpu.generation import SamplingSettings, TransformersGenerator

PROMPTS = ["<think> I need to look this up </think>", "Doc 1: \"Eiffel Tower\" The tower is", "<search> a, b"]


@pytest.fixture(scope="module")
def generator(tiny_model_with_weights):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_with_weights)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_with_weights, dtype=torch.float32,
                                                 attn_implementation="sdpa")
    return TransformersGenerator(model, tokenizer, eos_ids=[], seed=0)


def encode(generator, text: str) -> list[int]:
    return generator.tokenizer.encode(text, add_special_tokens=False)


def direct_logprobs(generator, prompt: list[int], generated: list[int], temperature: float = 1.0) -> torch.Tensor:
    """log p(generated[i] | prompt + generated[:i]) from one forward pass over the whole sequence, no cache."""
    with torch.no_grad():
        logits = generator.model(input_ids=torch.tensor([prompt + generated])).logits[0].float()
    steps = logits[len(prompt) - 1:-1] / temperature
    return torch.log_softmax(steps, dim=-1).gather(-1, torch.tensor(generated)[:, None])[:, 0]


def greedy(max_tokens: int, **kwargs) -> SamplingSettings:
    return SamplingSettings(max_tokens=max_tokens, temperature=0.0, **kwargs)


def test_greedy_tokens_and_logprobs_match_a_direct_forward_pass(generator):
    prompt = encode(generator, PROMPTS[0])
    [output] = generator.generate([prompt], [greedy(12)])
    assert len(output.token_ids) == len(output.log_probs) == 12 and output.finish_reason == "length"
    with torch.no_grad():
        logits = generator.model(input_ids=torch.tensor([prompt + output.token_ids])).logits[0]
    assert output.token_ids == logits[len(prompt) - 1:-1].argmax(-1).tolist()  # each token is the argmax
    expected = direct_logprobs(generator, prompt, output.token_ids)
    torch.testing.assert_close(torch.tensor(output.log_probs), expected, atol=1e-4, rtol=1e-4)


def test_a_left_padded_batch_gives_what_each_prompt_gives_alone(generator):
    prompts = [encode(generator, text) for text in PROMPTS]
    assert len({len(p) for p in prompts}) > 1  # different lengths: the batch is left-padded
    batch = generator.generate(prompts, [greedy(8)] * len(prompts))
    for prompt, together in zip(prompts, batch, strict=True):
        [alone] = generator.generate([prompt], [greedy(8)])
        assert together.token_ids == alone.token_ids
        torch.testing.assert_close(torch.tensor(together.log_probs), torch.tensor(alone.log_probs),
                                   atol=1e-4, rtol=1e-4)


def test_sampled_logprobs_are_those_of_the_temperature_scaled_distribution(generator):
    prompt = encode(generator, PROMPTS[1])
    settings = SamplingSettings(max_tokens=10, temperature=0.7, top_p=0.9, top_k=50, seed=3)
    [output] = generator.generate([prompt], [settings])
    expected = direct_logprobs(generator, prompt, output.token_ids, temperature=0.7)
    torch.testing.assert_close(torch.tensor(output.log_probs), expected, atol=1e-4, rtol=1e-4)
    [again] = generator.generate([prompt], [settings])
    assert again.token_ids == output.token_ids  # a per-request seed makes sampling reproducible


def test_a_stop_string_ends_generation_at_the_token_that_completes_it(generator):
    prompt = encode(generator, PROMPTS[2])
    [free] = generator.generate([prompt], [greedy(16)])
    decode = generator.tokenizer.decode
    text = decode(free.token_ids, skip_special_tokens=True)
    stop = text[len(text) // 2:len(text) // 2 + 3]
    assert stop.strip(), text
    expected_end = next(end for end in range(1, len(free.token_ids) + 1)
                        if stop in decode(free.token_ids[:end], skip_special_tokens=True))
    [stopped] = generator.generate([prompt], [greedy(16, stop=(stop,))])
    assert stopped.token_ids == free.token_ids[:expected_end] and stopped.finish_reason == "stop"
    assert stopped.log_probs == pytest.approx(free.log_probs[:expected_end], abs=1e-5)


def test_stop_and_eos_tokens_are_kept_and_end_only_their_own_row(generator):
    prompts = [encode(generator, PROMPTS[0]), encode(generator, PROMPTS[1])]
    [first, other] = generator.generate(prompts, [greedy(6)] * 2)
    stop_token = first.token_ids[2]
    expected_end = first.token_ids.index(stop_token) + 1
    [stopped, untouched] = generator.generate(prompts, [greedy(6, stop_token_ids=(stop_token,)), greedy(6)])
    assert stopped.token_ids == first.token_ids[:expected_end] and stopped.finish_reason == "stop"
    assert untouched.token_ids == other.token_ids and untouched.finish_reason == "length"


def test_eos_ends_generation_unless_ignored(tiny_model_with_weights, generator):
    prompt = encode(generator, PROMPTS[0])
    [free] = generator.generate([prompt], [greedy(5)])
    with_eos = TransformersGenerator(generator.model, generator.tokenizer, eos_ids=[free.token_ids[0]])
    [ended] = with_eos.generate([prompt], [greedy(5)])
    assert ended.token_ids == free.token_ids[:1] and ended.finish_reason == "stop"
    [ignored] = with_eos.generate([prompt], [greedy(5, ignore_eos=True)])
    assert ignored.token_ids == free.token_ids


def test_sampling_settings_read_vllm_style_requests():
    settings = SamplingSettings.from_request({"max_new_tokens": 7, "stop": "</search>", "temperature": 0,
                                              "top_k": -1, "repetition_penalty": 1.0, "logprobs": False}, 99)
    assert settings == SamplingSettings(max_tokens=7, temperature=0.0, stop=("</search>",), logprobs=False)
    assert SamplingSettings.from_request({}, 99).max_tokens == 99
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingSettings.from_request({"max_tokens": -1}, 99)


def test_the_server_batches_concurrent_requests_and_loads_trainer_weights(tiny_model_with_weights):
    from ragr1_verl.cpu.rollout import CPUGenerationServer

    server = CPUGenerationServer(str(tiny_model_with_weights), default_max_tokens=6, batch_wait_s=0.05)
    prompts = [server.generator.tokenizer.encode(text, add_special_tokens=False) for text in PROMPTS]
    params = {"temperature": 0, "logprobs": True}
    zeros = {name: torch.zeros_like(p) for name, p in server.generator.model.named_parameters()}
    direct = server.generator.generate(prompts, [SamplingSettings(max_tokens=6, temperature=0.0)] * 3)

    async def scenario():  # one event loop, as in the Ray actor
        outputs = await asyncio.gather(*[server.generate(prompt_ids=p, sampling_params=params, request_id=str(i))
                                         for i, p in enumerate(prompts)])
        loaded = await server.update_weights(zeros, global_steps=3)
        after = await server.generate(prompts[0], params)
        with pytest.raises(KeyError, match="does not have"):
            await server.update_weights({"no.such.weight": torch.zeros(1)})
        await server.close()
        return outputs, loaded, after

    outputs, loaded, after = asyncio.run(scenario())
    assert [o.token_ids for o in outputs] == [d.token_ids for d in direct]
    assert all(len(o.log_probs) == 6 and o.stop_reason == "completed" for o in outputs)
    assert loaded == len(zeros) and server.get_state()["weight_updates"] == 1
    assert after.log_probs != outputs[0].log_probs and after.extra_fields["global_steps"] == 3
