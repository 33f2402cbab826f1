"""``ragr1-verl-demo``'s presets: what each stage trains with, as data (``--preset NAME``).

A preset fills in what the command line leaves out: the SFT trainer's Hydra overrides, the RL algorithm, its
number of steps and its Hydra overrides for ``main_ppo``. Explicit flags win over the preset's values:
``--steps`` and ``--algorithm`` replace its steps and algorithm, and an ``--sft-override`` or a trailing
``key=value`` override replaces the preset's override of the same key.

- ``quick`` (the default) is the demo as it always ran: the SFT recipe's own defaults, 20 PPO steps of 2
  prompts; the whole run (both stages and the evaluation) ends within 45 minutes on the 2-core machine. It
  shows every component working and prints the reward per step; it is too small to claim a rise.
- ``full`` trains long enough to look for one: stage 1 within 60 minutes per mode and each RL seed within
  90 minutes, on otherwise idle cores. Its RL step is sized by measurement (2026-12-07, 2-core AMD EPYC):
  4 prompts x 4 rollouts took 514-634 s a step (40 steps: about 6 hours), 2 x 4 took 195-230 s. 24 steps of
  2 x 4 from this stage 1 raised the dev EM from 0.321 to 0.449 (run r03, seed 0; docs/results/cpu-runs.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType


@dataclass(frozen=True)
class Preset:
    """One named setup of both stages; ``*_overrides`` come before the user's own (which win)."""

    name: str
    description: str
    sft_overrides: tuple[str, ...]  # Hydra overrides for verl's sft_trainer (+recipe=ragr1_sft_cpu[_sq])
    rl_algorithm: str  # "ppo" (recipe ragr1_cpu) or "grpo" (ragr1_cpu_grpo)
    rl_steps: int  # trainer.total_training_steps
    rl_overrides: tuple[str, ...]  # Hydra overrides for main_ppo, before the seed's and the user's
    sft_multi_search_copies: int = 1  # SFT trajectories that search more than once appear this many times
    sft_budget_min: int | None = None  # stage 1 should end within this (idle 2-core machine); None: no target
    rl_budget_min: int | None = None  # each RL seed should end within this
    run_budget_min: int | None = None  # the whole default run (stages 1 and 2 and the evaluation)

    @property
    def prompts_per_step(self) -> int:
        """RL prompts per step: this preset's ``data.train_batch_size`` (the recipes' is 4)."""
        for item in self.rl_overrides:
            key, _, value = item.partition("=")
            if key == "data.train_batch_size":
                return int(value)
        return 4


# The quick RL batch: 2 prompts a step (the recipe's 4 doubles the step time: every phase is compute-bound).
# verl splits each phase's batch into micro-batches that must divide it, hence every batch size set to 2.
QUICK_RL_BATCH = (
    "data.train_batch_size=2", "actor_rollout_ref.actor.ppo_mini_batch_size=2",
    "critic.ppo_mini_batch_size=2", "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2",
    "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=2",
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2", "critic.ppo_micro_batch_size_per_gpu=2")

QUICK = Preset(
    name="quick",
    description="the short demo: SFT on 40 trajectories, 20 PPO steps of 2 prompts, the evaluation "
                "(< 45 min)",
    # the SFT recipe's defaults: 40 of the 166 teacher trajectories, 2 epochs, ~7-14 min on 2 cores
    sft_overrides=(),
    # PPO with a critic, as the paper trains
    rl_algorithm="ppo",
    # enough for a reward curve; a step of 2 prompts costs about a minute on 2 cores
    rl_steps=20,
    # see QUICK_RL_BATCH
    rl_overrides=QUICK_RL_BATCH,
    # measured 36 min with empty caches (docs/getting-started.md); the target leaves room for a slower machine
    run_budget_min=45,
)

FULL = Preset(
    name="full",
    description="long enough to look for a rise: SFT on every trajectory, 24 GRPO steps of 2 prompts x 4 "
                "rollouts",
    sft_overrides=(
        # all 166 teacher trajectories instead of 40 (~23 min an epoch on 2 cores)
        "data.train_max_samples=-1",
        "trainer.total_epochs=2",  # 2 epochs of 222 rows (below): ~50 min plus validations on free cores (e02)
    ),
    # the 56 trajectories that search twice (bridge questions) twice over: 222 rows. On the 78 dev questions
    # (run e02 against e01, which trained on each once) bridge EM went 0.154 -> 0.269 and searches per
    # bridge question 1.08 -> 1.38, at the same overall EM (paired -0.013 [-0.141, +0.115])
    sft_multi_search_copies=2,
    # GRPO: no critic to train (a cheaper step) and group-normalised advantages, a denser signal than PPO's
    # from a batch of 2 with rewards mostly 0
    rl_algorithm="grpo",
    # 195-230 s a step on 2 idle cores (run r02): 24 steps and the start fit the 90-minute budget
    rl_steps=24,
    rl_overrides=(
        # 2 prompts a step: 4 prompts x 4 rollouts took 514-634 s a step (run r01), 40 steps about 6 hours
        "data.train_batch_size=2",
        "actor_rollout_ref.actor.ppo_mini_batch_size=2",  # one update a step (mini-batch = batch, 8 trajectories)
        "actor_rollout_ref.rollout.n=4",  # 4 rollouts per prompt: a group of 4 for GRPO's advantage
        # the recipe's micro-batches (2 and 4 trajectories) divide the 8
        # sampling closer to the greedy policy that is evaluated: at temperature 1 a 135M model loses most of
        # its answers, and a group whose rollouts all fail teaches nothing
        "actor_rollout_ref.rollout.temperature=0.7",
        # one update per step: the rollout's own log-probs (same weights, fp32 on both sides) are the old
        # policy's, so verl need not recompute them (a forward pass over every trajectory saved)
        "algorithm.rollout_correction.bypass_mode=true",
        # no KL term and so no reference model (another forward pass saved): tens of small steps stay near
        # the SFT model anyway, and the dev EM, not the KL, decides when to stop
        "actor_rollout_ref.actor.use_kl_loss=false",
    ),
    sft_budget_min=60,  # stage 1, once per mode
    rl_budget_min=90,  # each RL seed
)

PRESETS: Mapping[str, Preset] = MappingProxyType({preset.name: preset for preset in (QUICK, FULL)})
DEFAULT_PRESET = QUICK.name


def override_key(item: str) -> str:
    """The config key a Hydra override sets (``+a.b=1``, ``++a.b=1`` and ``~a.b`` all name ``a.b``)."""
    return item.partition("=")[0].lstrip("+~")


def merge_overrides(base: tuple[str, ...] | list[str], explicit: tuple[str, ...] | list[str]) -> list[str]:
    """``base`` without the keys ``explicit`` sets, then ``explicit``: an explicit override always wins, and
    no key is given twice."""
    taken = {override_key(item) for item in explicit}
    return [item for item in base if override_key(item) not in taken] + list(explicit)
