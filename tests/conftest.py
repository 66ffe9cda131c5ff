"""Shared fixtures: everything is built at test time (no hub downloads)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_SID_SIZES = (16, 16, 16)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Qwen3 + tokenizer with SID tokens for ``TINY_SID_SIZES``."""
    from conrec_verl.model_builder import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny", TINY_SID_SIZES)
