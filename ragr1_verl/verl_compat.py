"""The plugin's one way into verl: every verl symbol we use, the modules we hook, the private attributes we
rely on, the supported-version gate and the after-import hook.

Nothing here imports verl when this module is imported. verl needs an order: the plugin entry point runs
inside ``import verl``, and the CPU platform must be installed before verl's engine modules load. So verl
symbols are imported on first use (``verl_compat.AgentLoopBase`` or ``from ragr1_verl.verl_compat import
AgentLoopBase`` imports verl's module at that moment, as a plain import at the same place would), and code
that changes a verl module waits for it with :func:`after_import`.

When a verl release moves something, this file says what: each symbol and private attribute names the verl
file it comes from (paths relative to verl's package). The first symbol used checks verl's version
(:func:`check_verl_version`); an architecture test fails when any other module of ours imports verl.
"""

from __future__ import annotations

import functools
import importlib
import importlib.abc
import importlib.metadata
import re
import sys
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any

SUPPORTED_VERL = ((0, 9, 1), (0, 10, 0))  # [lowest, first unsupported): verl 0.9.0 lacks the token builder
SUPPORTED_VERL_SPEC = ">=0.9.1,<0.10"  # as pyproject.toml pins it

# -- verl modules we hook, run or read configs from (names: importing them here would load verl too early) --
AGENT_LOOP_MODULE = "verl.experimental.agent_loop.agent_loop"
TRAINER_BASE_MODULE = "verl.trainer.ppo.v1.trainer_base"  # the v1 trainer main_ppo runs by default
DISTRIBUTED_MODULE = "verl.utils.distributed"
ENGINE_WORKERS_MODULE = "verl.workers.engine_workers"
FSDP_ENGINE_MODULE = "verl.workers.engine.fsdp.transformer_impl"
MODEL_UTILS_MODULE = "verl.utils.model"
FSDP_UTILS_MODULE = "verl.utils.fsdp_utils"
ROLLOUT_BASE_MODULE = "verl.workers.rollout.base"
ROLLOUT_REPLICA_MODULE = "verl.workers.rollout.replica"
CONFIG_MODULE = "verl.trainer.config"  # Hydra config module of main_ppo and sft_trainer
MAIN_PPO_MODULE = "verl.trainer.main_ppo"  # run as ``python -m``
SFT_TRAINER_MODULE = "verl.trainer.sft_trainer"  # run as ``python -m`` (or under torchrun)

# -- verl symbols, imported on first use: name -> (module, attribute) ------------------------------------
_SYMBOLS: dict[str, tuple[str, str]] = {
    # experimental/agent_loop/agent_loop.py
    "AgentLoopBase": (AGENT_LOOP_MODULE, "AgentLoopBase"),
    "AgentLoopMetrics": (AGENT_LOOP_MODULE, "AgentLoopMetrics"),
    "AgentLoopOutput": (AGENT_LOOP_MODULE, "AgentLoopOutput"),
    "DictConfigWrap": (AGENT_LOOP_MODULE, "DictConfigWrap"),
    "register_agent_loop": (AGENT_LOOP_MODULE, "register"),
    # tools/base_tool.py, tools/schemas.py, utils/rollout_trace.py
    "BaseTool": ("verl.tools.base_tool", "BaseTool"),
    "OpenAIFunctionToolSchema": ("verl.tools.schemas", "OpenAIFunctionToolSchema"),
    "ToolResponse": ("verl.tools.schemas", "ToolResponse"),
    "rollout_trace_op": ("verl.utils.rollout_trace", "rollout_trace_op"),
    # utils/dataset/rl_dataset.py
    "RLHFDataset": ("verl.utils.dataset.rl_dataset", "RLHFDataset"),
    # workers/rollout/base.py, workers/rollout/replica.py
    "BaseRollout": (ROLLOUT_BASE_MODULE, "BaseRollout"),
    "RolloutReplica": (ROLLOUT_REPLICA_MODULE, "RolloutReplica"),
    "TokenOutput": (ROLLOUT_REPLICA_MODULE, "TokenOutput"),
    # workers/engine/base.py
    "EngineRegistry": ("verl.workers.engine.base", "EngineRegistry"),
    # utils/tokenizer/chat_template.py, utils/tokenizer/tokenizer.py, utils/__init__.py, utils/fs.py
    "apply_chat_template": ("verl.utils.tokenizer.chat_template", "apply_chat_template"),
    "normalize_token_ids": ("verl.utils.tokenizer.tokenizer", "normalize_token_ids"),
    "hf_tokenizer": ("verl.utils", "hf_tokenizer"),
    "copy_local_path_from_hdfs": ("verl.utils.fs", "copy_local_path_from_hdfs"),
    # utils/import_utils.py: where verl finds a config path given relative to an installed package
    "resolve_config_path": ("verl.utils.import_utils", "resolve_config_path"),
    # plugin/platform/*.py (verl.plugin.platform re-exports them)
    "PlatformBase": ("verl.plugin.platform", "PlatformBase"),
    "PlatformRegistry": ("verl.plugin.platform", "PlatformRegistry"),
    "platform_manager": ("verl.plugin.platform", "platform_manager"),
    "set_platform": ("verl.plugin.platform", "set_platform"),
}

# -- private attributes of verl that we read or write (name on the module or class named) --------------------
AGENT_LOOP_REGISTRY = "_agent_loop_registry"  # experimental/agent_loop/agent_loop.py: {name: {"_target_": ...}}
ROLLOUT_REGISTRY = "_ROLLOUT_REGISTRY"  # workers/rollout/base.py: {(name, mode): adapter class path}
ENGINE_REGISTRY_ENGINES = "_engines"  # workers/engine/base.py, EngineRegistry: {model type: {backend: {device}}}
COMPUTE_METRICS = "_compute_metrics"  # trainer/ppo/v1/trainer_base.py, PPOTrainer: a step's metrics
CURRENT_PLATFORM = "_current_platform"  # plugin/platform/*, platform_manager: set, or None before detection


class UnsupportedVerl(RuntimeError):
    """The installed verl is outside the range this plugin supports."""


def installed_verl_version() -> str | None:
    """verl's installed version, from its distribution metadata (verl itself is not imported)."""
    try:
        return importlib.metadata.version("verl")
    except importlib.metadata.PackageNotFoundError:
        return None


def version_tuple(version: str) -> tuple[int, int, int]:
    """``"0.9.1"`` -> (0, 9, 1); pre-release and local suffixes are ignored (``0.9.1.dev0`` counts as 0.9.1)."""
    numbers = [int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3]]
    return tuple(numbers + [0] * (3 - len(numbers)))  # type: ignore[return-value]


def check_verl_version(version: str | None = None) -> None:
    """Raise :class:`UnsupportedVerl` naming the installed and the supported versions, unless supported;
    ``version``: another one than the installed (whose check, once passed, is not repeated)."""
    if version is None:
        _check_installed_verl()
    else:
        _check(version)


@functools.cache  # a failed check raises, so it is not cached and runs again next time
def _check_installed_verl() -> None:
    _check(installed_verl_version())


def _check(found: str | None) -> None:
    if found is None:
        raise UnsupportedVerl(f"verl is not installed; ragr1-verl needs verl{SUPPORTED_VERL_SPEC} "
                              "(pip install 'ragr1-verl[verl]')")
    low, high = SUPPORTED_VERL
    if not low <= version_tuple(found) < high:
        raise UnsupportedVerl(f"verl {found} is installed; ragr1-verl supports verl{SUPPORTED_VERL_SPEC} "
                              f"(pip install 'verl{SUPPORTED_VERL_SPEC}')")


def verl_module(name: str) -> ModuleType:
    """One of verl's modules (the ``*_MODULE`` names above), imported now."""
    check_verl_version()
    return importlib.import_module(name)


def __getattr__(name: str) -> Any:
    if name not in _SYMBOLS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module_name, attribute = _SYMBOLS[name]
    value = getattr(verl_module(module_name), attribute)
    globals()[name] = value  # later lookups skip this function
    return value


def add_agent_loop(agent_loop_module: ModuleType, name: str, target: str) -> None:
    """Make agent loop ``name`` known to verl by its class path ``target``, without importing it (verl's own
    ``register`` takes the class, which would import it in every verl process)."""
    registry = getattr(agent_loop_module, AGENT_LOOP_REGISTRY, None)
    if not isinstance(registry, dict):
        raise UnsupportedVerl(f"{AGENT_LOOP_MODULE}.{AGENT_LOOP_REGISTRY} is not a dict: this verl release is "
                              "not supported")
    registry.setdefault(name, {"_target_": target})


# -- the import hook -------------------------------------------------------------------------------------

Callback = Callable[[ModuleType], None]


class _AfterImportFinder(importlib.abc.MetaPathFinder):
    """Finds the hooked modules through the other finders and wraps their ``exec_module``, so that the
    callbacks run once the module body has run, before anyone else sees the module."""

    def __init__(self):
        self.pending: dict[str, list[Callback]] = {}
        self._searching = threading.local()

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.pending or getattr(self._searching, "active", False):
            return None
        self._searching.active = True  # the other finders may import; do not recurse into ourselves
        try:
            spec = next((found for finder in sys.meta_path if finder is not self and hasattr(finder, "find_spec")
                         and (found := finder.find_spec(fullname, path, target)) is not None), None)
        finally:
            self._searching.active = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        callbacks = self.pending.pop(fullname)
        execute = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            execute(module)
            for callback in callbacks:
                callback(module)

        spec.loader.exec_module = exec_module  # source loaders are created per module: this touches only this one
        return spec


_finder = _AfterImportFinder()


def after_import(module_name: str, callback: Callback) -> None:
    """Call ``callback(module)`` once ``module_name`` has been imported; at once if it already is.

    Used for every change we make to a verl module: the plugin entry point runs inside ``import verl``, where
    importing the heavier modules would make every verl process pay for them (or meet a half-initialised
    ``verl``)."""
    module = sys.modules.get(module_name)
    if module is not None and getattr(module, "__spec__", None) is not None and module_name not in _finder.pending:
        callback(module)
        return
    _finder.pending.setdefault(module_name, []).append(callback)
    if _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)
