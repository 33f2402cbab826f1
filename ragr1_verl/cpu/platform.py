"""``PlatformCPU``: verl's platform abstraction answered for the ``cpu`` device.

With no accelerator, verl's platform detection falls back to CUDA and every worker then asks for ``cuda`` and
NCCL. This platform names the device ``cpu`` and the collective backend ``gloo``, and keeps the Ray resource
name ``GPU``: the recipe declares logical GPUs to Ray (``ray_init.num_gpus``) so verl's placement groups, which
count GPUs, can be built; CPU torch ignores the ``CUDA_VISIBLE_DEVICES`` Ray then sets.
"""

from __future__ import annotations

import contextlib
import logging
import os
from types import ModuleType
from typing import Any

import torch

from ragr1_verl import verl_compat
from ragr1_verl.verl_compat import PlatformBase  # loaded before plugins: importing it here is free

logger = logging.getLogger(__name__)

PLATFORM_NAME = "ragr1_cpu"


def _memory_info() -> tuple[int, int]:
    """(free, total) bytes of host memory: verl logs it where it would log GPU memory."""
    try:
        import psutil

        memory = psutil.virtual_memory()
        return int(memory.available), int(memory.total)
    except ImportError:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        return pages * page_size, pages * page_size


class CPUDeviceModule:
    """Stands in for ``torch.cuda`` where verl calls ``get_torch_device().<name>``.

    What ``torch.cpu`` has (streams, synchronize, device_count) is passed through; allocator and memory calls
    have no CPU meaning and answer as no-ops or with host memory figures; RNG state is torch's global one.
    """

    __name__ = "ragr1_verl.cpu.device"

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cpu, name)

    @staticmethod
    def is_available() -> bool:
        return True

    @staticmethod
    def device_count() -> int:
        return 1

    @staticmethod
    def current_device() -> str:
        return "cpu"

    @staticmethod
    def set_device(device: Any) -> None:
        return None

    @staticmethod
    def get_device_name(device: Any = None) -> str:
        return "cpu"

    @staticmethod
    def empty_cache() -> None:
        return None

    @staticmethod
    def ipc_collect() -> None:
        return None

    @staticmethod
    def set_per_process_memory_fraction(fraction: float, device: Any = None) -> None:
        return None

    @staticmethod
    def mem_get_info(device: Any = None) -> tuple[int, int]:
        return _memory_info()

    @staticmethod
    def memory_allocated(device: Any = None) -> int:
        return 0

    memory_reserved = max_memory_allocated = max_memory_reserved = memory_allocated

    @staticmethod
    def reset_peak_memory_stats(device: Any = None) -> None:
        return None

    @staticmethod
    def get_rng_state(device: Any = None) -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state: torch.Tensor, device: Any = None) -> None:
        torch.set_rng_state(state)

    @staticmethod
    def manual_seed(seed: int) -> None:
        torch.manual_seed(seed)

    manual_seed_all = manual_seed


class PlatformCPU(PlatformBase):
    """verl platform for the ``cpu`` device (gloo collectives, logical Ray GPUs)."""

    device_name = "cpu"
    vendor_name = "cpu"

    def __init__(self):
        self._device_module = CPUDeviceModule()

    @property
    def device_module(self) -> ModuleType:
        return self._device_module  # type: ignore[return-value]

    def is_available(self) -> bool:
        return True

    def current_device(self) -> str:  # verl passes it to .to(...): "cpu" works there, an index would not
        return "cpu"

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index: int) -> None:
        return None

    def synchronize(self, device_index: int | None = None) -> None:
        return None

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        return None

    def empty_cache(self) -> None:
        return None

    def get_device_capability(self, device_index: int = 0) -> tuple[int | None, int | None]:
        return None, None

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        return "CUDA_VISIBLE_DEVICES"  # what Ray sets for the logical GPUs; harmless on CPU

    @contextlib.contextmanager
    def nvtx_range(self, msg: str):
        yield

    def profiler_start(self) -> None:
        return None

    def profiler_stop(self) -> None:
        return None

    def ray_resource_name(self) -> str:
        return "GPU"

    def ray_noset_envvars(self) -> list[str]:
        return []

    def is_ipc_supported(self) -> bool:
        return False

    def cudart(self) -> Any:
        return None


def install_platform() -> PlatformBase:
    """Register the CPU platform (``VERL_PLATFORM=ragr1_cpu`` also picks it) and make it the current one."""
    registry, manager = verl_compat.PlatformRegistry, verl_compat.platform_manager
    platform_class = registry.get(PLATFORM_NAME) or registry.register(PLATFORM_NAME)(PlatformCPU)
    # read without triggering detection (it would pick CUDA)
    current = getattr(manager, verl_compat.CURRENT_PLATFORM)
    if not isinstance(current, platform_class):
        verl_compat.set_platform(platform_class())
    return manager.get_platform()
