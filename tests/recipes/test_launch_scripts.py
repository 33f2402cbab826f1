"""The GPU launch scripts in recipes/: the command each one builds, checked by verl's own apps (``--cfg job``
composes the config without training), and their errors before anything starts."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
STAGE2 = {"train_ppo_mq.sh": ("ragr1", "mq"), "train_ppo_sq.sh": ("ragr1_sq", "sq"),
          "train_grpo_mq.sh": ("ragr1_grpo", "mq")}


@pytest.fixture
def workspace(tmp_path) -> dict[str, str]:
    """A data and checkpoint layout as the README's data steps and train_sft.sh leave it."""
    for folder in ("data/sft_mq", "data/ragr1_mq", "data/ragr1_sq"):
        (tmp_path / folder).mkdir(parents=True)
        for split in ("train", "test"):
            (tmp_path / folder / f"{split}.parquet").touch()
    for mode in ("mq", "sq"):
        (tmp_path / f"checkpoints/ragr1-sft-{mode}/best/huggingface").mkdir(parents=True)
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAGR1_")}
    bin_dir = str(Path(sys.executable).parent)  # torchrun and python of this venv
    return {**env, "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", "DATA_DIR": str(tmp_path / "data"),
            "CKPT_ROOT": str(tmp_path / "checkpoints"), "GPUS_PER_NODE": "4"}


def launch(script: str, env: dict[str, str], *args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(RECIPES / script), *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=300, check=False)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("script", sorted(STAGE2))
def test_dry_run_prints_the_stage2_command_with_the_recipe_the_sft_model_and_the_data(script, workspace):
    recipe, mode = STAGE2[script]
    result = launch(script, {**workspace, "DRY_RUN": "1", "RETRIEVER_URL": "http://10.0.0.5:8000/retrieve"})
    assert result.returncode == 0, result.stderr
    command = result.stderr.strip().splitlines()[-1]
    sft = f"{workspace['CKPT_ROOT']}/ragr1-sft-{mode}/best/huggingface"
    assert f"+recipe={recipe} " in command and f"actor_rollout_ref.model.path={sft}" in command
    assert f"data.train_files={workspace['DATA_DIR']}/ragr1_{mode}/train.parquet" in command
    assert "ragr1.retriever.url=http://10.0.0.5:8000/retrieve" in command
    assert ("critic.model.path" in command) == (recipe != "ragr1_grpo")  # GRPO trains no critic


@pytest.mark.slow
@pytest.mark.parametrize("script", ["train_ppo_mq.sh", "train_grpo_mq.sh"])
def test_main_ppo_composes_the_scripts_command_from_another_directory(script, workspace, tmp_path):
    result = launch(script, {**workspace, "RETRIEVER_URL": "http://10.0.0.5:8000/retrieve"},
                    "trainer.total_training_steps=7", "--cfg", "job", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    job = yaml.safe_load(result.stdout)
    recipe, mode = STAGE2[script]
    assert job["actor_rollout_ref"]["model"]["path"].endswith(f"ragr1-sft-{mode}/best/huggingface")
    assert job["ragr1"]["retriever"]["url"] == "http://10.0.0.5:8000/retrieve"
    assert job["trainer"]["n_gpus_per_node"] == 4 and job["trainer"]["total_training_steps"] == 7  # args win
    assert job["algorithm"]["adv_estimator"] == ("grpo" if recipe == "ragr1_grpo" else "gae")


@pytest.mark.slow
def test_sft_trainer_composes_the_sft_scripts_command_under_torchrun(workspace, tmp_path):
    if shutil.which("torchrun", path=workspace["PATH"]) is None:
        pytest.skip("torchrun is not installed")
    result = launch("train_sft.sh", {**workspace, "GPUS_PER_NODE": "1", "MODEL": "/models/tiny"},
                    "--cfg", "job", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    job = yaml.safe_load(result.stdout)
    assert job["model"]["path"] == "/models/tiny"
    assert job["data"]["train_files"] == f"{workspace['DATA_DIR']}/sft_mq/train.parquet"
    assert job["trainer"]["default_local_dir"] == f"{workspace['CKPT_ROOT']}/ragr1-sft-mq"
    assert "sft_checkpoints" not in result.stderr  # --cfg only prints: no checkpoint selection after it


def test_stage2_refuses_to_start_without_a_retriever_and_names_its_health_url(workspace):
    url = f"http://127.0.0.1:{free_port()}"
    result = launch("train_ppo_mq.sh", {**workspace, "RETRIEVER_URL": f"{url}/retrieve"})
    assert result.returncode == 2
    assert f"no retriever answers at {url}/health" in result.stderr


@pytest.mark.parametrize(("script", "variable", "missing"), [
    ("train_ppo_mq.sh", "SFT_MODEL", "checkpoints/ragr1-sft-mq/best/huggingface"),
    ("train_sft.sh", "SFT_DATA", "data/sft_mq/train.parquet")])
def test_a_missing_input_is_named_with_the_variable_that_sets_it(script, variable, missing, workspace):
    shutil.rmtree(Path(workspace["CKPT_ROOT"], "ragr1-sft-mq"))
    shutil.rmtree(Path(workspace["DATA_DIR"], "sft_mq"))
    result = launch(script, workspace)
    assert result.returncode == 2
    assert f"error: {variable}=" in result.stderr and missing in result.stderr
