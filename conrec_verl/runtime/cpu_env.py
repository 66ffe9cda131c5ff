"""The environment a CPU run of verl needs, importable without torch or verl.

:mod:`conrec_verl.runtime.cpu_platform` re-exports :func:`cpu_env`; this module exists so that
launchers (``conrec_verl.pipeline``) can build the environment of their subprocesses without
importing torch and verl themselves (~0.45 GB that the launcher would hold for the whole run).
"""

from __future__ import annotations

import os

PLATFORM_NAME = "cpu"


#: Entries kept in oneDNN's primitive cache and in PyTorch's ideep cache (both default to 1024).
#: verl trains in bf16 autocast (FSDP2 mixed precision); on a CPU every bf16 matmul of a new
#: shape builds a oneDNN primitive, and with packed sequences every micro-batch has a new shape,
#: so the two caches grow by megabytes per step up to their 1024 entries: measured +0.9 GB in the
#: actor/ref worker over the 24 GRPO steps of ``cpu_tiny`` and +0.5 GB in an SFT epoch. 32 entries
#: still cover the shapes repeated within a step (both layers, forward and backward); step time
#: was unchanged. (0 disables the caches and crashes torch 2.13.)
ONEDNN_CACHE_CAPACITY = 32


def cpu_env() -> dict[str, str]:
    """Environment variables a CPU run of verl needs (set them before ``import verl``).

    The last two bound oneDNN's per-shape caches (see :data:`ONEDNN_CACHE_CAPACITY`); a value
    already in the environment wins.
    """
    return {
        "VERL_PLATFORM": PLATFORM_NAME,
        "VERL_ENGINE_DEVICE": "cuda",
        "TORCH_COMPILE_DISABLE": "1",
        "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled"),
        "TOKENIZERS_PARALLELISM": "false",
        "ONEDNN_PRIMITIVE_CACHE_CAPACITY": os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY",
                                                          str(ONEDNN_CACHE_CAPACITY)),
        "LRU_CACHE_CAPACITY": os.environ.get("LRU_CACHE_CAPACITY", str(ONEDNN_CACHE_CAPACITY)),
    }
