"""A CPU platform for verl 0.9.1 (``VERL_PLATFORM=cpu``).

verl ships platforms for NVIDIA, Ascend and ROCm only. This one lets the stock trainers
(``main_ppo``, ``sft_trainer``) run on a laptop or CI machine: device ``cpu``, collectives over
``gloo``. It is an opt-in debugging / CI runtime; on GPUs keep verl's own platforms.

Besides ``VERL_PLATFORM=cpu`` a CPU run needs ``VERL_ENGINE_DEVICE=cuda`` (verl's FSDP engine
is registered for cuda/npu only; the override only picks the engine class, tensors stay on the
CPU) -- :func:`cpu_env` returns the full set of variables, and the recipes set them.
(:func:`cpu_env` lives in the torch-free :mod:`conrec_verl.runtime.cpu_env`; launchers import it
from there.)
"""

from __future__ import annotations

import os
import types
from contextlib import contextmanager
from typing import Any, Optional

import torch

from verl.plugin.platform import PlatformBase, PlatformRegistry

from conrec_verl.runtime import verl_compat
from conrec_verl.runtime.cpu_env import PLATFORM_NAME, cpu_env  # noqa: F401 - re-exported
from conrec_verl.runtime.verl_compat import normalise_backend  # noqa: F401 - re-exported


def _make_device_module() -> types.ModuleType:
    """``torch.cpu`` plus the few ``torch.cuda``-style functions verl calls on a device module."""
    module = types.ModuleType("conrec_verl_cpu_device")
    for name in dir(torch.cpu):
        if not name.startswith("__"):
            setattr(module, name, getattr(torch.cpu, name))

    def _zero(*_args, **_kwargs):
        return 0

    def _noop(*_args, **_kwargs):
        return None

    module.is_available = lambda: True
    module.device_count = lambda: 1
    module.current_device = lambda: torch.device("cpu")
    module.set_device = _noop
    module.synchronize = _noop
    module.empty_cache = _noop
    module.manual_seed = torch.manual_seed
    module.manual_seed_all = torch.manual_seed
    module.get_device_name = lambda *_a, **_k: "cpu"
    module.get_device_capability = lambda *_a, **_k: (None, None)
    module.memory_allocated = _zero
    module.memory_reserved = _zero
    module.max_memory_allocated = _zero
    module.max_memory_reserved = _zero
    module.reset_peak_memory_stats = _noop
    module.mem_get_info = lambda *_a, **_k: (0, 0)
    module.get_rng_state = torch.get_rng_state
    module.set_rng_state = torch.set_rng_state
    module.is_initialized = lambda: True
    return module


_DEVICE_MODULE = _make_device_module()


@PlatformRegistry.register(platform=PLATFORM_NAME)
class PlatformCPU(PlatformBase):
    """verl platform backed by the host CPU (gloo collectives, no accelerator)."""

    @property
    def device_name(self) -> str:
        return "cpu"

    @property
    def vendor_name(self) -> str:
        return "cpu"

    @property
    def device_module(self) -> types.ModuleType:
        return _DEVICE_MODULE

    def is_available(self) -> bool:
        return True

    def is_platform_available(self, use_smi_check: bool = False) -> bool:
        # Never auto-detected: a CPU run is always asked for explicitly with VERL_PLATFORM=cpu.
        return False

    def current_device(self):  # verl builds tensors with device=current_device()
        return torch.device("cpu")

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index: int) -> None:
        return None

    def synchronize(self, device_index: Optional[int] = None) -> None:
        return None

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        return None

    def empty_cache(self) -> None:
        return None

    def get_device_capability(self, device_index: int = 0) -> tuple[Optional[int], Optional[int]]:
        return None, None

    def communication_backend_name(self) -> str:
        # verl's distributed helpers build "cpu:gloo,{device}:{backend}" = "cpu:gloo,cpu:gloo",
        # which torch rejects (duplicate device type); verl_compat.install_backend_normaliser collapses it.
        return "gloo"

    def visible_devices_envvar(self) -> str:
        return "CONREC_VISIBLE_CPUS"

    @contextmanager
    def nvtx_range(self, msg: str):
        yield

    def profiler_start(self) -> None:
        return None

    def profiler_stop(self) -> None:
        return None

    def ray_resource_name(self) -> str:
        # Resource pools always ask for accelerator bundles; CPU runs declare logical GPUs with
        # ray_kwargs.ray_init.num_gpus (see recipes), so the bundles are satisfiable.
        return "GPU"

    def ray_resource_options(self, num_gpus: float) -> dict[str, Any]:
        return {"num_gpus": num_gpus}

    def ray_noset_envvars(self) -> list[str]:
        return ["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"]

    def is_ipc_supported(self) -> bool:
        return False

    def cudart(self) -> Any:
        return None


def install_cpu_patches() -> None:
    """The process-local adjustments a CPU run needs (idempotent). The last one is for security,
    not for the CPU: verl's FSDP workers host their process group's TCPStore on Ray's node IP,
    127.0.0.1 in a single-node run (``cpu_env()``), and torch would listen on every interface."""
    from conrec_verl.runtime.loopback import install_loopback_tcpstore

    verl_compat.install_backend_normaliser()
    verl_compat.install_unpinned_cpu_offload()
    install_loopback_tcpstore()


if os.environ.get("VERL_PLATFORM", "").strip().lower() == PLATFORM_NAME:
    install_cpu_patches()
