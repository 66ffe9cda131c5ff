"""Shared fixtures of the plugin tests (real verl objects, tiny local tokenizer, small data)."""

from __future__ import annotations

import os

import pytest

from ._fixtures import SIZES, make_codebook, make_rl_rows, write_parquet


@pytest.fixture(scope="session")
def codebook():
    return make_codebook()


@pytest.fixture(scope="session")
def codebook_path(tmp_path_factory, codebook):
    path = tmp_path_factory.mktemp("data") / "codebook.npz"
    codebook.save(path)
    return str(path)


@pytest.fixture(scope="session")
def tokenizer():
    from conrec_verl.model_builder import build_tokenizer

    return build_tokenizer(SIZES)


@pytest.fixture(scope="session")
def verl_config_dir():
    import verl

    return os.path.join(os.path.dirname(verl.__file__), "trainer", "config")


@pytest.fixture(scope="session")
def compose(verl_config_dir):
    """Compose verl's real ``ppo_trainer`` config with overrides (as main_ppo does)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    def _compose(overrides):
        with initialize_config_dir(config_dir=verl_config_dir, version_base=None):
            return hydra_compose(config_name="ppo_trainer", overrides=list(overrides))

    return _compose


@pytest.fixture(scope="session")
def rl_parquet(tmp_path_factory):
    d = tmp_path_factory.mktemp("rl")
    return write_parquet(make_rl_rows(12, seed=1), str(d / "train.parquet"))
