"""The recipes shipped inside the package (``recipes/`` in a checkout, ``conrec_verl.recipes`` once
installed, also from a wheel): verl configs and pipeline profiles, found with ``importlib.resources``.

verl's entry points reach the configs through hydra's package search path::

    python -m verl.trainer.main_ppo --config-path pkg://conrec_verl.recipes.conrec.config \\
        --config-name conrec_cpu_tiny ...

and a config of one's own includes ``cpu_runtime`` (or any recipe config) with::

    hydra:
      searchpath: [pkg://verl.trainer.config, pkg://conrec_verl.recipes.conrec.config]
    defaults: [ppo_trainer, cpu_runtime, _self_]

``python -m conrec_verl.recipes`` prints the folders (``config``, ``pipeline``, ``scripts``).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

#: hydra's search-path form of the verl configs (``--config-path``, ``hydra.searchpath``)
CONFIG_PKG = "pkg://conrec_verl.recipes.conrec.config"


def recipe_dir() -> Path:
    """The ``conrec`` recipe folder as a real path (configs, pipeline profiles, run scripts)."""
    root = resources.files(__name__).joinpath("conrec")
    path = Path(str(root))
    if not (path / "config").is_dir():  # a zipped install: hydra and the scripts need real files
        raise RuntimeError(f"the conrec recipes are not a folder on disk ({root}); install conrec-verl unzipped")
    return path


def config_dir() -> Path:
    """The verl configs (``conrec_cpu_tiny``, ``sft_cpu_tiny``, ``cpu_runtime``, ...)."""
    return recipe_dir() / "config"


def profile_dir() -> Path:
    """The pipeline profiles (``cpu_tiny``, ``ci_tiny``, ``cpu_small``, ``gpu_qwen3``)."""
    return recipe_dir() / "pipeline"
