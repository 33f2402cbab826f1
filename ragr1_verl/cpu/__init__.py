"""The CPU backend: verl's real ``main_ppo`` training on a machine without accelerators.

verl 0.9 needs three things it does not ship to train on CPU: a platform whose device is ``cpu`` (gloo for
collectives), FSDP engines registered for that device, and a rollout that generates without vLLM or SGLang.
This package supplies them (:mod:`.platform`, :mod:`.patches`, :mod:`.rollout`). The ``+recipe=ragr1_cpu``
defaults (model, data) and the ``ragr1-verl-demo`` launcher live in :mod:`ragr1_verl.demo`.

Selection. Nothing here is active unless chosen, so a GPU user importing the plugin gets verl untouched:

- ``RAGR1_CPU_BACKEND=1`` in the environment turns it on (``0`` forces it off);
- otherwise a command line choosing a ``ragr1_cpu*`` recipe (``+recipe=ragr1_cpu``, main_ppo) or a
  ``ragr1_sft_cpu*`` recipe (``+recipe=ragr1_sft_cpu``, sft_trainer) turns it on in that process (the driver,
  or each torchrun rank), which then exports ``RAGR1_CPU_BACKEND=1``: Ray processes started from the driver
  inherit it, and the recipe also puts it in Ray's ``runtime_env`` for clusters started elsewhere.

The plugin entry point calls :func:`activate_if_selected` inside ``import verl``; everything that touches
heavier verl modules waits for those modules to be imported (:func:`ragr1_verl.verl_compat.after_import`).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping, Sequence

from ragr1_verl import verl_compat
from ragr1_verl.environment import CPU_BACKEND

logger = logging.getLogger(__name__)

RECIPE_PREFIXES = ("ragr1_cpu", "ragr1_sft_cpu")  # main_ppo's CPU recipes and sft_trainer's

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_active = False


def selects_cpu_recipe(argument: str) -> bool:
    """True for a Hydra override choosing a CPU recipe: ``ragr1_cpu*`` (main_ppo) or ``ragr1_sft_cpu*``
    (sft_trainer), as ``+recipe=...``, ``recipe=...`` or ``++recipe=...``."""
    key, sep, value = argument.lstrip("+~").partition("=")
    return bool(sep) and key == "recipe" and value.strip().startswith(RECIPE_PREFIXES)


def selected(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> bool:
    """Whether this process should run verl on the CPU backend (see the module docstring)."""
    environ = os.environ if environ is None else environ
    value = (CPU_BACKEND.value(environ) or "").lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    argv = sys.argv if argv is None else argv
    return any(selects_cpu_recipe(argument) for argument in argv[1:])


def activate() -> None:
    """Install the CPU platform now and the engine/rollout registrations and patches as verl loads them."""
    global _active
    if _active:
        return
    verl_compat.check_verl_version()
    from ragr1_verl.cpu import patches
    from ragr1_verl.cpu.platform import install_platform

    os.environ[CPU_BACKEND.name] = "1"  # Ray processes started from here inherit it
    install_platform()
    patches.install()
    _active = True
    logger.info("ragr1 CPU backend active: verl runs on the cpu device with the %s rollout", patches.ROLLOUT_NAME)


def activate_if_selected() -> bool:
    if selected():
        activate()
        warn_about_ray_address()
    return _active


def warn_about_ray_address(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> str | None:
    """The CPU recipes start a Ray instance of their own (``ray_init.address: local``), but Ray lets
    ``RAY_ADDRESS`` win over it, and a cluster refuses the recipe's ``num_cpus``/``num_gpus``. Said (and
    returned) in the driver, before Ray's bare ValueError, unless the command line drops them."""
    argv = sys.argv if argv is None else argv
    environ = os.environ if environ is None else environ
    address = environ.get("RAY_ADDRESS", "").strip()
    if not address or address == "local" or not any(selects_cpu_recipe(a) for a in argv[1:]) or any(
            a.startswith("~ray_kwargs.ray_init.num_cpus") for a in argv[1:]):
        return None
    message = (f"RAY_ADDRESS={address} makes Ray join that cluster, which refuses the CPU recipe's "
               "ray_kwargs.ray_init.num_cpus/num_gpus (ValueError: When connecting to an existing cluster, "
               "num_cpus and num_gpus must not be provided). For the recipe's own Ray instance, unset "
               "RAY_ADDRESS; to join the cluster on purpose, add ~ray_kwargs.ray_init.num_cpus "
               "~ray_kwargs.ray_init.num_gpus")
    logger.warning("%s", message)
    return message
