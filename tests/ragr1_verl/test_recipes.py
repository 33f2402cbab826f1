"""The Hydra recipes through verl's real apps and Hydra's compose API.

``+recipe=ragr1``, ``ragr1_grpo`` and ``ragr1_sq`` go through ``main_ppo``, ``+recipe=ragr1_sft`` through
``sft_trainer``: found by the search-path plugin from any directory, the paper's values in place, CLI
overrides win, verl's own config validation and dataclasses accept the result, and every path handed to
verl's workers resolves from a directory that is not the repository. Also: stage 1's selection of the
checkpoint with the lowest validation loss (``ragr1_verl.sft.checkpoints``), on logs written by verl's own
file logger.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

import ragr1_verl
from ragr1_verl.config import load_config, resolve_prompt_template
from ragr1_verl.protocol.prompts import default_template
from ragr1_verl.sft import checkpoints as sft_checkpoints

RECIPE_DIR = Path(ragr1_verl.__file__).parent / "recipes" / "recipe"
PPO_RECIPES = ("ragr1", "ragr1_grpo", "ragr1_sq")


def app_job(module: str, cwd, *overrides: str) -> dict:
    """The config a verl Hydra app would run with (``--cfg job``), run from ``cwd``."""
    result = subprocess.run([sys.executable, "-m", module, *overrides, "--cfg", "job"], cwd=cwd,
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return yaml.safe_load(result.stdout)


def resolved_ragr1(job: dict) -> dict:
    """The job's ``ragr1`` section with its interpolations resolved (the recipes read the retriever's URL
    and token from the environment with ``${oc.env:...}``), as verl resolves it before the workers start."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.create(job["ragr1"]), resolve=True)


def main_ppo_job(cwd, *overrides: str) -> dict:
    return app_job("verl.trainer.main_ppo", cwd, *overrides)


def compose(config_name: str, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    with initialize_config_module("verl.trainer.config", version_base=None):
        return hydra_compose(config_name, overrides=overrides)


@pytest.fixture(scope="module")
def ragr1_job(tmp_path_factory) -> dict:
    return main_ppo_job(tmp_path_factory.mktemp("elsewhere"), "+recipe=ragr1",
                        "actor_rollout_ref.actor.optim.lr=3e-6")


@pytest.fixture(scope="module")
def grpo_job(tmp_path_factory) -> dict:
    return main_ppo_job(tmp_path_factory.mktemp("elsewhere"), "+recipe=ragr1_grpo",
                        "actor_rollout_ref.rollout.n=8")


@pytest.fixture(scope="module")
def sq_job(tmp_path_factory) -> dict:
    return main_ppo_job(tmp_path_factory.mktemp("elsewhere"), "+recipe=ragr1_sq", "ragr1.topk=5")


@pytest.fixture(scope="module")
def sft_job(tmp_path_factory) -> dict:
    return app_job("verl.trainer.sft_trainer", tmp_path_factory.mktemp("elsewhere"), "+recipe=ragr1_sft",
                   "optim.lr=2e-5")


# --- +recipe=ragr1 (stage 2, PPO) ---------------------------------------------------------------------------

def test_the_recipe_is_found_from_any_directory_and_sets_the_papers_values(ragr1_job):
    algorithm, actor = ragr1_job["algorithm"], ragr1_job["actor_rollout_ref"]["actor"]
    rollout = ragr1_job["actor_rollout_ref"]["rollout"]
    assert "recipe" not in ragr1_job  # the silent no-op of a missing plugin would leave `recipe: ragr1`
    assert (algorithm["adv_estimator"], algorithm["gamma"], algorithm["lam"]) == ("gae", 1.0, 1.0)
    assert algorithm["use_kl_in_reward"] and algorithm["kl_ctrl"]["kl_coef"] == 0.001
    assert ragr1_job["data"]["train_batch_size"] == 512
    assert (actor["ppo_mini_batch_size"], rollout["n"]) == (128, 1)
    assert actor["optim"]["lr_warmup_steps_ratio"] == 0.285 and not actor["use_kl_loss"]
    assert ragr1_job["critic"]["optim"]["lr"] == 1e-5
    assert ragr1_job["actor_rollout_ref"]["ref"]["fsdp_config"]["param_offload"]  # paper
    assert (ragr1_job["trainer"]["total_training_steps"], ragr1_job["trainer"]["total_epochs"]) == (500, 50)
    assert rollout["agent"]["default_agent_loop"] == "ragr1_agent" and rollout["name"] == "vllm"
    assert ragr1_job["reward"]["custom_reward_function"]["path"] == "pkg://ragr1_verl.reward"
    settings = load_config(resolved_ragr1(ragr1_job), environ={})
    assert (settings.topk, settings.max_turns, settings.max_tokens_per_turn) == (3, 4, 500)
    assert settings.mode == "mq"


def test_command_line_overrides_win_over_the_recipe(ragr1_job):
    assert ragr1_job["actor_rollout_ref"]["actor"]["optim"]["lr"] == 3e-6


def test_verl_config_classes_accept_the_composed_recipe():
    from verl.utils.config import omega_conf_to_dataclass

    config = compose("ppo_trainer", ["+recipe=ragr1"])
    rollout = omega_conf_to_dataclass(config.actor_rollout_ref.rollout)
    algorithm = omega_conf_to_dataclass(config.algorithm)
    assert rollout.agent.default_agent_loop == "ragr1_agent" and rollout.top_p == 0.95
    assert algorithm.kl_ctrl.kl_coef == 0.001


# --- +recipe=ragr1_grpo -------------------------------------------------------------------------------------

def test_grpo_recipe_sets_grpo_with_a_kl_loss_and_keeps_the_papers_other_values(grpo_job):
    algorithm, actor = grpo_job["algorithm"], grpo_job["actor_rollout_ref"]["actor"]
    rollout = grpo_job["actor_rollout_ref"]["rollout"]
    assert "recipe" not in grpo_job
    assert algorithm["adv_estimator"] == "grpo" and algorithm["use_kl_in_reward"] is False
    assert (actor["use_kl_loss"], actor["kl_loss_coef"], actor["kl_loss_type"]) == (True, 0.001, "low_var_kl")
    assert grpo_job["critic"]["enable"] is False
    # Inherited from ragr1.yaml through the recipe's defaults list.
    assert (actor["optim"]["lr"], actor["optim"]["lr_warmup_steps_ratio"]) == (1e-6, 0.285)
    assert (grpo_job["data"]["train_batch_size"], actor["ppo_mini_batch_size"]) == (512, 128)
    assert (rollout["temperature"], rollout["agent"]["default_agent_loop"]) == (1.0, "ragr1_agent")
    assert grpo_job["reward"]["custom_reward_function"]["path"] == "pkg://ragr1_verl.reward"
    assert (grpo_job["trainer"]["total_training_steps"], grpo_job["trainer"]["total_epochs"]) == (500, 50)
    assert load_config(resolved_ragr1(grpo_job), environ={}).mode == "mq"


def test_grpo_recipe_yields_to_command_line_overrides(grpo_job):
    assert grpo_job["actor_rollout_ref"]["rollout"]["n"] == 8  # the recipe says 5


def test_grpo_recipe_default_is_five_rollouts_and_no_critic():
    from verl.trainer.ppo.utils import need_critic, need_reference_policy

    config = compose("ppo_trainer", ["+recipe=ragr1_grpo"])
    assert config.actor_rollout_ref.rollout.n == 5
    assert not need_critic(config) and need_reference_policy(config)  # the reference model serves the KL loss


# --- +recipe=ragr1_sq ---------------------------------------------------------------------------------------

def test_sq_recipe_switches_to_single_query_and_keeps_the_ppo_settings(sq_job):
    settings = load_config(resolved_ragr1(sq_job), environ={})
    assert "recipe" not in sq_job
    assert settings.mode == "sq" and settings.query_rules.mode == "sq"
    assert resolve_prompt_template(settings.prompt_template, settings.mode) == default_template("sq")
    assert settings.max_obs_tokens_per_query == 1000  # paper: per observation in sq
    algorithm = sq_job["algorithm"]
    assert (algorithm["adv_estimator"], algorithm["use_kl_in_reward"]) == ("gae", True)
    assert sq_job["critic"]["optim"]["lr"] == 1e-5
    assert (sq_job["trainer"]["total_training_steps"], sq_job["trainer"]["total_epochs"]) == (500, 50)
    assert sq_job["trainer"]["experiment_name"] == "ragr1-sq-ppo"


def test_sq_recipe_yields_to_command_line_overrides(sq_job):
    assert load_config(resolved_ragr1(sq_job), environ={}).topk == 5


# --- all stage-2 recipes: verl's validation and dataclasses -------------------------------------------------

@pytest.mark.parametrize("recipe", PPO_RECIPES)
def test_verl_validates_each_stage2_recipe_as_main_ppo_does(recipe, tiny_model_dir, capsys):
    from omegaconf import OmegaConf
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import omega_conf_to_dataclass, validate_config

    # The critic's config loads its model folder, so the launch line's model paths are given.
    config = compose("ppo_trainer", [f"+recipe={recipe}", f"actor_rollout_ref.model.path={tiny_model_dir}",
                                     f"critic.model.path={tiny_model_dir}"])
    validate_config(config, use_reference_policy=need_reference_policy(config),
                    use_critic=need_critic(config))
    assert "All configuration checks passed" in capsys.readouterr().out
    OmegaConf.resolve(config)  # what the TaskRunner actor does before building workers
    actor = omega_conf_to_dataclass(config.actor_rollout_ref.actor)
    rollout = omega_conf_to_dataclass(config.actor_rollout_ref.rollout)
    algorithm = omega_conf_to_dataclass(config.algorithm)
    assert actor.optim.lr == 1e-6 and rollout.temperature == 1.0 and algorithm.gamma == 1.0
    if need_critic(config):
        critic = omega_conf_to_dataclass(config.critic)
        assert critic.optim.lr == 1e-5 and critic.fsdp.param_offload  # paper: critic offloaded
    load_config(config.ragr1, environ={})


# --- paths handed to verl's workers -------------------------------------------------------------------------

# Resolves every path setting of a composed config the way verl's workers do, in a fresh process whose current
# directory is not the repository: file paths through resolve_config_path (agent loop worker, router), module
# paths through load_extern_object (reward loop, dataset factories).
RESOLVE_PATHS = """
import json, sys
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from verl.utils.import_utils import load_extern_object
from ragr1_verl.verl_compat import resolve_config_path

FILE_PATHS = ["actor_rollout_ref.rollout.agent.agent_loop_config_path",
              "actor_rollout_ref.rollout.multi_turn.tool_config_path",
              "actor_rollout_ref.rollout.multi_turn.function_tool_path",
              "actor_rollout_ref.rollout.router_config_path"]
MODULE_PATHS = [("reward.custom_reward_function.path", "reward.custom_reward_function.name"),
                ("reward.reward_manager.module.path", "reward.reward_manager.module.name"),
                ("data.custom_cls.path", "data.custom_cls.name")]
report = {}
for config_name, recipe in json.loads(sys.argv[1]):
    with initialize_config_module("verl.trainer.config", version_base=None):
        config = compose(config_name, overrides=[f"+recipe={recipe}"])
    found = report[recipe] = {}
    for key in FILE_PATHS:
        value = OmegaConf.select(config, key)
        if value:
            try:
                found[key] = resolve_config_path(value)
            except Exception as err:
                found[key] = f"ERROR {type(err).__name__}: {err}"
    for key, name_key in MODULE_PATHS:
        value = OmegaConf.select(config, key)
        if value:
            try:
                target = load_extern_object(value, OmegaConf.select(config, name_key))
                module_file = sys.modules[target.__module__].__file__
                found[key] = f"{target.__module__}.{target.__qualname__} @ {module_file}"
            except Exception as err:
                found[key] = f"ERROR {type(err).__name__}: {err}"
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def resolved_paths(tmp_path_factory) -> dict:
    recipes = [["ppo_trainer", name] for name in PPO_RECIPES] + [["sft_trainer_engine", "ragr1_sft"]]
    result = subprocess.run([sys.executable, "-c", RESOLVE_PATHS, json.dumps(recipes)],
                            cwd=tmp_path_factory.mktemp("elsewhere"), capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("recipe", PPO_RECIPES)
def test_every_path_a_stage2_recipe_hands_to_workers_resolves_from_another_directory(resolved_paths, recipe,
                                                                                     tmp_path):
    found = resolved_paths[recipe]
    assert not [value for value in found.values() if value.startswith("ERROR")], found
    # The reward is the only path the stage-2 recipes set: ragr1_agent reaches the workers through the
    # verl.plugins entry point, so no agent-loop or tool YAML path has to resolve on them.
    assert set(found) == {"reward.custom_reward_function.path"}
    reward = found["reward.custom_reward_function.path"]
    assert reward.startswith("ragr1_verl.reward.compute_score @ ")
    # The installed package is imported (the checkout with an editable install, site-packages with a regular
    # one), as a fresh interpreter outside the checkout finds it, not a copy next to the working directory.
    reward_file = Path(reward.split(" @ ")[1]).resolve()
    assert reward_file == installed_file("ragr1_verl.reward", tmp_path)


def installed_file(module: str, cwd: Path) -> Path:
    """Where a fresh interpreter started in ``cwd`` imports ``module`` from."""
    result = subprocess.run([sys.executable, "-c", f"import {module} as m; print(m.__file__)"], cwd=cwd,
                            capture_output=True, text=True, timeout=120, check=True)
    return Path(result.stdout.strip()).resolve()


def test_the_sft_recipe_dataset_class_loads_from_another_directory(resolved_paths):
    found = resolved_paths["ragr1_sft"]
    assert set(found) == {"data.custom_cls.path"}
    assert found["data.custom_cls.path"].startswith("ragr1_verl.sft.dataset.RagR1SFTDataset @ "), found


def test_the_sft_recipe_dataset_class_is_a_torch_dataset():
    import torch.utils.data
    from verl.utils.import_utils import load_extern_object

    config = compose("sft_trainer_engine", ["+recipe=ragr1_sft"])
    dataset_cls = load_extern_object(config.data.custom_cls.path, config.data.custom_cls.name)
    assert issubclass(dataset_cls, torch.utils.data.Dataset)


def test_the_shipped_worker_yamls_sit_where_verl_resolves_them_after_a_regular_install():
    # After `pip install .`, site-packages holds ragr1_verl/configs/*.yaml next to verl/, and
    # resolve_config_path tries <site-packages>/<path>: the README's relative paths are package-relative.
    # (tests/test_packaging.py checks this with the installed wheel.)
    package_root = Path(ragr1_verl.__file__).parent.parent
    for relative in ("ragr1_verl/configs/agent_loop.yaml", "ragr1_verl/configs/tool_config.yaml"):
        assert (package_root / relative).is_file()


def test_the_shipped_worker_yamls_resolve_from_the_checkout_in_the_editable_install(monkeypatch):
    from ragr1_verl.verl_compat import resolve_config_path

    monkeypatch.chdir(Path(ragr1_verl.__file__).parent.parent)  # the checkout, in the editable install
    resolved = resolve_config_path("ragr1_verl/configs/agent_loop.yaml")
    assert Path(resolved) == Path(ragr1_verl.__file__).parent / "configs" / "agent_loop.yaml"


# --- +recipe=ragr1_sft (stage 1, sft_trainer) ---------------------------------------------------------------

def test_sft_recipe_is_found_by_sft_trainer_and_sets_the_papers_values(sft_job):
    data, trainer = sft_job["data"], sft_job["trainer"]
    assert "recipe" not in sft_job and "ragr1" not in sft_job and "actor_rollout_ref" not in sft_job
    assert sft_job["model"]["lora_rank"] == 0  # paper: full-parameter
    assert trainer["total_epochs"] == 5  # paper
    assert data["max_length"] == 8192 + 2048  # paper: input 8192 + output 2048
    assert data["custom_cls"] == {"path": "pkg://ragr1_verl.sft.dataset", "name": "RagR1SFTDataset"}
    # Keeping the lowest validation loss: validate and save every epoch, keep all, log val/loss to a file.
    assert (trainer["test_freq"], trainer["save_freq"]) == ("after_each_epoch", "after_each_epoch")
    assert trainer["max_ckpt_to_keep"] is None and "file" in trainer["logger"]
    assert "hf_model" in sft_job["checkpoint"]["save_contents"]


def test_sft_recipe_yields_to_command_line_overrides(sft_job):
    assert sft_job["optim"]["lr"] == 2e-5  # the recipe says 1e-5


def test_verl_builds_the_sft_trainer_configs_from_the_recipe(tiny_model_dir):
    from omegaconf import OmegaConf
    from verl.utils.config import omega_conf_to_dataclass

    config = compose("sft_trainer_engine", ["+recipe=ragr1_sft", f"model.path={tiny_model_dir}",
                                            "data.max_length=4096"])
    OmegaConf.resolve(config)
    assert config.data.max_token_len_per_gpu == 4096  # follows data.max_length
    # The same conversions SFTTrainer._build_config makes.
    model = omega_conf_to_dataclass(config.model)
    engine = omega_conf_to_dataclass(config.engine)
    optim = omega_conf_to_dataclass(config.optim)
    checkpoint = omega_conf_to_dataclass(config.checkpoint)
    omega_conf_to_dataclass(config.profiler)
    assert model.lora_rank == 0 and model.enable_gradient_checkpointing
    assert engine.strategy == "fsdp"
    assert (optim.lr, optim.lr_scheduler_type, optim.lr_warmup_steps_ratio) == (1e-5, "cosine", 0.1)
    assert "hf_model" in checkpoint.save_contents and "hf_model" not in checkpoint.load_contents


def test_sft_trainer_validates_and_saves_at_the_end_of_every_epoch():
    from verl.trainer.sft_trainer import SFTTrainer

    config = compose("sft_trainer_engine", ["+recipe=ragr1_sft"])
    # SFTTrainer.__init__ needs torch.distributed and an accelerator; _init_engine only needs these members.
    trainer = SimpleNamespace(config=config, train_dataloader=range(7), optimizer_config=SimpleNamespace(),
                              training_client=SimpleNamespace(reset=lambda: None))
    SFTTrainer._init_engine(trainer)
    assert (trainer.steps_per_epoch, trainer.test_freq, trainer.save_freq) == (7, 7, 7)
    assert trainer.total_training_steps == trainer.optimizer_config.total_training_steps == 35  # 5 epochs


def test_no_recipe_name_collides_with_a_verl_config_group():
    # The search-path plugin adds our `recipe` group to every Hydra app; a name verl also uses would merge or
    # shadow verl's own configs.
    import verl.trainer.config

    verl_config_dir = Path(verl.trainer.config.__file__).parent
    verl_names = {path.stem for path in verl_config_dir.iterdir()}
    recipes = {path.stem for path in RECIPE_DIR.glob("*.yaml")}
    assert {"ragr1", "ragr1_grpo", "ragr1_sq", "ragr1_sft"} <= recipes
    assert "recipe" not in verl_names and not recipes & verl_names


# --- stage 1: keeping the checkpoint with the lowest validation loss ----------------------------------------

def write_verl_file_log(path: Path, monkeypatch, records: list[tuple[int, dict]]) -> Path:
    """Log ``records`` through verl's own Tracking 'file' backend, as sft_trainer does."""
    from verl.utils.tracking import Tracking

    monkeypatch.setenv("VERL_FILE_LOGGER_PATH", str(path))
    tracking = Tracking(project_name="ragr1", experiment_name="ragr1-sft-mq", default_backend=["file"])
    for step, data in records:
        tracking.log(data=data, step=step)
    tracking.finish()
    return path


def make_checkpoints(root: Path, steps, *, hf_weights: bool = True) -> Path:
    for step in steps:
        hf = root / f"global_step_{step}" / "huggingface"
        hf.mkdir(parents=True)
        (hf / "config.json").write_text("{}")
        if hf_weights:
            (hf / "model.safetensors").write_text(f"weights of step {step}")
    (root / "latest_checkpointed_iteration.txt").write_text(str(max(steps)))
    return root


EPOCH_LOG = [(1, {"train/loss": 2.0}), (10, {"train/loss": 1.1}), (10, {"val/loss": 0.91}),
             (20, {"val/loss": 0.74}), (30, {"val/loss": 0.80}), (40, {"val/loss": float("nan")})]


def test_the_lowest_validation_loss_checkpoint_is_linked_as_best(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger=sft_checkpoints.__name__)
    checkpoints = make_checkpoints(tmp_path / "ckpt", [10, 20, 30, 40])
    log = write_verl_file_log(checkpoints / "val-1.jsonl", monkeypatch, EPOCH_LOG)

    assert sft_checkpoints.read_val_losses([log]) == {10: 0.91, 20: 0.74, 30: 0.80}  # NaN is no candidate
    assert sft_checkpoints.main([str(checkpoints)]) == 0  # logs default to CHECKPOINT_DIR/*.jsonl
    best = checkpoints / "best"
    assert best.is_symlink() and os.readlink(best) == "global_step_20"  # relative: the folder can move
    assert (best / "huggingface" / "model.safetensors").read_text() == "weights of step 20"
    summary = json.loads((checkpoints / "best.json").read_text())
    assert (summary["step"], summary["val/loss"], summary["mode"]) == (20, 0.74, "symlink")
    assert summary["candidates"] == {"10": 0.91, "20": 0.74, "30": 0.80}
    assert f"stage-2 model path: {best / 'huggingface'}" in caplog.text


def test_a_rerun_replaces_best_and_a_later_log_wins_for_a_repeated_step(tmp_path, monkeypatch):
    checkpoints = make_checkpoints(tmp_path / "ckpt", [10, 20, 30])
    first = write_verl_file_log(tmp_path / "run1.jsonl", monkeypatch, EPOCH_LOG[:4])
    assert sft_checkpoints.main([str(checkpoints), "--log", str(first)]) == 0
    assert os.readlink(checkpoints / "best") == "global_step_20"
    # A resumed run re-logs step 20 and logs step 30 into its own file.
    resumed = write_verl_file_log(tmp_path / "run2.jsonl", monkeypatch, [(20, {"val/loss": 0.95}),
                                                                          (30, {"val/loss": 0.70})])
    assert sft_checkpoints.main([str(checkpoints), "--log", str(first), "--log", str(resumed), "--copy"]) == 0
    best = checkpoints / "best"
    assert best.is_dir() and not best.is_symlink()
    assert (best / "huggingface" / "model.safetensors").read_text() == "weights of step 30"
    summary = json.loads((checkpoints / "best.json").read_text())
    assert summary["candidates"] == {"10": 0.91, "20": 0.95, "30": 0.70}
    assert sft_checkpoints.main([str(checkpoints), "--log", str(first)]) == 0  # a copy is replaced by a link
    assert os.readlink(best) == "global_step_20"


def test_ties_go_to_the_earliest_step_and_unsaved_steps_are_skipped(tmp_path, monkeypatch):
    checkpoints = make_checkpoints(tmp_path / "ckpt", [20, 30])
    log = write_verl_file_log(tmp_path / "log.jsonl", monkeypatch,
                              [(10, {"val/loss": 0.1}), (20, {"val/loss": 0.5}), (30, {"val/loss": 0.5})])
    best = sft_checkpoints.select_best(checkpoints, [log])
    assert (best.step, best.val_loss, best.path.name) == (20, 0.5, "global_step_20")  # step 10 was not kept


def test_missing_hf_weights_point_to_verls_model_merger(tmp_path, monkeypatch, caplog):
    checkpoints = make_checkpoints(tmp_path / "ckpt", [10], hf_weights=False)
    write_verl_file_log(checkpoints / "log.jsonl", monkeypatch, [(10, {"val/loss": 0.5})])
    assert sft_checkpoints.main([str(checkpoints)]) == 0
    assert "verl.model_merger merge --backend fsdp" in caplog.text


@pytest.mark.parametrize("case, message", [
    ("no checkpoints", "no global_step_N folders"),
    ("no logs", "no logs"),
    ("no validation", "has a val/loss"),
    ("garbage", "not a verl file-logger record"),
])
def test_selection_failures_say_what_is_missing(tmp_path, monkeypatch, caplog, case, message):
    checkpoints = tmp_path / "ckpt"
    checkpoints.mkdir()
    if case != "no checkpoints":
        make_checkpoints(checkpoints, [10, 20])
    if case == "no validation":
        write_verl_file_log(checkpoints / "log.jsonl", monkeypatch, [(10, {"train/loss": 1.0})])
    if case == "garbage":
        record = json.dumps({"step": 10, "data": {"val/loss": 1}})
        (checkpoints / "log.jsonl").write_text(f"not json\n{record}\n")
    assert sft_checkpoints.main([str(checkpoints)]) == 2
    assert message in caplog.text and not (checkpoints / "best").exists()


def test_an_interrupted_last_line_is_ignored(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text(json.dumps({"step": 10, "data": {"val/loss": 0.5}}) + '\n{"step": 20, "data": {"val/lo')
    assert sft_checkpoints.read_val_losses([log]) == {10: 0.5}


# --- +recipe=ragr1_sft_cpu (stage 1 on CPU) ---------------------------------------------------------------

def test_the_cpu_sft_recipe_is_ragr1_sft_with_cpu_settings_and_leaves_ragr1_sft_alone(sft_job, tmp_path):
    cpu_job = app_job("verl.trainer.sft_trainer", tmp_path, "+recipe=ragr1_sft_cpu")
    assert cpu_job["trainer"]["device"] == "cpu" and cpu_job["engine"]["strategy"] == "fsdp2"
    assert cpu_job["model"]["path"] == "${ragr1_cpu_demo:model}"  # printed unresolved: nothing is built
    assert cpu_job["data"]["train_files"] == "${ragr1_cpu_demo:sft_train_files}"
    # what keeps the lowest validation loss comes from ragr1_sft unchanged
    for section, key in (("data", "custom_cls"), ("checkpoint", "save_contents"), ("trainer", "test_freq"),
                         ("trainer", "save_freq"), ("trainer", "max_ckpt_to_keep"), ("trainer", "logger")):
        assert cpu_job[section][key] == sft_job[section][key], (section, key)
    # and the GPU recipe has none of the CPU settings
    assert sft_job["trainer"]["device"] == "cuda" and sft_job["engine"]["strategy"] == "fsdp"
    assert sft_job["model"]["path"] == "Qwen/Qwen2.5-7B-Instruct"
