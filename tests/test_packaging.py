"""The wheel a regular ``pip install .`` would install: built offline from a copy of the source tree,
checked file by file (recipes, worker YAMLs, demo corpus, the ``hydra_plugins`` namespace package, entry
points), and installed into a folder of its own to show that the recipes and worker YAML paths work without
the editable install."""

from __future__ import annotations

import configparser
import importlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ragr1_verl", "retriever_server", "hydra_plugins")
RECIPES = "recipes"  # shipped as ragr1_verl/recipes, through the symlink of that name

pytestmark = pytest.mark.slow  # a wheel build and an install: several seconds


def source_files() -> set[str]:
    """Every file of the three packages (recipes/ through ragr1_verl/recipes), as wheel paths; caches and
    build metadata left out."""
    files = set()
    for package in PACKAGES:
        for folder, dirs, names in os.walk(REPO_ROOT / package, followlinks=True):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            relative = Path(folder).relative_to(REPO_ROOT)
            files.update((relative / name).as_posix() for name in names if not name.endswith(".pyc"))
    return files


def test_the_recipes_folder_is_the_package_ragr1_verl_recipes():
    link = REPO_ROOT / "ragr1_verl" / "recipes"
    assert link.is_symlink() and link.resolve() == (REPO_ROOT / RECIPES).resolve()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # Build from a copy, so the build writes no build/ or egg-info into the working tree.
    tree = tmp_path_factory.mktemp("source")
    shutil.copy(REPO_ROOT / "pyproject.toml", tree)
    shutil.copy(REPO_ROOT / "README.md", tree)
    for folder in (*PACKAGES, RECIPES):  # the recipes symlink stays a symlink, as in a clone
        shutil.copytree(REPO_ROOT / folder, tree / folder, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    out = tmp_path_factory.mktemp("wheel")
    # --no-index and --no-build-isolation: the build must need nothing but the venv's setuptools and wheel.
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
               "-w", str(out), str(tree)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    [built] = out.glob("ragr1_verl-*.whl")
    return built


@pytest.fixture(scope="module")
def names(wheel) -> set[str]:
    with zipfile.ZipFile(wheel) as archive:
        return set(archive.namelist())


def dist_info_file(wheel: Path, names: set[str], filename: str) -> str:
    [path] = [name for name in names if name.endswith(f".dist-info/{filename}")]
    with zipfile.ZipFile(wheel) as archive:
        return archive.read(path).decode()


def test_the_wheel_holds_every_module_and_data_file_of_the_packages(names):
    missing = source_files() - names
    assert not missing, f"not in the wheel (package-data in pyproject.toml?): {sorted(missing)}"
    top_level = {name.split("/")[0] for name in names}
    assert {t for t in top_level if not t.endswith(".dist-info")} == set(PACKAGES)  # no tests/, no recipes/


def test_the_wheel_holds_the_recipes_worker_yamls_and_demo_corpus(names):
    for recipe in ("ragr1", "ragr1_grpo", "ragr1_sq", "ragr1_sft", "ragr1_cpu", "ragr1_sft_cpu"):
        assert f"ragr1_verl/recipes/recipe/{recipe}.yaml" in names
    assert "ragr1_verl/recipes/README.md" in names
    assert "ragr1_verl/recipes/__init__.py" in names  # pkg://ragr1_verl.recipes needs an importable package
    assert {"ragr1_verl/configs/agent_loop.yaml", "ragr1_verl/configs/tool_config.yaml"} <= names
    assert {"retriever_server/demo/corpus.jsonl", "retriever_server/demo/questions.jsonl"} <= names
    assert "ragr1_verl/sft/checkpoints.py" in names


def test_hydra_plugins_stays_a_namespace_package(names):
    # An __init__.py here would shadow every other Hydra plugin installed in the environment.
    assert "hydra_plugins/ragr1_searchpath/__init__.py" in names
    assert "hydra_plugins/__init__.py" not in names


def test_the_entry_points_name_importable_targets(wheel, names):
    entry_points = configparser.ConfigParser(delimiters=("=",))
    entry_points.optionxform = str
    entry_points.read_string(dist_info_file(wheel, names, "entry_points.txt"))
    assert dict(entry_points["verl.plugins"]) == {"ragr1": "ragr1_verl.verl_plugin"}
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    declared = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert dict(entry_points["console_scripts"]) == declared
    for target in declared.values():
        module, _, function = target.partition(":")
        assert callable(getattr(importlib.import_module(module), function)), target


def test_the_metadata_never_pulls_a_verl_backend_extra(wheel, names):
    metadata = dist_info_file(wheel, names, "METADATA").splitlines()
    requires = [line.split(":", 1)[1].strip() for line in metadata if line.startswith("Requires-Dist:")]
    verl = [r for r in requires if r.startswith("verl")]
    assert verl and all("[verl-core]" in r for r in verl), verl  # vllm/sglang/fsdp extras pin a CUDA torch


def test_a_retriever_host_never_installs_verl_or_ray(wheel, names):
    metadata = dist_info_file(wheel, names, "METADATA").splitlines()
    requires = [line.split(":", 1)[1].strip() for line in metadata if line.startswith("Requires-Dist:")]
    for extra in ("retriever", "retriever-gpu"):
        pulled = [r for r in requires if "extra ==" not in r or f'extra == "{extra}"' in r]
        assert pulled and not [r for r in pulled if r.lower().startswith(("verl", "ray", "transferqueue"))], pulled


# Runs with the wheel's install folder in place of the editable checkout on sys.path, and with verl reached
# through that folder too (as in one site-packages), from a directory that is not the repository.
FROM_THE_WHEEL = """
import json, os, sys
target, checkout = sys.argv[1], sys.argv[2]
sys.path = [target] + [p for p in sys.path if os.path.realpath(p) != os.path.realpath(checkout)]
from hydra import compose, initialize_config_module
import hydra_plugins, ragr1_verl, verl
from ragr1_verl.verl_compat import resolve_config_path
with initialize_config_module("verl.trainer.config", version_base=None):
    grpo = compose("ppo_trainer", overrides=["+recipe=ragr1_grpo"])
with initialize_config_module("verl.trainer.config", version_base=None):
    sft = compose("sft_trainer_engine", overrides=["+recipe=ragr1_sft"])
with initialize_config_module("verl.trainer.config", version_base=None):
    cpu = compose("ppo_trainer", overrides=["+recipe=ragr1_cpu"])
print(json.dumps({
    "ragr1_verl": ragr1_verl.__file__, "hydra_plugins": list(hydra_plugins.__path__), "verl": verl.__file__,
    "grpo": [grpo.algorithm.adv_estimator, grpo.ragr1.mode, "recipe" in grpo],
    "sft": [sft.trainer.total_epochs, sft.data.custom_cls.name, "recipe" in sft],
    "cpu": [cpu.trainer.device, cpu.ragr1.mode],
    "yamls": [resolve_config_path(p) for p in ("ragr1_verl/configs/agent_loop.yaml",
                                               "ragr1_verl/configs/tool_config.yaml")],
}))
"""


def test_the_installed_wheel_finds_the_recipes_and_resolves_the_worker_yamls(wheel, tmp_path):
    import verl

    target = tmp_path / "site"
    command = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(target),
               str(wheel)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    (target / "verl").symlink_to(Path(verl.__file__).parent, target_is_directory=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", FROM_THE_WHEEL, str(target), str(REPO_ROOT)],
                            cwd=elsewhere,
                            env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(report["ragr1_verl"]).is_relative_to(target)
    plugin_paths = [Path(p).resolve() for p in report["hydra_plugins"]]
    assert (target / "hydra_plugins").resolve() in plugin_paths  # the wheel's ...
    assert (REPO_ROOT / "hydra_plugins").resolve() not in plugin_paths  # ... and not the checkout's
    assert report["grpo"] == ["grpo", "mq", False] and report["sft"] == [5, "RagR1SFTDataset", False]
    assert report["cpu"] == ["cpu", "mq"]
    assert report["yamls"] == [str(target / "ragr1_verl/configs/agent_loop.yaml"),
                               str(target / "ragr1_verl/configs/tool_config.yaml")]
