"""Shared fixtures: everything is built at test time (no hub downloads)."""

from __future__ import annotations

import os

import pytest

from tests.sid_fixtures import SIZES, make_codebook, make_rl_rows, write_parquet

os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_SID_SIZES = (16, 16, 16)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Qwen3 + tokenizer with SID tokens for ``TINY_SID_SIZES``."""
    from conrec_verl.model_builder import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny", TINY_SID_SIZES)


class WheelInstall:
    """conrec-verl installed from its wheel, to run outside the checkout: ``python`` and ``env``
    for subprocesses. With ``CONREC_WHEEL_PYTHON`` (set by ``.ci/run``) that is the python of a
    fresh venv the wheel was installed into with its dependencies; otherwise the wheel is built here
    and installed with ``pip --target`` into a folder put first on ``PYTHONPATH`` (dependencies from
    this environment, conrec_verl only from the wheel)."""

    def __init__(self, python: str, env: dict[str, str], where: str):
        self.python, self.env, self.where = python, env, where

    def run(self, args, cwd, timeout=900, **kw):
        import subprocess

        return subprocess.run([self.python, *args], cwd=str(cwd), env=self.env, capture_output=True, text=True,
                              timeout=timeout, **kw)


@pytest.fixture(scope="session")
def wheel_install(tmp_path_factory) -> WheelInstall:
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    given = os.environ.get("CONREC_WHEEL_PYTHON")
    if given:
        return WheelInstall(given, env, f"the venv of {given}")
    tmp = tmp_path_factory.mktemp("wheel")
    # build from a copy of the files git tracks: a build/ folder left in the checkout could
    # otherwise put stale modules into the wheel
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                           capture_output=True, check=True).stdout.decode().split("\0")
    import shutil

    for rel in filter(None, files):
        if (root / rel).is_file():
            (tmp / "src" / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / rel, tmp / "src" / rel)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"),
                    str(tmp / "src")], check=True, capture_output=True, cwd=tmp)
    (wheel,) = (tmp / "dist").glob("conrec_verl-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tmp / "site"), str(wheel)],
                   check=True, capture_output=True, cwd=tmp)
    env["PYTHONPATH"] = str(tmp / "site")
    return WheelInstall(sys.executable, env, str(tmp / "site"))


# -- SID data, tokenizer and verl config (the plugin and core tests) ----------------------------

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


@pytest.fixture
def one_torch_thread():
    """The models of the evaluation tests are tiny: one thread avoids thread-pool contention on a
    busy 2-core runner (their conftests make it autouse)."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
