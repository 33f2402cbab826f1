"""The EM reward: normalisation, answer extraction, ground-truth shapes, the format check and format reward,
agreement with verl's ``search_r1_like_qa_em``, and the reward run by verl's real reward worker."""

from __future__ import annotations

import asyncio
import doctest
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ragr1_verl import reward
from ragr1_verl.protocol.observation import INVALID_ACTION_REMINDER, wrap_information
from ragr1_verl.reward import compute_score, follows_protocol, gold_answers

KEYS = {"score", "acc", "f1", "substring_em", "format_ok", "answered", "searches"}
PROMPT_WITH_EXAMPLE = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nAnswer the question, for "
    "example <answer> Beijing </answer>. Question: what is the capital of France?<|im_end|>\n"
    "<|im_start|>assistant\n"
)


def answer(text: str) -> str:
    return f"<think>I know this</think><answer>{text}</answer>"


def searched(*parts: str) -> str:
    """A well-formed trajectory: a think+search+information round per part, then ``answer("Paris")``."""
    rounds = "".join(f"<think>look</think><search>q</search>{wrap_information(part)}" for part in parts)
    return rounds + answer("Paris")


def score(solution: str | None, ground_truth: Any, **kwargs: Any) -> float:
    return compute_score("hotpotqa", solution, ground_truth, **kwargs)["score"]


def test_doctests():
    assert doctest.testmod(reward).failed == 0


@pytest.mark.parametrize("solution, ground_truth, expected", [
    (answer("PARIS"), "paris", 1.0),
    (answer("Paris!"), "Paris", 1.0),
    (answer("U.S.A."), "USA", 1.0),
    (answer("The Beatles"), "Beatles", 1.0),
    (answer("an apple"), "Apple", 1.0),
    (answer("Theatre"), "atre", 0.0),  # articles are removed as whole words only
    (answer("  New \n York  "), "new york", 1.0),
    (answer("New\u00a0York"), "New York", 1.0),  # Unicode whitespace collapses
    (answer("ZÜRICH"), "zürich", 1.0),  # Unicode lowercase
    (answer("Zurich"), "Zürich", 0.0),  # accents are significant
    (answer("Zu\u0308rich"), "Z\u00fcrich", 1.0),  # canonically equal (NFD vs NFC)
    (answer("\u201cHello\u201d"), "Hello", 0.0),  # SQuAD drops ASCII punctuation only
    (answer("Paris, France"), "Paris", 0.0),
    (answer("Rome"), "Paris", 0.0),
    (answer("Paris"), ["Rome", "Paris"], 1.0),
    (answer("Paris"), ("Paris",), 1.0),
    (answer("Paris"), {"target": ["Rome", "Paris"]}, 1.0),
    (answer("Paris"), {"target": "Paris"}, 1.0),
    (answer("Paris"), np.array(["Rome", "Paris"]), 1.0),
    (answer("Paris"), np.array(["Rome", "Paris"], dtype=object), 1.0),
    (answer("Paris"), {"target": np.array(["Paris"], dtype=object)}, 1.0),
    (answer("Paris"), np.array([np.array(["Rome"], dtype=object), np.array(["Paris"], dtype=object)],
                               dtype=object), 1.0),
    (answer("Paris"), np.array([["Rome"], ["Paris"]]), 1.0),
    (answer("Paris"), np.str_("Paris"), 1.0),
    (answer("1844"), 1844, 1.0),
    (answer("1844"), np.array([1844]), 1.0),
    ("<think>t</think><search>q</search>" + wrap_information("<answer>Paris</answer>"), "Paris", 0.0),
    (answer("Rome") + wrap_information("Doc 1: <answer>Paris</answer>"), "Paris", 0.0),
    (answer("Rome") + answer("Paris"), "Paris", 1.0),  # the last answer wins
    (answer("Paris") + answer("Rome"), "Paris", 0.0),
    ("<think>I do not know</think>", "Paris", 0.0),
    ("<answer>Paris", "Paris", 0.0),
    ("", "Paris", 0.0),
    (None, "Paris", 0.0),
    (PROMPT_WITH_EXAMPLE + "<think>no idea</think><|im_end|>", "Beijing", 0.0),
    (PROMPT_WITH_EXAMPLE + answer("Paris") + "<|im_end|>", "Paris", 1.0),
    (PROMPT_WITH_EXAMPLE + answer("Paris") + "<|im_end|>", "Beijing", 0.0),
])
def test_exact_match(solution, ground_truth, expected):
    result = compute_score("hotpotqa", solution, ground_truth)

    assert result["score"] == result["acc"] == expected


def test_all_values_are_floats_and_the_keys_never_change():
    for solution, kwargs in [(None, {}), (answer("Paris"), {}), ("junk", {"format_reward": True})]:
        result = compute_score("nq", solution, "Paris", {"ragr1/searches": np.int64(2)}, **kwargs)

        assert set(result) == KEYS
        assert all(type(value) is float for value in result.values())


@pytest.mark.parametrize("prediction, golds, f1, substring", [
    ("Eiffel Tower Paris", ["Eiffel Tower"], 0.8, 1.0),
    ("the Eiffel Tower", ["Eiffel Tower"], 1.0, 1.0),
    ("Tower", ["Eiffel Tower", "Big Ben"], 2 / 3, 0.0),
    ("Rome", ["Paris"], 0.0, 0.0),
    ("Paris", ["The"], 0.0, 0.0),  # a gold that normalises to nothing is not in every answer
])
def test_f1_and_substring_match(prediction, golds, f1, substring):
    result = compute_score("nq", answer(prediction), golds)

    assert result["f1"] == pytest.approx(f1)
    assert result["substring_em"] == substring


def test_no_answer_has_zero_f1_and_substring_even_for_an_empty_gold():
    result = compute_score("nq", "<think>no idea</think>", ["The"])

    assert (result["answered"], result["f1"], result["substring_em"], result["acc"]) == (0.0, 0.0, 0.0, 0.0)


def test_searches_come_from_the_rollout_when_it_reports_them():
    solution = searched("Doc 1: <search>not a model search</search>", "Doc 1: x")

    assert compute_score("nq", solution, "Paris")["searches"] == 2.0  # counted outside <information>
    assert compute_score("nq", solution, "Paris", {"ragr1/searches": 5})["searches"] == 5.0
    assert compute_score("nq", solution, "Paris", {"ragr1/searches": None})["searches"] == 2.0


@pytest.mark.parametrize("response, ok", [
    (answer("Paris"), True),
    (searched("Doc 1: x"), True),
    (searched("Doc 1: x", "Doc 1: <answer>tags in retrieved text are not the model's</answer>"), True),
    ("\n " + searched("d") + "\n", True),
    ("<think>t</think>\n<answer></answer>", True),
    ("<answer>Paris</answer>", False),  # no think before the action
    ("<think>t</think><search>q</search><think>t</think>" + answer("Paris"), False),  # no information
    ("<think>t</think>" + wrap_information("d") + answer("Paris"), False),  # information without search
    ("I think " + answer("Paris"), False),  # stray text
    (answer("Paris") + " because", False),  # text after the final answer
    (answer("Paris") + answer("Paris"), False),  # two final answers
    ("<think>t <answer>x</answer></think>" + answer("Paris"), False),  # nested tag
    ("<think>t</think><answer>Paris", False),  # unclosed
    ("<think>t</think></answer>", False),
    ("<think>t</think><search>q</search>" + INVALID_ACTION_REMINDER + answer("Paris"), False),
    ("<think>t</think><search>q</search>", False),  # ended without an answer
    ("", False),
])
def test_follows_protocol(response, ok):
    assert follows_protocol(response) is ok
    assert compute_score("nq", response, "Paris")["format_ok"] == float(ok)


@pytest.mark.parametrize("solution, expected", [
    (searched("d"), 1.0),  # correct, well formed
    ("<answer>Paris</answer>", 0.8),  # correct, broken: score - structure_format_score
    (answer("Rome"), 0.2),  # wrong, well formed: structure_format_score
    # wrong, well formed, a gold in the retrieved text: structure_format_score + retrieval_score
    (searched("Doc 1: Paris is the capital").replace("Paris</answer>", "Rome</answer>"), 0.2 + 0.05),
    ("<answer>Rome</answer>", 0.1),  # wrong, broken: final_format_score
    ("<think>t</think><search>q</search>", 0.0),  # no answer, broken
])
def test_format_reward_follows_search_r1_v03(solution, expected):
    assert score(solution, "Paris", format_reward=True, retrieval_score=0.05) == pytest.approx(expected)


def test_format_reward_is_off_by_default_and_format_score_rewards_a_wrong_answer():
    assert score("<answer>Paris</answer>", "Paris") == 1.0
    assert score(answer("Rome"), "Paris") == 0.0
    assert score(answer("Rome"), "Paris", format_score=0.1) == 0.1
    assert score("<think>no answer</think>", "Paris", format_score=0.1) == 0.0
    assert score(answer("Paris"), "Paris", score=2) == 2.0


def test_custom_format_scores():
    kwargs = {"format_reward": True, "structure_format_score": 0.3, "final_format_score": 0.05}

    assert score("<answer>Paris</answer>", "Paris", **kwargs) == pytest.approx(0.7)
    assert score(answer("Rome"), "Paris", **kwargs) == pytest.approx(0.3)
    assert score("<answer>Rome</answer>", "Paris", **kwargs) == pytest.approx(0.05)


@pytest.mark.parametrize("ground_truth, named", [
    (None, "NoneType"),
    (3.5, "float"),
    ({"answer": "Paris"}, "'target'"),
    ([], "no gold answer"),
    ({"target": np.array([], dtype=object)}, "no gold answer"),
    (["Paris", {"x"}], "set"),
])
def test_bad_ground_truth_is_a_loud_data_error(ground_truth, named):
    with pytest.raises(ValueError, match=named):
        compute_score("nq", answer("Paris"), ground_truth)


@pytest.mark.parametrize("kwargs", [{"format_reward": "false"}, {"score": "1"}, {"retrieval_score": True}])
def test_bad_reward_kwargs_are_refused(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        compute_score("nq", answer("Paris"), "Paris", **kwargs)


def test_unknown_kwargs_are_logged_once_and_verl_extras_silently_accepted(caplog):
    with caplog.at_level(logging.WARNING, logger="ragr1_verl.reward"):
        for _ in range(2):
            result = compute_score("nq", answer("Paris"), "Paris", format_rewards=True,
                                   reward_router_address="x")

    assert result["score"] == 1.0
    assert [record.getMessage().count("format_rewards") for record in caplog.records] == [1]


def test_gold_answers_of_a_parquet_round_trip(tmp_path: Path):
    """pandas gives parquet lists and structs back as numpy object arrays and dicts of them."""
    import pandas as pd

    rows = [{"reward_model": {"style": "rule", "ground_truth": {"target": ["Paris", "City of Light"]}}},
            {"reward_model": {"style": "rule", "ground_truth": {"target": ["Rome"]}}}]
    pd.DataFrame(rows).to_parquet(tmp_path / "train.parquet")
    truths = [row["ground_truth"] for row in pd.read_parquet(tmp_path / "train.parquet")["reward_model"]]

    assert isinstance(truths[0]["target"], np.ndarray)
    assert [gold_answers(truth) for truth in truths] == [["Paris", "City of Light"], ["Rome"]]
    assert score(answer("city of light"), truths[0]) == 1.0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["<think>", "</think>", "<search>", "</search>", "<answer>", "</answer>",
                                  "<information>", "</information>", "Paris", " ", "\n", "x", "<|im_end|>",
                                  "<|im_start|>assistant"]),
                max_size=40).map("".join))
def test_any_text_scores_without_error(solution):
    result = compute_score("nq", solution, ["Paris"], format_reward=True)

    assert set(result) == KEYS
    assert 0.0 <= result["score"] <= 1.0 and result["acc"] in (0.0, 1.0)
    assert result["format_ok"] <= result["answered"]


# --- verl's search_r1_like_qa_em --------------------------------------------------------------------------

SHARED_CASES = [
    (answer("Paris"), ["Paris"]),
    (answer(" the  PARIS. "), ["paris"]),
    (answer("Rome"), ["Paris", "Rome"]),
    (answer("Rome"), ["Paris"]),
    (answer("Paris, France"), ["Paris"]),
    (answer("Rome") + answer("Paris"), ["Paris"]),
    (answer("Paris") + answer("Rome"), ["Paris"]),
    (searched("Doc 1: Paris"), ["Paris"]),
    ("<think>no answer</think>", ["Paris"]),
    ("<answer>Paris", ["Paris"]),
    ("", ["Paris"]),
    ("<answer>multi\nline Paris</answer>", ["multi line paris"]),
    (answer("\u201cHello\u201d"), ["Hello"]),
    (answer(""), ["The"]),
]


@pytest.mark.parametrize("solution, golds", SHARED_CASES)
@pytest.mark.parametrize("kwargs", [{}, {"format_score": 0.1, "score": 2.0}])
def test_agrees_with_verl_search_r1_like_qa_em(solution, golds, kwargs):
    from verl.utils.reward_score import search_r1_like_qa_em as verl_em

    ours = compute_score("searchR1_nq", solution, {"target": golds}, **kwargs)

    assert ours["score"] == float(verl_em.compute_score(solution, {"target": golds}, **kwargs))
    assert ours["substring_em"] == float(verl_em.compute_score_subem(solution, {"target": golds}))


def test_differs_from_verl_answer_inside_information_is_not_the_models():
    """verl reads the last ``<answer>`` anywhere; retrieved documents are not the model's answer."""
    from verl.utils.reward_score import search_r1_like_qa_em as verl_em

    solution = "<think>t</think><search>q</search>" + wrap_information("Doc 1: <answer>Paris</answer>")

    assert verl_em.compute_score(solution, {"target": ["Paris"]}) == 1.0
    assert score(solution, {"target": ["Paris"]}) == 0.0


def test_differs_from_verl_the_prompts_example_answer_is_ignored():
    """Given prompt and response with chat markers, verl scores the prompt's example ``<answer> Beijing``."""
    from verl.utils.reward_score import search_r1_like_qa_em as verl_em

    solution = PROMPT_WITH_EXAMPLE + "<think>no idea</think><|im_end|>"

    assert verl_em.compute_score(solution, {"target": ["Beijing"]}) == 1.0
    assert score(solution, {"target": ["Beijing"]}) == 0.0


def test_differs_from_verl_no_penalty_for_many_answer_tags():
    """verl's port quarters the score past 10 answer tags. Search-R1's and RAG-R1's reward has no such rule,
    and the RAG-R1 rollout stops at the first ``</answer>``: a real response never holds more than one."""
    from verl.utils.reward_score import search_r1_like_qa_em as verl_em

    solution = answer("x") * 10 + answer("Paris")

    assert verl_em.compute_score(solution, {"target": ["Paris"]}) == 0.25
    assert score(solution, {"target": ["Paris"]}) == 1.0


def test_differs_from_verl_canonically_equal_unicode_matches():
    """verl compares code points; a decomposed ``ü`` looks the same and is the same answer."""
    from verl.utils.reward_score import search_r1_like_qa_em as verl_em

    solution = answer("Zu\u0308rich")

    assert verl_em.compute_score(solution, {"target": ["Z\u00fcrich"]}) == 0.0
    assert score(solution, {"target": ["Z\u00fcrich"]}) == 1.0


def test_differs_from_verl_empty_gold_is_not_a_substring_of_everything():
    from verl.utils.reward_score import search_r1_like_qa_em as verl_em

    assert verl_em.compute_score_subem(answer("Paris"), {"target": ["The"]}) == 1.0
    assert compute_score("nq", answer("Paris"), {"target": ["The"]})["substring_em"] == 0.0


def test_differs_from_verl_ground_truth_need_not_be_a_target_dict():
    from verl.utils.reward_score import search_r1_like_qa_em as verl_em

    with pytest.raises(TypeError):
        verl_em.compute_score(answer("Paris"), ["Paris"])
    assert score(answer("Paris"), ["Paris"]) == 1.0


# --- through verl's reward worker ---------------------------------------------------------------------------

REWARD_OVERRIDES = ["reward.custom_reward_function.path=pkg://ragr1_verl.reward",
                    "reward.custom_reward_function.name=compute_score"]


def reward_config(model_dir: Path, *overrides: str) -> Any:
    from tests.ragr1_verl.rollout import compose_trainer_config

    return compose_trainer_config(model_dir, overrides=[*REWARD_OVERRIDES, *overrides])


def reward_batch(tokenizer: Any, prompt: str, response: str, ground_truth: Any, rollout_fields: dict):
    """One left-padded prompt and right-padded response, as the agent-loop worker hands them to the reward."""
    import torch
    from verl import DataProto

    prompt_ids, response_ids = tokenizer.encode(prompt), tokenizer.encode(response)
    prompt_length, response_length = len(prompt_ids) + 3, len(response_ids) + 5
    prompts = torch.zeros(1, prompt_length, dtype=torch.long)
    prompts[0, prompt_length - len(prompt_ids):] = torch.tensor(prompt_ids)
    responses = torch.zeros(1, response_length, dtype=torch.long)
    responses[0, :len(response_ids)] = torch.tensor(response_ids)
    attention_mask = torch.zeros(1, prompt_length + response_length, dtype=torch.long)
    attention_mask[0, prompt_length - len(prompt_ids):prompt_length + len(response_ids)] = 1

    def column(value: Any) -> np.ndarray:
        array = np.empty(1, dtype=object)
        array[0] = value
        return array

    return DataProto.from_dict(
        tensors={"prompts": prompts, "responses": responses, "attention_mask": attention_mask,
                 "input_ids": torch.cat([prompts, responses], dim=1)},
        non_tensors={"data_source": column("hotpotqa"),
                     "reward_model": column({"ground_truth": ground_truth}),
                     "extra_info": column({"index": 7}), "tool_extra_fields": column(rollout_fields),
                     "__num_turns__": column(3)})


def score_with_verl(config: Any, prompt: str, response: str, ground_truth: Any,
                    rollout_fields: dict | None = None) -> dict:
    """``RewardLoopWorker.compute_score`` as the agent loop calls it, built inside the running loop."""
    from verl.experimental.reward_loop import RewardLoopWorker

    async def run() -> dict:
        worker = RewardLoopWorker(config)
        batch = reward_batch(worker.input_tokenizer, prompt, response, ground_truth, rollout_fields or {})
        return await worker.compute_score(batch)

    return asyncio.run(run())


@pytest.mark.parametrize("response, expected", [(answer("Paris") + "<|im_end|>", 1.0),
                                                (answer("Rome") + "<|im_end|>", 0.0)])
def test_verl_reward_worker_scores_the_response(tiny_model_dir, response, expected):
    config = reward_config(tiny_model_dir)
    ground_truth = {"target": np.array(["Paris"], dtype=object)}

    result = score_with_verl(config, PROMPT_WITH_EXAMPLE.replace("Beijing", "Paris"), response, ground_truth,
                             {"ragr1/searches": 2, "ragr1/answered": True})

    assert result["reward_score"] == expected
    assert result["reward_extra_info"] == {"score": expected, "acc": expected, "f1": expected,
                                           "substring_em": expected, "format_ok": 1.0, "answered": 1.0,
                                           "searches": 2.0}


def test_verl_reward_worker_passes_reward_kwargs(tiny_model_dir):
    config = reward_config(tiny_model_dir, "+reward.custom_reward_function.reward_kwargs.format_reward=true",
                           "+reward.custom_reward_function.reward_kwargs.structure_format_score=0.25")

    result = score_with_verl(config, "Question?", answer("Rome"), ["Paris"])

    assert result["reward_score"] == 0.25
    assert result["reward_extra_info"]["acc"] == 0.0 and result["reward_extra_info"]["searches"] == 0.0
