"""verl plugin entry point (group ``verl.plugins``): makes ``ragr1_agent`` known in every process.

``import verl`` loads the ``verl.plugins`` entry points in every process, Ray workers included, so no
config path has to reach the workers. This runs inside ``import verl``, before verl is fully initialised,
and importing the agent-loop module here would cost every verl process several seconds (it imports ray,
torch and transformers). So the registration waits: a one-shot import hook adds the registry entry right
after ``verl.experimental.agent_loop.agent_loop`` is first imported. Nothing heavy is imported here.
``VERL_USE_EXTERNAL_PLUGINS=none`` turns it off; ``ragr1_verl/configs/agent_loop.yaml`` does the same job
through ``rollout.agent.agent_loop_config_path``.

It adds RAG-R1's ``ragr1/...`` means to verl's per-step training metrics (:mod:`ragr1_verl.metrics`), on every
device, once verl's trainer module has been imported.

It also switches on the CPU backend (:mod:`ragr1_verl.cpu`), but only when selected (``RAGR1_CPU_BACKEND=1``,
or a ``+recipe=ragr1_cpu*`` command line): otherwise verl is left as it is (only the OmegaConf resolver the CPU
recipes use for their default model and data is registered, so that they compose and resolve anywhere).
"""

from __future__ import annotations

import importlib.abc
import logging
import sys
from types import ModuleType

AGENT_LOOP_MODULE = "verl.experimental.agent_loop.agent_loop"
AGENT_NAME = "ragr1_agent"
AGENT_TARGET = "ragr1_verl.agent_loop.RagR1AgentLoop"


def register(agent_loop_module: ModuleType) -> None:
    """Add ``ragr1_agent`` to verl's registry; instantiating it imports our module then."""
    agent_loop_module._agent_loop_registry.setdefault(AGENT_NAME, {"_target_": AGENT_TARGET})


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds verl's agent-loop module with the other finders and registers once it has executed."""

    def find_spec(self, fullname, path, target=None):
        if fullname != AGENT_LOOP_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = next((found for finder in sys.meta_path if hasattr(finder, "find_spec")
                     and (found := finder.find_spec(fullname, path, target)) is not None), None)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        execute = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            execute(module)
            register(module)

        spec.loader.exec_module = exec_module  # this loader instance serves this one module only
        return spec


def install() -> None:
    module = sys.modules.get(AGENT_LOOP_MODULE)
    if module is not None and hasattr(module, "_agent_loop_registry"):
        register(module)
    elif not any(isinstance(finder, _RegisterAfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())


install()


def install_training_metrics() -> None:
    from ragr1_verl import metrics

    metrics.install()


install_training_metrics()


def activate_cpu_backend_if_selected() -> None:
    from ragr1_verl import cpu
    from ragr1_verl.cpu.assets import register_resolver

    register_resolver()  # ${ragr1_cpu_demo:...} of the CPU recipes resolves anywhere; it changes nothing else
    try:
        cpu.activate_if_selected()
    except Exception:  # verl swallows plugin errors at DEBUG level; a half-activated backend must be visible
        logging.getLogger(__name__).exception("the ragr1 CPU backend was selected but could not be activated")
        raise


activate_cpu_backend_if_selected()
