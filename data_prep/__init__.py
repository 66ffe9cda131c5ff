"""data_prep: raw interaction logs -> semantic IDs, Swing neighbours and verl-ready parquet.

CLI: ``python -m conrec_verl.data_prep [--config-name kuairand|movielens|generic] out_dir=<folder> [key=value ...]``
API (``from conrec_verl import data_prep``): ``data_prep.build(cfg) -> pathlib.Path``;
``data_prep.load_config(name, overrides)`` composes
the same hydra config the CLI uses.
"""

from __future__ import annotations

from pathlib import Path

from conrec_verl.data_prep.errors import DataPrepError

CONFIG_DIR = Path(__file__).resolve().parent / "config"

__all__ = ["build", "load_config", "DataPrepError", "CONFIG_DIR"]


def build(cfg, step_hook=None) -> Path:
    """Build the data folder for ``cfg``; see :func:`conrec_verl.data_prep.pipeline.build`."""
    from conrec_verl.data_prep.pipeline import build as _build

    return _build(cfg, step_hook=step_hook)


def load_config(name: str = "kuairand", overrides: list[str] | None = None):
    """Compose ``data_prep/config/<name>.yaml`` with command-line style ``overrides``."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose(config_name=name, overrides=list(overrides or []))
