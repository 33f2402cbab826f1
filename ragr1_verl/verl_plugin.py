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

import logging
from types import ModuleType

from ragr1_verl import verl_compat

AGENT_NAME = "ragr1_agent"
AGENT_TARGET = "ragr1_verl.agent_loop.RagR1AgentLoop"

logger = logging.getLogger(__name__)


def register(agent_loop_module: ModuleType) -> None:
    """Add ``ragr1_agent`` to verl's registry; instantiating it imports our module then."""
    verl_compat.add_agent_loop(agent_loop_module, AGENT_NAME, AGENT_TARGET)


def check_version() -> None:
    """Said once in every verl process: verl swallows a plugin's exceptions (at DEBUG level), and the first
    verl symbol we use raises the same error again."""
    try:
        verl_compat.check_verl_version()
    except verl_compat.UnsupportedVerl as err:
        logger.error("ragr1-verl: %s", err)
        raise


def install() -> None:
    verl_compat.after_import(verl_compat.AGENT_LOOP_MODULE, register)


check_version()
install()


def install_training_metrics() -> None:
    from ragr1_verl import metrics

    metrics.install()


install_training_metrics()


def activate_cpu_backend_if_selected() -> None:
    from ragr1_verl import cpu
    from ragr1_verl.demo.assets import register_resolver

    register_resolver()  # ${ragr1_cpu_demo:...} of the CPU recipes resolves anywhere; it changes nothing else
    try:
        cpu.activate_if_selected()
    except Exception:  # verl swallows plugin errors at DEBUG level; a half-activated backend must be visible
        logging.getLogger(__name__).exception("the ragr1 CPU backend was selected but could not be activated")
        raise


activate_cpu_backend_if_selected()
