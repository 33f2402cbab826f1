"""verl's real ``main_ppo +recipe=ragr1_cpu``: two PPO steps (critic, reference, KL in the reward) and a
validation, with the tiny random Qwen2 on the CPU backend, against the real demo retriever."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from ragr1_verl import metrics as ragr1_metrics
from ragr1_verl.demo.processes import ProcessTree
from ragr1_verl.demo.report import read_metrics
from ragr1_verl.protocol.actions import INFORMATION_OPEN
from ragr1_verl.protocol.observation import INVALID_ACTION_REMINDER

pytestmark = pytest.mark.slow

TIMEOUT_S = 420  # a loaded 2-core machine; a normal run takes 2-4 min


def run_main_ppo(overrides: list[str], cwd, env: dict[str, str]) -> tuple[int, str, ProcessTree, list[int]]:
    """Run main_ppo in its own session, remembering its process tree: (exit code, output, tree, the tree's
    processes still alive 15 s after main_ppo ended). Whatever is left is stopped afterwards."""
    process = subprocess.Popen([sys.executable, "-m", "verl.trainer.main_ppo", *overrides], cwd=cwd, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    tree = ProcessTree(process.pid)
    lines: list[str] = []
    deadline = time.monotonic() + TIMEOUT_S
    try:
        for line in process.stdout:
            lines.append(line)
            tree.refresh()
            if time.monotonic() > deadline:
                break
        code = process.wait(timeout=30)
        return code, "".join(lines), tree, tree.survivors(timeout=15.0)  # main_ppo must take Ray down itself
    finally:
        tree.stop(process)


@pytest.fixture(scope="module")
def ppo_run(tiny_model_with_weights, demo_server, tmp_path_factory):
    url, _ = demo_server
    folder = tmp_path_factory.mktemp("main-ppo-cpu")
    env = dict(os.environ, VERL_FILE_LOGGER_PATH=str(folder / "metrics.jsonl"), WANDB_MODE="disabled")
    env.pop("RAGR1_CPU_BACKEND", None)  # choosing the recipe alone must switch the CPU backend on
    code, output, tree, survivors = run_main_ppo([
        "+recipe=ragr1_cpu",
        f"actor_rollout_ref.model.path={tiny_model_with_weights}",
        "data.max_prompt_length=640",  # the tiny byte-level tokenizer makes long prompts
        f"ragr1.retriever.url={url}/retrieve",
        "trainer.total_training_steps=2", "trainer.test_freq=2",
        "trainer.logger=[console,file]", f"trainer.rollout_data_dir={folder / 'rollouts'}",
        "actor_rollout_ref.actor.optim.lr=1e-2",  # large steps: a rollout left with old weights would show
    ], folder, env)
    assert code == 0, output[-6000:]
    return read_metrics(folder / "metrics.jsonl"), folder, (tree, survivors)


def test_both_steps_and_the_validation_completed(ppo_run):
    metrics, _, _ = ppo_run
    assert sorted(metrics) == [1, 2]
    for step in (1, 2):
        for key in ("timing_s/gen", "timing_s/values", "timing_s/update_critic", "timing_s/update_actor",
                    "timing_s/update_weights", "timing_s/step"):
            assert key in metrics[step], (step, key)
    assert 0.0 <= metrics[2]["val-core/demo/acc/mean@1"] <= 1.0  # the EM of the held-out demo questions


def test_the_rollout_ran_multi_turn_trajectories_with_observations(ppo_run):
    metrics, folder, _ = ppo_run
    # num_turns counts the prompt, each generation round, each search and each invalid action
    assert max(metrics[step]["num_turns/max"] for step in (1, 2)) >= 3
    outputs = [json.loads(line)["output"] for step in (1, 2)
               for line in (folder / "rollouts" / f"{step}.jsonl").read_text().splitlines()]
    assert len(outputs) == 8
    assert any(INVALID_ACTION_REMINDER.strip() in text or INFORMATION_OPEN in text for text in outputs)


def test_masks_and_rewards_reached_the_trainer(ppo_run):
    metrics, _, _ = ppo_run
    for step in (1, 2):
        # Inserted observation tokens carry rollout logprob 0; unmasked, they would differ from the actor's by
        # about 1 in probability. Agreement within 1e-2 means the trainer saw the response mask.
        assert metrics[step]["training/rollout_probs_diff_max"] < 1e-2
        assert "critic/score/mean" in metrics[step] and "critic/rewards/mean" in metrics[step]
        assert metrics[step]["critic/vf_loss"] > 0
    assert metrics[2]["actor/reward_kl_penalty"] != 0.0  # the KL penalty of the reward, after one update


def test_every_training_step_logs_the_rollouts_and_the_rewards_own_means(ppo_run):
    metrics, _, _ = ppo_run
    for step in (1, 2):
        logged = metrics[step]
        searches = logged["ragr1/searches_per_trajectory"]
        # every key, from the training batch (not val-aux); queries per search only in a step with a search
        # (n = 1: no prompt is sampled twice, so there are no group statistics)
        missing = set(ragr1_metrics.KEYS) - set(logged)
        assert missing <= {"ragr1/queries_per_search", *ragr1_metrics.GROUP_KEYS}, step
        assert not set(ragr1_metrics.GROUP_KEYS) & set(logged), step
        assert ("ragr1/queries_per_search" in logged) == (searches > 0), step
        assert logged["ragr1/trajectories"] == 4  # train_batch_size 4, n 1: verl's batch padding left out
        assert 0.0 <= searches <= 2  # ragr1.max_turns of the recipe
        if searches > 0:
            assert 1.0 <= logged["ragr1/queries_per_search"] <= 3  # max_queries_per_search
        for key in ("answered", "budget_hit", "truncated", "em", "f1", "substring_em", "format_ok"):
            assert 0.0 <= logged[f"ragr1/{key}"] <= 1.0, (step, key)
        assert logged["ragr1/em"] <= min(logged["ragr1/f1"], logged["ragr1/substring_em"], logged["ragr1/answered"])
        assert logged["ragr1/retrieval_s_per_trajectory"] >= 0.0
        # the same trajectories verl's own metrics see: its turn count is 1 + rounds + searches + invalid
        # actions per trajectory, and its score the EM (the recipe's reward has no format score)
        assert logged["num_turns/mean"] == pytest.approx(1 + logged["ragr1/turns_per_trajectory"] + searches
                                                         + logged["ragr1/invalid_actions_per_trajectory"])
        assert logged["critic/score/mean"] == pytest.approx(logged["ragr1/em"])
    # the tiny random model searches in some rounds and writes no valid action in others
    assert any(metrics[step]["ragr1/searches_per_trajectory"] > 0
               or metrics[step]["ragr1/invalid_actions_per_trajectory"] > 0 for step in (1, 2))


def test_weight_sync_moved_the_rollout_to_the_updated_actor(ppo_run):
    metrics, _, _ = ppo_run
    # After step 1's large update the actor has left the reference (KL > 0); the step-2 rollout still agrees
    # with the actor's recomputed log-probs (float32 on both sides: ~1e-9 here), and its weights carry step 1's
    # version (no staleness). With the weight push disabled, the same run gives a step-2 diff of 7e-3, a
    # correlation of 0.24 and a staleness of 1.
    assert abs(metrics[2]["actor/reward_kl_penalty"]) > 1e-4
    assert metrics[2]["training/rollout_probs_diff_max"] < 1e-4
    assert metrics[2]["training/rollout_actor_probs_pearson_corr"] > 0.999
    assert metrics[2]["training/off_policy/trajectory_staleness/max"] == 0


def test_no_ray_process_is_left_behind(ppo_run):
    _, _, (tree, survivors) = ppo_run
    assert len(tree.known) >= 5, "the process tree of main_ppo (Ray and its workers) was not observed"
    assert survivors == []
