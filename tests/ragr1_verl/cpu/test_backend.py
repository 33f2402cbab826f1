"""The CPU backend's selection, what it changes in verl when selected (and nothing otherwise), the patches'
checks of verl's internals, the recipes, and the demo launcher's metric table."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest

from ragr1_verl.cpu import selected, selects_cpu_recipe

PROBE = """
import verl
from verl.utils.device import get_device_name, get_nccl_backend
from verl.workers.engine.base import EngineRegistry
import verl.workers.engine
import verl.workers.rollout.base as rollout_base
import verl.workers.engine.fsdp.transformer_impl as fsdp_impl
import verl.utils.distributed as distributed
print(get_device_name(), get_nccl_backend(), ("hf_cpu", "async") in rollout_base._ROLLOUT_REGISTRY,
      "cpu" in EngineRegistry._engines["language_model"]["fsdp2"],
      getattr(distributed.initialize_global_process_group_ray, "_ragr1_cpu", False),
      fsdp_impl.CPUOffloadPolicy().pin_memory)
"""


def probe(env_value: str | None, *argv: str) -> list[str]:
    """What verl looks like in a fresh process with the given RAGR1_CPU_BACKEND and command line."""
    import os

    env = {key: value for key, value in os.environ.items() if key != "RAGR1_CPU_BACKEND"}
    if env_value is not None:
        env["RAGR1_CPU_BACKEND"] = env_value
    result = subprocess.run([sys.executable, "-c", PROBE, *argv], env=env, capture_output=True, text=True, check=False,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.split()


@pytest.mark.parametrize(("argv", "environ", "expected"), [
    (["main_ppo", "+recipe=ragr1_cpu"], {}, True),
    (["main_ppo", "+recipe=ragr1_cpu_grpo", "trainer.device=cpu"], {}, True),
    (["main_ppo", "recipe=ragr1_cpu"], {}, True),
    (["main_ppo", "+recipe=ragr1"], {}, False),
    (["sft_trainer.py", "+recipe=ragr1_sft_cpu"], {}, True),
    (["sft_trainer.py", "+recipe=ragr1_sft_cpu_sq", "data.max_length=512"], {}, True),
    (["sft_trainer.py", "++recipe=ragr1_sft_cpu"], {}, True),
    (["sft_trainer.py", "+recipe=ragr1_sft"], {}, False),
    (["sft_trainer.py", "+recipe=ragr1_sft_cpu"], {"RAGR1_CPU_BACKEND": "0"}, False),
    (["main_ppo", "ragr1.note=recipe=ragr1_cpu"], {}, False),
    (["pytest"], {"RAGR1_CPU_BACKEND": "1"}, True),
    (["main_ppo", "+recipe=ragr1_cpu"], {"RAGR1_CPU_BACKEND": "0"}, False),
])
def test_selection_by_recipe_or_environment(argv, environ, expected):
    assert selected(argv, environ) is expected


def test_a_recipe_override_is_recognised_only_as_such():
    assert selects_cpu_recipe("+recipe=ragr1_cpu") and not selects_cpu_recipe("+recipe=ragr1")
    assert not selects_cpu_recipe("recipe") and not selects_cpu_recipe("data.recipe=ragr1_cpu")
    assert selects_cpu_recipe("+recipe=ragr1_sft_cpu") and not selects_cpu_recipe("+recipe=ragr1_sft")
    assert not selects_cpu_recipe("+recipe=ragr1_sq") and not selects_cpu_recipe("trainer.recipe=ragr1_sft_cpu")


@pytest.mark.slow
def test_verl_is_untouched_unless_the_backend_is_selected():
    device, backend, adapter, engine, patched, pinned = probe(None)
    assert (device, backend, adapter, engine, patched, pinned) == ("cuda", "nccl", "False", "False", "False",
                                                                  "True")
    assert probe("1") == ["cpu", "gloo", "True", "True", "True", "False"]
    assert probe(None, "+recipe=ragr1_cpu")[:2] == ["cpu", "gloo"]


def test_patches_fail_loudly_when_verl_internals_differ():
    from ragr1_verl.cpu import patches

    def different_signature(timeout=None):
        return None

    with pytest.raises(patches.VerlInternalsChanged, match="initialize_global_process_group_ray"):
        patches.patch_process_group_backend(SimpleNamespace(initialize_global_process_group_ray=different_signature))
    with pytest.raises(patches.VerlInternalsChanged, match="_ROLLOUT_REGISTRY"):
        patches.register_rollout_adapter(SimpleNamespace(_ROLLOUT_REGISTRY=[]))
    with pytest.raises(patches.VerlInternalsChanged, match="load_valuehead_model"):
        patches.load_value_model_with_sdpa(SimpleNamespace(load_valuehead_model=different_signature))


def test_the_process_group_patch_defaults_only_the_backend():
    from ragr1_verl.cpu import patches

    calls = []

    def initialize_global_process_group_ray(timeout_second=None, backend=None):
        calls.append((timeout_second, backend))

    module = SimpleNamespace(initialize_global_process_group_ray=initialize_global_process_group_ray)
    patches.patch_process_group_backend(module)
    module.initialize_global_process_group_ray(timeout_second=5)
    module.initialize_global_process_group_ray(backend="cpu:gloo,cuda:nccl")
    assert calls == [(5, "cpu:gloo"), (None, "cpu:gloo,cuda:nccl")]


@pytest.mark.parametrize("recipe", ["ragr1_cpu", "ragr1_cpu_grpo"])
def test_the_cpu_recipes_compose_with_the_cpu_settings(recipe):
    from hydra import compose, initialize_config_module
    from verl.utils.config import omega_conf_to_dataclass

    with initialize_config_module("verl.trainer.config", version_base=None):
        config = compose("ppo_trainer", overrides=[f"+recipe={recipe}"])
    assert config.trainer.device == "cpu" and config.actor_rollout_ref.rollout.name == "hf_cpu"
    assert config.actor_rollout_ref.actor.strategy == config.critic.strategy == "fsdp2"
    assert config.ray_kwargs.ray_init.runtime_env.env_vars.RAGR1_CPU_BACKEND == "1"
    assert config.actor_rollout_ref.model.override_config.attn_implementation == "sdpa"
    assert omega_conf_to_dataclass(config.actor_rollout_ref.rollout).agent.default_agent_loop == "ragr1_agent"
    expected = ("gae", 1, True) if recipe == "ragr1_cpu" else ("grpo", 2, False)
    assert (config.algorithm.adv_estimator, config.actor_rollout_ref.rollout.n,
            config.algorithm.use_kl_in_reward) == expected
