"""Registrations and the few patches verl 0.9 needs to train on the ``cpu`` device.

Public registries first: the FSDP engines are registered for ``cpu`` (verl registers them for ``cuda`` and
``npu`` only) and the rollout replica under :data:`ROLLOUT_NAME`. Where verl has no hook, a
small patch, each applied only by :func:`install` (CPU backend selected) and each checking first that the
code it changes still looks as it does in verl 0.9.x, raising :class:`VerlInternalsChanged` otherwise:

- ``initialize_global_process_group_ray`` (Ray workers of ``main_ppo``) and ``initialize_global_process_group``
  (``torchrun`` ranks of ``sft_trainer``) build the backend string ``cpu:gloo,<device>:<backend>``, which on
  the cpu device names ``cpu`` twice and torch rejects it: use ``cpu:gloo``.
- the rollout's trainer-side adapter is looked up in a private dict of ``verl.workers.rollout.base``.
- ``load_valuehead_model`` (critic) hard-codes FlashAttention 2: load the value model with SDPA.
- FSDP2's forward-only (reference) model asks for pinned CPU offload, and pinning needs an accelerator.
"""

from __future__ import annotations

import functools
import inspect
import logging
from types import ModuleType
from typing import Any

from ragr1_verl import verl_compat
from ragr1_verl.verl_compat import after_import

logger = logging.getLogger(__name__)

ROLLOUT_NAME = "hf_cpu"  # the rollout.name the CPU recipes choose
ADAPTER_PATH = "ragr1_verl.cpu.rollout.CPUServerAdapter"
CPU_BACKEND = "cpu:gloo"


class VerlInternalsChanged(RuntimeError):
    """verl code that a CPU-backend patch relies on is not what it expects (an unsupported verl release)."""


def _expect(condition: bool, what: str) -> None:
    if not condition:
        raise VerlInternalsChanged(f"ragr1 CPU backend: {what}. This verl release is not supported by the CPU "
                                   "backend (verl 0.9.x is); unset RAGR1_CPU_BACKEND or use a ragr1_cpu-free recipe")


def _parameters(function: Any) -> list[str]:
    return list(inspect.signature(function).parameters)


def _source(function: Any) -> str:
    try:
        return inspect.getsource(function)
    except (OSError, TypeError):  # no source shipped: the signature check has to do
        return "get_nccl_backend()"


def install() -> None:
    """Queue every registration and patch on its verl module (run at once for modules already imported)."""
    after_import(verl_compat.DISTRIBUTED_MODULE, patch_process_group_backend)
    after_import(verl_compat.DISTRIBUTED_MODULE, patch_torchrun_process_group_backend)
    after_import(verl_compat.ENGINE_WORKERS_MODULE, rebind_process_group_init)
    after_import(verl_compat.FSDP_ENGINE_MODULE, register_fsdp_engines)
    after_import(verl_compat.FSDP_ENGINE_MODULE, unpin_forward_only_offload)
    after_import(verl_compat.MODEL_UTILS_MODULE, load_value_model_with_sdpa)
    after_import(verl_compat.ROLLOUT_BASE_MODULE, register_rollout_adapter)
    after_import(verl_compat.ROLLOUT_REPLICA_MODULE, register_rollout_replica)


# -- process group ----------------------------------------------------------------------------------------

def patch_process_group_backend(distributed: ModuleType) -> None:
    original = getattr(distributed, "initialize_global_process_group_ray", None)
    _expect(original is not None and _parameters(original) == ["timeout_second", "backend"],
            "verl.utils.distributed.initialize_global_process_group_ray(timeout_second, backend) was not found")
    if getattr(original, "_ragr1_cpu", False):
        return

    @functools.wraps(original)
    def initialize_on_cpu(timeout_second=None, backend=None):
        return original(timeout_second=timeout_second, backend=backend or CPU_BACKEND)

    initialize_on_cpu._ragr1_cpu = True
    initialize_on_cpu._ragr1_original = original
    distributed.initialize_global_process_group_ray = initialize_on_cpu


def patch_torchrun_process_group_backend(distributed: ModuleType) -> None:
    """``sft_trainer.run_sft`` calls ``initialize_global_process_group()``, which has no backend argument.

    The replacement initialises the process group as verl's does (env:// or ``$DIST_INIT_METHOD``, the same
    timeout, ranks from torchrun's environment) with the ``cpu:gloo`` backend; there is no device to select.
    ``run_sft`` imports the function inside its body, so rebinding the module attribute is enough.
    """
    original = getattr(distributed, "initialize_global_process_group", None)
    if getattr(original, "_ragr1_cpu", False):
        return
    _expect(original is not None and _parameters(original) == ["timeout_second"]
            and "get_nccl_backend()" in _source(original),
            "verl.utils.distributed.initialize_global_process_group(timeout_second) no longer builds its backend "
            "from get_nccl_backend()")
    default_timeout = inspect.signature(original).parameters["timeout_second"].default

    @functools.wraps(original)
    def initialize_on_cpu(timeout_second=default_timeout):
        import os
        from datetime import timedelta

        import torch.distributed

        if "RANK" not in os.environ:  # `python -m verl.trainer.sft_trainer` without torchrun: one local rank
            _single_process_environment(os.environ)
        torch.distributed.init_process_group(backend=CPU_BACKEND, timeout=timedelta(seconds=timeout_second),
                                             init_method=os.environ.get("DIST_INIT_METHOD", None))
        return int(os.environ["LOCAL_RANK"]), int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])

    initialize_on_cpu._ragr1_cpu = True
    initialize_on_cpu._ragr1_original = original
    distributed.initialize_global_process_group = initialize_on_cpu


def _single_process_environment(environ) -> None:
    """What torchrun would export for one process on this host (verl reads the ranks from the environment)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        environ.setdefault(key, value)


def rebind_process_group_init(engine_workers: ModuleType) -> None:
    """engine_workers imported the function by name; give it the patched one if it got the original."""
    distributed = verl_compat.verl_module(verl_compat.DISTRIBUTED_MODULE)
    bound = getattr(engine_workers, "initialize_global_process_group_ray", None)
    patched = distributed.initialize_global_process_group_ray
    _expect(bound is not None, "verl.workers.engine_workers no longer imports initialize_global_process_group_ray")
    if bound is getattr(patched, "_ragr1_original", None):
        engine_workers.initialize_global_process_group_ray = patched


# -- FSDP engines ----------------------------------------------------------------------------------------

def register_fsdp_engines(transformer_impl: ModuleType) -> None:
    registry = verl_compat.EngineRegistry
    engines = {"language_model": "FSDPEngineWithLMHead", "value_model": "FSDPEngineWithValueHead"}
    for model_type, class_name in engines.items():
        engine = getattr(transformer_impl, class_name, None)
        _expect(engine is not None, f"verl.workers.engine.fsdp.transformer_impl.{class_name} was not found")
        registered = getattr(registry, verl_compat.ENGINE_REGISTRY_ENGINES).get(model_type, {})
        backends = [backend for backend in ("fsdp", "fsdp2") if "cpu" not in registered.get(backend, {})]
        if backends:
            registry.register(model_type=model_type, backend=backends, device="cpu")(engine)


def unpin_forward_only_offload(transformer_impl: ModuleType) -> None:
    fsdp_utils = verl_compat.verl_module(verl_compat.FSDP_UTILS_MODULE)
    policy = getattr(transformer_impl, "CPUOffloadPolicy", None)
    if getattr(policy, "_ragr1_cpu", False):
        return
    _expect(policy is not None and policy is fsdp_utils.CPUOffloadPolicy and inspect.isclass(policy),
            "verl.workers.engine.fsdp.transformer_impl.CPUOffloadPolicy is not torch's FSDP2 CPUOffloadPolicy")

    def unpinned_offload_policy(pin_memory: bool = True):
        return policy(pin_memory=False)  # pinning host memory needs an accelerator; on CPU it buys nothing

    unpinned_offload_policy._ragr1_cpu = True
    transformer_impl.CPUOffloadPolicy = unpinned_offload_policy


# -- critic value model ----------------------------------------------------------------------------------

def load_value_model_with_sdpa(model_module: ModuleType) -> None:
    original = getattr(model_module, "load_valuehead_model", None)
    if getattr(original, "_ragr1_cpu", False):
        return
    expected = ["local_path", "torch_dtype", "model_config", "trust_remote_code"]
    _expect(original is not None and _parameters(original) == expected,
            "verl.utils.model.load_valuehead_model(local_path, torch_dtype, model_config, trust_remote_code) "
            "was not found")

    def load_valuehead_model(local_path, torch_dtype, model_config, trust_remote_code):
        """verl's loader asks for FlashAttention 2, which CPUs lack: a token-classification head with SDPA."""
        from transformers import AutoModelForTokenClassification

        return AutoModelForTokenClassification.from_pretrained(
            local_path, dtype=torch_dtype, config=model_config, attn_implementation="sdpa",
            trust_remote_code=trust_remote_code)

    load_valuehead_model._ragr1_cpu = True
    model_module.load_valuehead_model = load_valuehead_model


# -- rollout ---------------------------------------------------------------------------------------------

def register_rollout_adapter(rollout_base: ModuleType) -> None:
    registry = getattr(rollout_base, verl_compat.ROLLOUT_REGISTRY, None)
    _expect(isinstance(registry, dict) and ("vllm", "async") in registry
            and callable(getattr(rollout_base, "get_rollout_class", None)),
            "verl.workers.rollout.base._ROLLOUT_REGISTRY is no longer a {(name, mode): class path} dict")
    registry.setdefault((ROLLOUT_NAME, "async"), ADAPTER_PATH)


def _load_replica():
    from ragr1_verl.cpu.rollout import CPUReplica

    return CPUReplica


def register_rollout_replica(replica_module: ModuleType) -> None:
    registry = getattr(replica_module, "RolloutReplicaRegistry", None)
    _expect(registry is not None and hasattr(registry, "register"),
            "verl.workers.rollout.replica.RolloutReplicaRegistry was not found")
    registry.register(ROLLOUT_NAME, _load_replica)
