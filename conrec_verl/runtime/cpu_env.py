"""The environment a CPU run of verl needs, importable without torch or verl.

:mod:`conrec_verl.runtime.cpu_platform` re-exports :func:`cpu_env`; this module exists so that
launchers (``conrec_verl.pipeline``) can build the environment of their subprocesses without
importing torch and verl themselves (~0.45 GB that the launcher would hold for the whole run).
"""

from __future__ import annotations

import os

PLATFORM_NAME = "cpu"


def cpu_env() -> dict[str, str]:
    """Environment variables a CPU run of verl needs (set them before ``import verl``)."""
    return {
        "VERL_PLATFORM": PLATFORM_NAME,
        "VERL_ENGINE_DEVICE": "cuda",
        "TORCH_COMPILE_DISABLE": "1",
        "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled"),
        "TOKENIZERS_PARALLELISM": "false",
    }
