"""The one verl seam (``ragr1_verl/verl_compat.py``): no other module of ours imports verl, the version gate
names the installed and the supported versions, and everything the seam names exists in the installed verl."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ragr1_verl import verl_compat

ROOT = Path(__file__).resolve().parents[2]
SEAM = ROOT / "ragr1_verl" / "verl_compat.py"


def _verl_imports(path: Path, root: Path = ROOT) -> list[str]:
    """Every import of verl in a file, function-local ones included: ``file:line module``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [f"{path.relative_to(root).as_posix()}:{node.lineno} {name}" for name in names
                  if name == "verl" or name.startswith("verl.")]
    return found


def test_no_module_but_the_seam_imports_verl():
    files = [path for folder in ("ragr1_verl", "hydra_plugins", "retriever_server")
             for path in sorted((ROOT / folder).rglob("*.py")) if path != SEAM]
    assert len(files) > 40
    assert [hit for path in files for hit in _verl_imports(path)] == []


def test_the_checker_sees_function_local_imports(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import verlish\nfrom . import verl\ndef f():\n    from verl.utils import fs\n"
                      "    import os, verl.trainer\n", encoding="utf-8")
    assert _verl_imports(sample, tmp_path) == ["sample.py:4 verl.utils", "sample.py:5 verl.trainer"]


@pytest.mark.parametrize("version", ["0.9.1", "0.9.5", "0.9.1.dev0", "0.9.2+local"])
def test_supported_versions_pass_the_gate(version):
    verl_compat.check_verl_version(version)


@pytest.mark.parametrize("version", ["0.9.0", "0.8.4", "0.10.0", "1.0.0"])
def test_unsupported_versions_are_refused_naming_both_versions(version):
    with pytest.raises(verl_compat.UnsupportedVerl) as refused:
        verl_compat.check_verl_version(version)
    assert f"verl {version} is installed" in str(refused.value)
    assert "verl>=0.9.1,<0.10" in str(refused.value)


def test_a_missing_verl_is_named(monkeypatch):
    monkeypatch.setattr(verl_compat, "installed_verl_version", lambda: None)
    verl_compat._check_installed_verl.cache_clear()
    with pytest.raises(verl_compat.UnsupportedVerl, match=r"verl is not installed.*ragr1-verl\[verl\]"):
        verl_compat.check_verl_version()


def test_the_gate_matches_the_pin_in_pyproject():
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert f'"verl[verl-core]{verl_compat.SUPPORTED_VERL_SPEC}"' in pyproject
    verl_compat.check_verl_version()  # the installed verl is one we support


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="NoSuchThing"):
        _ = verl_compat.NoSuchThing


RESOLVE_EVERYTHING = """
import importlib, json
from ragr1_verl import verl_compat as seam
out = {"symbols": {}, "modules": {}, "private": {}}
for name, (module, attribute) in seam._SYMBOLS.items():
    value = getattr(seam, name)
    out["symbols"][name] = getattr(value, "__module__", module)
for name in dir(seam):
    if name.endswith("_MODULE"):
        out["modules"][name] = importlib.util.find_spec(getattr(seam, name)) is not None
agent_loop = importlib.import_module(seam.AGENT_LOOP_MODULE)
trainer = importlib.import_module(seam.TRAINER_BASE_MODULE).PPOTrainer
rollout_base = importlib.import_module(seam.ROLLOUT_BASE_MODULE)
out["private"] = {
    "AGENT_LOOP_REGISTRY": isinstance(getattr(agent_loop, seam.AGENT_LOOP_REGISTRY), dict),
    "ROLLOUT_REGISTRY": isinstance(getattr(rollout_base, seam.ROLLOUT_REGISTRY), dict),
    "ENGINE_REGISTRY_ENGINES": isinstance(getattr(seam.EngineRegistry, seam.ENGINE_REGISTRY_ENGINES), dict),
    "COMPUTE_METRICS": callable(getattr(trainer, seam.COMPUTE_METRICS)),
    "CURRENT_PLATFORM": hasattr(seam.platform_manager, seam.CURRENT_PLATFORM),
}
out["registered"] = "ragr1_agent" in getattr(agent_loop, seam.AGENT_LOOP_REGISTRY)
print(json.dumps(out))
"""


@pytest.mark.slow
def test_everything_the_seam_names_exists_in_the_installed_verl():
    """In a fresh process with the CPU backend (no accelerator is probed): each symbol imports, each module
    name is a module, each private attribute has the shape our code relies on, and the plugin registered
    ``ragr1_agent`` through the import hook."""
    env = dict(os.environ, RAGR1_CPU_BACKEND="1")
    done = subprocess.run([sys.executable, "-c", RESOLVE_EVERYTHING], capture_output=True, text=True, env=env,
                          timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(found["symbols"]) == set(verl_compat._SYMBOLS)
    assert all(module.startswith("verl") for module in found["symbols"].values()), found["symbols"]
    assert found["modules"] and all(found["modules"].values()), found["modules"]
    assert found["private"] == dict.fromkeys(found["private"], True) and len(found["private"]) == 5
    assert found["registered"]
