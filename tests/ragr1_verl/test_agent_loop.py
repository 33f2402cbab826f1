"""RagR1AgentLoop through verl's real AgentLoopWorker: token layout, masks, logprobs, budgets, retrieval."""

from __future__ import annotations

import json

import pytest

from ragr1_verl.protocol.actions import INFORMATION_CLOSE, INFORMATION_OPEN
from tests.ragr1_verl.fakes import ScriptedLLM, fake_documents, fake_logprob, scripted
from tests.ragr1_verl.rollout import compose_trainer_config, run

QUESTION = "Which city has the Eiffel Tower?"
SEARCH_3 = "<think>I should look it up</think><search> Eiffel Tower, Paris, Gustave Eiffel </search>"
ANSWER = "<think>found it</think><answer> Paris </answer>"


def settings(retriever, **overrides) -> dict:
    return {"retriever": {"url": retriever.url, "max_retries": 1, "backoff_base_s": 0.01,
                          "coalesce_window_ms": 20}, **overrides}


def rollout(tiny_model_dir, retriever, turns, *, honor_stop=True, prompts=(QUESTION,), ragr1=None, **config_kwargs):
    config = compose_trainer_config(tiny_model_dir, ragr1=ragr1 or settings(retriever), **config_kwargs)
    script = turns if callable(turns) else scripted({QUESTION: turns})
    return run(config, lambda tokenizer: ScriptedLLM(tokenizer, script, honor_stop=honor_stop), prompts)


def information_json(tokenizer, ids) -> dict:
    text = tokenizer.decode(ids)
    assert text.startswith(f"\n{INFORMATION_OPEN}\n") and text.endswith(f"\n{INFORMATION_CLOSE}\n")
    return json.loads(text[len(INFORMATION_OPEN) + 2:-len(INFORMATION_CLOSE) - 2])


def test_search_then_answer_token_layout(tiny_model_dir, retriever):
    tokenizer, llm, [row] = rollout(tiny_model_dir, retriever, [SEARCH_3, ANSWER])

    generated = [call.token_ids for call in llm.calls]
    assert len(generated) == 2
    (mask_a, first), (mask_b, observation), (mask_c, second) = row.spans()
    assert (mask_a, mask_b, mask_c) == (1, 0, 1)
    assert first == generated[0] and second == generated[1]  # the model's own tokens, never re-tokenized
    assert llm.calls[1].prompt_ids == row.prompt_ids + first + observation  # token-in/token-out context
    assert row.prompt_ids == llm.calls[0].prompt_ids

    info = information_json(tokenizer, observation)
    assert info["query"] == ["Eiffel Tower", "Paris", "Gustave Eiffel"]
    assert [doc.splitlines()[0] for doc in info["documents"]] == [
        'Doc 1: "Eiffel Tower 1"', 'Doc 1: "Paris 1"', 'Doc 1: "Gustave Eiffel 1"']
    assert retriever.requests == [{"queries": ["Eiffel Tower", "Paris", "Gustave Eiffel"], "topk": 3,
                                   "return_scores": False}]
    assert row.extra["ragr1/answered"] and row.extra["ragr1/searches"] == 1
    assert row.extra["ragr1/queries_per_search"] == 3.0


def test_logprobs_align_with_tokens_and_are_zero_on_observations(tiny_model_dir, retriever):
    _, _, [row] = rollout(tiny_model_dir, retriever, [SEARCH_3, ANSWER])

    assert len(row.logprobs) == len(row.response_ids) == len(row.response_mask)
    for token, mask, logprob in zip(row.response_ids, row.response_mask, row.logprobs, strict=True):
        assert logprob == pytest.approx(fake_logprob(token) if mask else 0.0)


def test_duplicates_removed_and_queries_capped(tiny_model_dir, retriever):
    turns = ["<search> a , b, a,, c, d </search>", ANSWER]
    _, _, [row] = rollout(tiny_model_dir, retriever, turns)

    assert [request["queries"] for request in retriever.requests] == [["a", "b", "c"]]
    assert row.extra["ragr1/duplicates_removed"] == 1
    assert row.extra["ragr1/queries_dropped"] == 1


def test_json_bombs_in_a_search_never_kill_the_trajectory(tiny_model_dir, retriever):
    # A JSON-looking search that Python's parser refuses (nesting, digit limit) is split like plain text.
    turns = ["<search>" + "[" * 995 + "]" * 995 + "</search>", "<search>[" + "1" * 4301 + "]</search>", ANSWER]
    _, llm, [row] = rollout(tiny_model_dir, retriever, turns, ragr1=settings(retriever, max_tokens_per_turn=8192),
                            response_length=16384)

    assert len(llm.calls) == 3 and row.extra["ragr1/answered"]
    # Both were searched as one plain-text query (the second is over the server's query length: its search
    # failed, and the failure was an observation).
    assert row.extra["ragr1/searches"] == 2
    assert [request["queries"] for request in retriever.requests][0] == ["[" * 995 + "]" * 995]


def test_over_cap_can_make_the_search_invalid(tiny_model_dir, retriever):
    turns = ["<search> a, b, c, d </search>", ANSWER]
    tokenizer, _, [row] = rollout(tiny_model_dir, retriever, turns,
                                  ragr1=settings(retriever, over_query_cap="invalid"))

    assert retriever.requests == []
    message = tokenizer.decode(row.spans()[1][1])
    assert "not run" in message and "at most 3" in message
    assert row.extra["ragr1/invalid_actions"] == 1 and row.extra["ragr1/answered"]


def test_turn_budget_then_a_final_round_without_results(tiny_model_dir, retriever):
    turns = [f"<search> question {number} </search>" for number in range(10)]
    _, llm, [row] = rollout(tiny_model_dir, retriever, turns, ragr1=settings(retriever, max_turns=2))

    assert len(llm.calls) == 3  # two rounds with search, then the last round
    assert [request["queries"] for request in retriever.requests] == [["question 0"], ["question 1"]]
    assert [mask for mask, _ in row.spans()] == [1, 0, 1, 0, 1]
    assert row.extra["ragr1/budget_hit"] and not row.extra["ragr1/answered"]


def test_stop_strings_are_requested_and_the_turn_is_capped(tiny_model_dir, retriever):
    _, llm, _ = rollout(tiny_model_dir, retriever, [SEARCH_3, ANSWER],
                        ragr1=settings(retriever, max_tokens_per_turn=64))

    for call in llm.calls:
        assert call.sampling_params["stop"] == ["</search>", "</answer>"]
        assert call.sampling_params["max_tokens"] == 64
        assert call.sampling_params["logprobs"] is True  # verl's own sampling params pass through


def test_output_past_a_stop_string_is_trimmed_when_the_backend_ignores_stops(tiny_model_dir, retriever):
    turns = ["<think>x</think><search> Eiffel Tower </search> and then <answer> Rome </answer>", ANSWER]
    tokenizer, llm, [row] = rollout(tiny_model_dir, retriever, turns, honor_stop=False)

    first = row.spans()[0][1]
    assert tokenizer.decode(first).endswith("</search>")
    assert first == llm.calls[0].token_ids[:len(first)]
    assert row.extra["ragr1/trimmed_tokens"] == len(llm.calls[0].token_ids) - len(first) > 0
    assert retriever.requests[0]["queries"] == ["Eiffel Tower"]
    assert not any(" Rome " in tokenizer.decode(ids) for mask, ids in row.spans() if mask)


def test_single_query_mode_keeps_commas_and_uses_plain_lines(tiny_model_dir, retriever):
    turns = ["<search> Paris, Texas </search>", ANSWER]
    tokenizer, _, [row] = rollout(tiny_model_dir, retriever, turns, ragr1=settings(retriever, mode="sq"))

    assert retriever.requests[0]["queries"] == ["Paris, Texas"]
    text = tokenizer.decode(row.spans()[1][1])
    assert text.startswith(f"\n{INFORMATION_OPEN}\nDoc 1: \"Paris, Texas 1\"") and "{" not in text


def test_search_r1_observation_format(tiny_model_dir, retriever):
    turns = ["<search> Eiffel Tower, Paris </search>", ANSWER]
    tokenizer, _, [row] = rollout(tiny_model_dir, retriever, turns,
                                  ragr1=settings(retriever, observation_format="search_r1", topk=2))

    text = tokenizer.decode(row.spans()[1][1])
    assert "Doc 1 (Title: Eiffel Tower 1) Passage 1 about Eiffel Tower." in text
    assert "Doc 2 (Title: Paris 2) Passage 2 about Paris." in text
    assert retriever.requests[0]["topk"] == 2


def test_retrieval_failure_becomes_an_observation_and_the_rollout_recovers(tiny_model_dir, retriever):
    retriever.failures_left = 2  # the first search fails on both attempts (max_retries 1)
    turns = ["<search> Eiffel Tower </search>", "<search> Eiffel Tower </search>", ANSWER]
    tokenizer, llm, [row] = rollout(tiny_model_dir, retriever, turns)

    assert len(llm.calls) == 3 and len(retriever.requests) == 3
    failed, recovered = row.spans()[1][1], row.spans()[3][1]
    assert "search failed" in tokenizer.decode(failed) and "503" in tokenizer.decode(failed)
    assert information_json(tokenizer, recovered)["query"] == ["Eiffel Tower"]
    assert row.extra["ragr1/retrieval_failures"] == 1 and row.extra["ragr1/answered"]


def test_unreachable_retriever_never_raises_into_verl(tiny_model_dir, retriever):
    config = settings(retriever)
    config["retriever"]["url"] = "http://127.0.0.1:9/retrieve"  # discard port: connection refused
    tokenizer, _, [row] = rollout(tiny_model_dir, retriever, [SEARCH_3, ANSWER], ragr1=config)

    assert "search failed" in tokenizer.decode(row.spans()[1][1])
    assert row.extra["ragr1/answered"]


def test_invalid_action_gets_a_reminder_and_eos_ends_the_turn(tiny_model_dir, retriever):
    turns = ["I think the answer is Paris", " Paris<|im_end|>"]
    tokenizer, llm, [row] = rollout(tiny_model_dir, retriever, turns,
                                    ragr1=settings(retriever, max_tokens_per_turn=6))

    assert len(llm.calls) == 2  # capped turn without an action: reminder; then EOS ends the trajectory
    assert "<search>" in tokenizer.decode(row.spans()[1][1])
    assert row.spans()[-1][0] == 1 and row.response_ids[-1] == tokenizer.eos_token_id
    assert row.extra["ragr1/invalid_actions"] == 1 and not row.extra["ragr1/answered"]


def test_response_is_truncated_to_response_length(tiny_model_dir, retriever):
    turns = [SEARCH_3, ANSWER]
    _, llm, [row] = rollout(tiny_model_dir, retriever, turns, response_length=60)

    assert len(row.response_ids) == len(row.response_mask) == len(row.logprobs) == 60
    assert len(llm.calls) == 1  # the observation filled the budget
    assert row.extra["ragr1/truncated"]


def test_concurrent_trajectories_share_one_retriever_request(tiny_model_dir, retriever):
    questions = [f"Question number {number}?" for number in range(4)]
    script = scripted({question: [f"<search> topic {number}, shared topic </search>", ANSWER]
                       for number, question in enumerate(questions)})
    tokenizer, _, rows = rollout(tiny_model_dir, retriever, script, prompts=questions)

    assert len(retriever.requests) == 1
    assert sorted(retriever.requests[0]["queries"]) == sorted([f"topic {n}" for n in range(4)] + ["shared topic"])
    for number, row in enumerate(rows):
        assert information_json(tokenizer, row.spans()[1][1])["query"] == [f"topic {number}", "shared topic"]


def test_prompt_template_from_config_rerenders_the_question(tiny_model_dir, retriever):
    config = compose_trainer_config(tiny_model_dir, ragr1=settings(retriever, prompt_template="sq"))
    script = scripted({"Who built it?": [ANSWER]})
    tokenizer, llm, _ = run(config, lambda tok: ScriptedLLM(tok, script), ["placeholder"],
                            [{"question": "  Who built it"}])

    prompt = tokenizer.decode(llm.calls[0].prompt_ids)
    assert "Question: Who built it?" in prompt and "placeholder" not in prompt
    assert "up to three" not in prompt  # the single-query template


def test_a_missing_ragr1_section_fails_loudly_with_instructions(tiny_model_dir):
    from ragr1_verl.agent_loop import config_for
    from ragr1_verl.config import ConfigError

    config = compose_trainer_config(tiny_model_dir)
    with pytest.raises(ConfigError, match=r"\+recipe=ragr1"):
        config_for(config)


def test_each_querys_documents_are_cut_to_max_obs_tokens_per_query(tiny_model_dir, retriever):
    turns = ["<search> Eiffel Tower, Paris </search>", ANSWER]
    tokenizer, _, [row] = rollout(tiny_model_dir, retriever, turns,
                                  ragr1=settings(retriever, max_obs_tokens_per_query=12))

    documents = information_json(tokenizer, row.spans()[1][1])["documents"]
    for query, text in zip(["Eiffel Tower", "Paris"], documents, strict=True):
        full = "\n".join(f"Doc {rank}: {doc['contents']}" for rank, doc in enumerate(fake_documents(query, 3), 1))
        assert full.startswith(text) and len(text) < len(full)  # a prefix of the documents, cut short
        # the budget counts the tokens the model sees: the text as escaped inside the JSON observation
        assert len(tokenizer.encode(json.dumps(text)[1:-1], add_special_tokens=False)) <= 12


def test_in_single_query_mode_the_whole_observation_is_cut_to_the_budget(tiny_model_dir, retriever):
    turns = ["<search> Eiffel Tower </search>", ANSWER]
    tokenizer, _, [row] = rollout(tiny_model_dir, retriever, turns,
                                  ragr1=settings(retriever, mode="sq", max_obs_tokens_per_query=10))

    body = tokenizer.decode(row.spans()[1][1]).removeprefix(f"\n{INFORMATION_OPEN}\n")
    body = body.removesuffix(f"\n{INFORMATION_CLOSE}\n")
    full = "\n".join(f"Doc {rank}: {doc['contents']}" for rank, doc in enumerate(fake_documents("Eiffel Tower", 3), 1))
    assert full.startswith(body) and len(body) < len(full)
    assert len(tokenizer.encode(body, add_special_tokens=False)) <= 10


def test_the_servers_weight_versions_span_the_trajectory(tiny_model_dir, retriever):
    # verl's trainer reads min/max_global_steps of every trajectory (the weight versions it was generated with)
    config = compose_trainer_config(tiny_model_dir, ragr1=settings(retriever))
    versions = lambda call: {"min_global_steps": 10 + call, "max_global_steps": 10 + call}  # noqa: E731
    make_llm = lambda tokenizer: ScriptedLLM(tokenizer, scripted({QUESTION: [SEARCH_3, SEARCH_3, ANSWER]}),  # noqa: E731
                                             server_fields=versions)
    _, llm, [row] = run(config, make_llm, [QUESTION])

    assert len(llm.calls) == 3
    assert (row.extra["min_global_steps"], row.extra["max_global_steps"]) == (11, 13)
