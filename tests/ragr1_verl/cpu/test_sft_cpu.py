"""Stage 1 on CPU: verl's real ``sft_trainer +recipe=ragr1_sft_cpu`` with ``RagR1SFTDataset`` (the tiny random
Qwen2, SFT parquet from the fixture trajectories), the lowest-validation-loss checkpoint as a Hugging Face
folder, and a real ``main_ppo +recipe=ragr1_cpu`` step starting from it; plus the pure parts around it (the
torchrun process-group patch, the ``${ragr1_cpu_demo:...}`` asset names, ``--print-model-path``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from ragr1_verl.cpu import patches
from ragr1_verl.demo import assets
from ragr1_verl.sft import checkpoints as sft_checkpoints

FIXTURE_TRAJECTORIES = Path(__file__).parents[1] / "data" / "fixtures" / "sft_trajectories.jsonl"
SFT_TIMEOUT_S = 420


# -- the torchrun process-group patch ---------------------------------------------------------------------

def _verls_initialize_global_process_group():
    """verl's own function, as sft_trainer finds it before the CPU port rebinds it."""
    import inspect

    import verl.utils.distributed

    function = verl.utils.distributed.initialize_global_process_group
    function = getattr(function, "_ragr1_original", function)  # already patched when the CPU port is active
    return function, inspect.signature(function).parameters["timeout_second"].default


def test_the_torchrun_process_group_uses_cpu_gloo_and_verls_timeout(monkeypatch):
    import torch.distributed

    verls, verls_timeout = _verls_initialize_global_process_group()
    calls = []
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda **kwargs: calls.append(kwargs))
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("DIST_INIT_METHOD", "tcp://127.0.0.1:1")
    module = SimpleNamespace(initialize_global_process_group=verls)
    patches.patch_torchrun_process_group_backend(module)
    patched = module.initialize_global_process_group
    patches.patch_torchrun_process_group_backend(module)  # idempotent
    assert module.initialize_global_process_group is patched and patched._ragr1_original is verls
    assert patched() == (0, 0, 1)
    assert [(call["backend"], call["timeout"].total_seconds(), call["init_method"]) for call in calls] == [
        ("cpu:gloo", verls_timeout, "tcp://127.0.0.1:1")]


def test_without_torchrun_one_local_rank_is_set_up():
    environ = {"MASTER_ADDR": "10.0.0.1"}
    patches._single_process_environment(environ)
    assert {key: environ[key] for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR")} == {
        "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "10.0.0.1"}  # what is set stays
    assert 0 < int(environ["MASTER_PORT"]) < 65536


def test_the_torchrun_patch_refuses_a_different_verl_function():
    def initialize_global_process_group(timeout_second=10, backend=None):
        return None

    with pytest.raises(patches.VerlInternalsChanged, match="initialize_global_process_group"):
        patches.patch_torchrun_process_group_backend(
            SimpleNamespace(initialize_global_process_group=initialize_global_process_group))


# -- ${ragr1_cpu_demo:...} ------------------------------------------------------------------------------

def test_every_asset_name_resolves_to_its_file(monkeypatch, tmp_path):
    monkeypatch.setattr(assets, "ensure_demo_model", lambda: tmp_path / "model")
    monkeypatch.setattr(assets, "ensure_demo_data", lambda: tmp_path / "rl")
    monkeypatch.setattr(assets, "ensure_demo_sft_data", lambda mode="mq": tmp_path / f"sft-{mode}")
    resolved = {name: Path(assets.resolve(name)).relative_to(tmp_path).as_posix() for name in assets.ASSETS}
    assert resolved == {
        "model": "model", "train_files": "rl/train.parquet", "val_files": "rl/val.parquet",
        "test_files": "rl/test.parquet", "dev_files": "rl/dev.parquet",
        "sft_train_files": "sft-mq/train.parquet", "sft_val_files": "sft-mq/val.parquet",
        "sft_sq_train_files": "sft-sq/train.parquet", "sft_sq_val_files": "sft-sq/val.parquet"}
    with pytest.raises(ValueError, match="unknown asset"):
        assets.resolve("sft_test_files")


def test_the_rl_demo_data_follows_the_questions_own_parts(tmp_path):
    import pandas as pd

    from ragr1_verl.data.questions import demo_questions

    paths = assets.write_demo_data(tmp_path)
    assert [path.name for path in paths] == ["train.parquet", "val.parquet", "test.parquet", "dev.parquet"]
    infos = {path.stem: list(pd.read_parquet(path)["extra_info"]) for path in paths}
    ids = {name: [info["id"] for info in rows] for name, rows in infos.items()}
    # val: the 16 dev questions training-time validation uses; dev: all 78, for choosing settings (ragr1-eval)
    for name, part in (("train", "train"), ("val", "val"), ("test", "test"), ("dev", "dev")):
        assert ids[name] == [question.id for question in demo_questions(part=part)], name
    assert len(ids["val"]) == 16 and len(ids["dev"]) == 78 and set(ids["val"]) < set(ids["dev"])
    assert not set(ids["test"]) & (set(ids["train"]) | set(ids["dev"]))  # held out from training and choosing
    indexes = [info["index"] for name in ("train", "val", "test") for info in infos[name]]
    assert indexes == list(range(len(indexes)))  # unique across the files verl reads
    index_of = {info["id"]: info["index"] for rows in infos.values() for info in rows}
    assert len(index_of) == len(set(index_of.values()))  # one index per question, the same in val and dev
    assert all(index_of[info["id"]] == info["index"] for rows in infos.values() for info in rows)


def test_demo_sft_data_comes_in_mq_and_sq_only():
    with pytest.raises(ValueError, match="modes"):
        assets.ensure_demo_sft_data("xq")


def test_the_demo_sft_data_is_cached_per_mode_and_rebuilt_when_its_inputs_change(monkeypatch, tmp_path):
    """The cache decision of ``assets``: the builder is a recorder here (the real scripted teacher, which
    takes a minute, is run by ``tests/ragr1_verl/data/test_scripted_teacher.py``)."""
    import ragr1_verl.demo

    calls = []

    def write_demo_sft_data(out_dir: Path, model: Path, mode: str = "mq"):
        assert model == tmp_path / "model"
        calls.append(mode)
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in ("train", "val"):
            (out_dir / f"{name}.parquet").write_text(f"{mode} {name}")
        return out_dir / "train.parquet", out_dir / "val.parquet"

    monkeypatch.setitem(sys.modules, "ragr1_verl.demo.sft_data", SimpleNamespace(
        write_demo_sft_data=write_demo_sft_data))
    monkeypatch.setattr(ragr1_verl.demo, "sft_data", sys.modules["ragr1_verl.demo.sft_data"], raising=False)
    monkeypatch.setattr(assets, "assets_root", lambda: tmp_path)
    monkeypatch.setattr(assets, "ensure_demo_model", lambda: tmp_path / "model")
    first = assets.resolve("sft_sq_val_files")
    assert assets.resolve("sft_sq_val_files") == first and Path(first).read_text() == "sq val"
    assert Path(assets.resolve("sft_train_files")).read_text() == "mq train"
    assert calls == ["sq", "mq"]
    monkeypatch.setattr(assets, "sft_inputs_fingerprint", lambda: "changed")  # e.g. the teacher changed
    assert assets.resolve("sft_train_files") != first.replace("sq/val", "mq/train")
    assert calls == ["sq", "mq", "mq"]  # rebuilt, not served from before the change


def test_the_sft_fingerprint_covers_every_input_file():
    from importlib import resources

    assert all(resources.files(package).joinpath(name).is_file() for package, name in assets.SFT_INPUTS)
    assert len(assets.sft_inputs_fingerprint()) == 12


def test_the_sft_cpu_recipes_compose_for_sft_trainer_on_the_demo_assets():
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    with initialize_config_module("verl.trainer.config", version_base=None):
        mq, sq = (compose("sft_trainer_engine", overrides=[f"+recipe={name}"])
                  for name in ("ragr1_sft_cpu", "ragr1_sft_cpu_sq"))
    # read unresolved: resolving ${ragr1_cpu_demo:...} would build the assets
    raw_mq, raw_sq = (OmegaConf.to_container(config, resolve=False) for config in (mq, sq))
    assert raw_mq["data"]["train_files"] == "${ragr1_cpu_demo:sft_train_files}"
    assert raw_mq["data"]["val_files"] == "${ragr1_cpu_demo:sft_val_files}"
    assert raw_sq["data"]["train_files"] == "${ragr1_cpu_demo:sft_sq_train_files}"
    assert raw_sq["data"]["val_files"] == "${ragr1_cpu_demo:sft_sq_val_files}"
    assert raw_mq["model"]["path"] == raw_sq["model"]["path"] == "${ragr1_cpu_demo:model}"
    for config in (mq, sq):
        assert config.trainer.device == "cpu" and config.engine.strategy == "fsdp2"
        assert dict(config.engine.mixed_precision) == {"param_dtype": "fp32", "reduce_dtype": "fp32",
                                                       "buffer_dtype": "fp32"}
        assert config.model.override_config.attn_implementation == "sdpa"
        assert config.data.custom_cls.name == "RagR1SFTDataset"  # from ragr1_sft
        assert "hf_model" in config.checkpoint.save_contents and "file" in config.trainer.logger
        assert config.trainer.total_epochs >= 2 and config.trainer.test_freq == "after_each_epoch"
    assert sq.trainer.experiment_name != mq.trainer.experiment_name


# -- --print-model-path ---------------------------------------------------------------------------------

def _checkpoints(root: Path, losses: dict[int, float], *, weights: bool = True) -> Path:
    for step in losses:
        hf = root / f"global_step_{step}" / "huggingface"
        hf.mkdir(parents=True)
        (hf / "config.json").write_text("{}")
        if weights:
            (hf / "model.safetensors").write_text(str(step))
    (root / "val.jsonl").write_text("".join(json.dumps({"step": step, "data": {"val/loss": loss}}) + "\n"
                                            for step, loss in losses.items()))
    return root


def test_print_model_path_prints_only_the_best_hf_folder(tmp_path, capsys):
    checkpoints = _checkpoints(tmp_path / "ckpt", {3: 0.9, 6: 0.4, 9: 0.6})
    assert sft_checkpoints.main([str(checkpoints), "--print-model-path"]) == 0
    out = capsys.readouterr().out
    assert out == f"{(checkpoints / 'global_step_6' / 'huggingface').resolve()}\n"
    assert os.readlink(checkpoints / "best") == "global_step_6"  # it still links best


def test_print_model_path_fails_without_model_weights(tmp_path, capsys):
    checkpoints = _checkpoints(tmp_path / "ckpt", {3: 0.9}, weights=False)
    assert sft_checkpoints.main([str(checkpoints), "--print-model-path"]) == 2
    assert capsys.readouterr().out == ""
    best = sft_checkpoints.select_best(checkpoints, [checkpoints / "val.jsonl"])
    with pytest.raises(sft_checkpoints.CheckpointSelectionError, match="model_merger"):
        sft_checkpoints.hf_model_path(best)


# -- the real sft_trainer, then main_ppo from its best checkpoint ------------------------------------------

def build_sft_parquet(out: Path) -> Path:
    """``ragr1-data sft`` over the fixture trajectories: 2 training and 2 validation trajectories."""
    result = subprocess.run([sys.executable, "-m", "ragr1_verl.data.cli", "sft", "--input",
                             str(FIXTURE_TRAJECTORIES), "--out", str(out), "--val-fraction", "0.4"],
                            capture_output=True, text=True, check=False, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def sft_run(tiny_model_with_weights, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sft-cpu")
    data = build_sft_parquet(folder / "data")
    checkpoints = folder / "checkpoints"
    checkpoints.mkdir()
    env = dict(os.environ, VERL_FILE_LOGGER_PATH=str(checkpoints / "val.jsonl"), WANDB_MODE="disabled")
    env.pop("RAGR1_CPU_BACKEND", None)  # choosing the recipe alone must switch the CPU backend on
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
               "-m", "verl.trainer.sft_trainer", "+recipe=ragr1_sft_cpu",
               f"model.path={tiny_model_with_weights}",
               f"data.train_files={data / 'train.parquet'}", f"data.val_files={data / 'test.parquet'}",
               "data.max_length=2048",  # the tiny byte-level tokenizer makes long sequences
               "data.train_batch_size=1", "optim.lr=1e-2",  # large steps: the loss has to fall within 4
               "trainer.total_epochs=2", f"trainer.default_local_dir={checkpoints}"]
    result = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, check=False,
                            timeout=SFT_TIMEOUT_S)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    return checkpoints


def _logged(checkpoints: Path, key: str) -> dict[int, float]:
    records = [json.loads(line) for line in (checkpoints / "val.jsonl").read_text().splitlines() if line]
    return {record["step"]: record["data"][key] for record in records if key in record["data"]}


@pytest.mark.slow
def test_sft_trains_validates_and_saves_every_epoch(sft_run):
    train_loss = _logged(sft_run, "train/loss")
    assert sorted(train_loss) == [1, 2, 3, 4]  # 2 trajectories, batch 1, 2 epochs
    # each epoch sees the same two trajectories: the second epoch's loss is lower
    assert train_loss[3] + train_loss[4] < train_loss[1] + train_loss[2]
    assert sorted(_logged(sft_run, "val/loss")) == [2, 4]  # after each epoch
    for step in (2, 4):
        assert sft_checkpoints.has_hf_weights(sft_run / f"global_step_{step}")
        assert (sft_run / f"global_step_{step}" / "huggingface" / "config.json").is_file()


@pytest.mark.slow
def test_the_best_checkpoint_is_the_lowest_validation_loss_and_main_ppo_trains_from_it(sft_run, demo_server):
    from tests.ragr1_verl.cpu.test_main_ppo_cpu import run_main_ppo

    val_loss = _logged(sft_run, "val/loss")
    result = subprocess.run([sys.executable, "-m", "ragr1_verl.sft.checkpoints", str(sft_run),
                             "--print-model-path"], capture_output=True, text=True, check=False, timeout=120)
    assert result.returncode == 0, result.stderr
    model_path = Path(result.stdout.strip())
    best_step = min(val_loss, key=lambda step: (val_loss[step], step))
    assert model_path == (sft_run / f"global_step_{best_step}" / "huggingface").resolve()
    assert json.loads((sft_run / "best.json").read_text())["step"] == best_step

    url, _ = demo_server
    folder = sft_run.parent / "rl"
    folder.mkdir()
    env = dict(os.environ, VERL_FILE_LOGGER_PATH=str(folder / "metrics.jsonl"), WANDB_MODE="disabled")
    env.pop("RAGR1_CPU_BACKEND", None)
    code, output, _, survivors = run_main_ppo([
        "+recipe=ragr1_cpu", f"actor_rollout_ref.model.path={model_path}",
        "data.max_prompt_length=640",  # the tiny byte-level tokenizer makes long prompts
        f"ragr1.retriever.url={url}/retrieve",
        "trainer.total_training_steps=1", "trainer.test_freq=-1", "trainer.logger=[console,file]",
    ], folder, env)
    assert code == 0, output[-6000:]
    assert f"'path': '{model_path}'" in output or str(model_path) in output
    steps = [json.loads(line)["step"] for line in (folder / "metrics.jsonl").read_text().splitlines() if line]
    assert steps == [1]
    assert survivors == []


def test_an_unmerged_lora_hf_model_is_refused(tmp_path):
    import torch
    from safetensors.torch import save_file

    checkpoints = _checkpoints(tmp_path / "ckpt", {3: 0.9})
    hf = checkpoints / "global_step_3" / "huggingface"
    # what verl 0.9.1's hf_model holds after a LoRA run: the PEFT wrapper's names
    save_file({"base_model.model.model.layers.0.mlp.down_proj.lora_A.default.weight": torch.zeros(2, 2)},
              hf / "model.safetensors")
    best = sft_checkpoints.select_best(checkpoints, [checkpoints / "val.jsonl"])
    with pytest.raises(sft_checkpoints.CheckpointSelectionError, match="unmerged LoRA"):
        sft_checkpoints.hf_model_path(best)
    save_file({"model.layers.0.mlp.down_proj.weight": torch.zeros(2, 2)}, hf / "model.safetensors")
    assert sft_checkpoints.hf_model_path(best) == hf.resolve()
