"""The environment a CPU run of verl needs, importable without torch or verl.

:mod:`conrec_verl.runtime.cpu_platform` re-exports :func:`cpu_env`; this module exists so that
launchers (``conrec_verl.pipeline``) can build the environment of their subprocesses without
importing torch and verl themselves (~0.45 GB that the launcher would hold for the whole run).

It is the one list of the variables a CPU run needs: ``python -m conrec_verl.runtime.cpu_env``
prints them as ``export`` lines (``eval "$(python -m conrec_verl.runtime.cpu_env)"`` in a shell;
the recipes' scripts do this).
"""

from __future__ import annotations

import os
import sys

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

    ``ONEDNN_PRIMITIVE_CACHE_CAPACITY``/``LRU_CACHE_CAPACITY`` bound oneDNN's per-shape caches (see
    :data:`ONEDNN_CACHE_CAPACITY`); a value already in the environment wins. A CPU run is a
    single-node run, so it also gets :func:`loopback_env`.
    """
    return {
        **loopback_env(),
        "VERL_PLATFORM": PLATFORM_NAME,
        "VERL_ENGINE_DEVICE": "cuda",
        "TORCH_COMPILE_DISABLE": "1",
        "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled"),
        "TOKENIZERS_PARALLELISM": "false",
        "ONEDNN_PRIMITIVE_CACHE_CAPACITY": os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY",
                                                          str(ONEDNN_CACHE_CAPACITY)),
        "LRU_CACHE_CAPACITY": os.environ.get("LRU_CACHE_CAPACITY", str(ONEDNN_CACHE_CAPACITY)),
    }


def loopback_env() -> dict[str, str]:
    """Environment of a single-node run whose unauthenticated sockets listen on loopback only.

    - ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``: a local ``ray.init`` takes 127.0.0.1 as its node IP
      (as Ray does on macOS), so verl's transfer queue (ZMQ, unauthenticated, binds the node IP)
      and Ray's agents and metrics exporters listen on loopback; Ray's token authentication stays
      on. Never use it with ``ray.address``/``RAY_ADDRESS`` (a driver must be reachable from the
      cluster): then, or when the variable is already set, it is left out.
    - ``GLOO_SOCKET_IFNAME``: gloo's pair sockets listen on the loopback interface rather than
      the address the host name resolves to.

    torch's TCPStore servers need more than a variable (see :mod:`conrec_verl.runtime.loopback`);
    ``docs/security.md`` has the measured list of sockets.
    """
    env: dict[str, str] = {}
    if "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" in os.environ:
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"]
    elif not os.environ.get("RAY_ADDRESS"):
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    env["GLOO_SOCKET_IFNAME"] = os.environ.get("GLOO_SOCKET_IFNAME",
                                               "lo0" if sys.platform == "darwin" else "lo")
    return env


def torchrun_cmd(nproc_per_node: int) -> list[str]:
    """The launcher of a single-node SFT stage, in place of ``torchrun --standalone --nnodes=1
    --nproc_per_node=N``: torchrun with its rendezvous and agent stores on 127.0.0.1
    (:mod:`conrec_verl.runtime.torchrun`). Append ``-m verl.trainer.sft_trainer ...``."""
    return [sys.executable, "-m", "conrec_verl.runtime.torchrun", "--standalone", "--nnodes=1",
            "--local-addr=127.0.0.1", f"--nproc_per_node={int(nproc_per_node)}"]


def exports(env: dict[str, str] | None = None) -> str:
    """``export K=V`` lines (shell-quoted) of :func:`cpu_env`."""
    import shlex

    env = cpu_env() if env is None else env
    return "\n".join(f"export {k}={shlex.quote(v)}" for k, v in env.items())


if __name__ == "__main__":
    print(exports())
