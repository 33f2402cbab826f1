"""verl's real ``main_ppo`` with the RL setup of ``ragr1-verl-demo --preset full``: two GRPO steps of groups
of rollouts, with the tiny random Qwen2 on the CPU backend, against the real demo retriever. The step
metrics carry the group statistics the README's diagnosis of stage 2 reads (how many groups teach anything)."""

from __future__ import annotations

import os

import pytest

from ragr1_verl import metrics as ragr1_metrics
from ragr1_verl.demo.cli import RL_RECIPES
from ragr1_verl.demo.presets import PRESETS
from ragr1_verl.demo.report import read_metrics
from tests.ragr1_verl.cpu.test_main_ppo_cpu import run_main_ppo

pytestmark = pytest.mark.slow

FULL = PRESETS["full"]


@pytest.fixture(scope="module")
def grpo_run(tiny_model_with_weights, demo_server, tmp_path_factory):
    url, _ = demo_server
    folder = tmp_path_factory.mktemp("main-grpo-cpu")
    env = dict(os.environ, VERL_FILE_LOGGER_PATH=str(folder / "metrics.jsonl"), WANDB_MODE="disabled")
    code, output, _, survivors = run_main_ppo([
        f"+recipe={RL_RECIPES[FULL.rl_algorithm]}", *FULL.rl_overrides,
        f"actor_rollout_ref.model.path={tiny_model_with_weights}",
        "data.max_prompt_length=640",  # the tiny byte-level tokenizer makes long prompts
        # 2 prompts x the preset's rollouts per prompt: cheaper, still groups (a mini-batch is 2 prompts then)
        "data.train_batch_size=2", "actor_rollout_ref.actor.ppo_mini_batch_size=2",
        f"ragr1.retriever.url={url}/retrieve",
        "trainer.total_training_steps=2", "trainer.test_freq=-1", "trainer.logger=[console,file]",
    ], folder, env)
    assert code == 0, output[-6000:]
    return read_metrics(folder / "metrics.jsonl"), survivors


def test_each_step_logs_its_groups_and_trains_no_critic(grpo_run):
    metrics, survivors = grpo_run
    assert sorted(metrics) == [1, 2] and survivors == []
    rollouts = int(dict(item.split("=") for item in FULL.rl_overrides)["actor_rollout_ref.rollout.n"])
    for step in (1, 2):
        logged = metrics[step]
        assert logged["ragr1/trajectories"] == 2 * rollouts
        assert logged["ragr1/groups"] == 2  # one group per prompt
        assert 0.0 <= logged["ragr1/groups_with_signal"] <= 1.0
        assert 0.0 <= logged["ragr1/group_reward_std"] <= 0.5  # rewards are 0 or 1
        # a group whose rewards are all equal has advantage 0: with no signal anywhere, every advantage is 0
        if logged["ragr1/groups_with_signal"] == 0.0:
            assert logged["critic/advantages/max"] == pytest.approx(0.0, abs=1e-6)
        assert not any(key.startswith("critic/vf") for key in logged)  # GRPO: no value function
    assert set(ragr1_metrics.GROUP_KEYS) <= set(metrics[1])
