import pytest
from omegaconf import OmegaConf

from conrec_verl.core.sid import Codebook
from conrec_verl.runtime.preflight import ConfigError, check_config
from tests.conftest import TINY_SID_SIZES


def _cfg(**over):
    base = {"trainer": {"device": "cpu"},
            "actor_rollout_ref": {"rollout": {"name": "hf"}, "model": {"path": None}},
            "reward": {"reward_kwargs": {}}}
    cfg = OmegaConf.create(base)
    for key, value in over.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    return cfg


@pytest.fixture
def cpu_env(monkeypatch):
    monkeypatch.setenv("VERL_PLATFORM", "cpu")
    monkeypatch.setenv("VERL_ENGINE_DEVICE", "cuda")


def test_valid_cpu_config_passes(cpu_env, tiny_model_dir):
    check_config(_cfg(**{"actor_rollout_ref.model.path": str(tiny_model_dir)}))


@pytest.mark.parametrize("name", ["vllm", "sglang"])
def test_gpu_rollout_on_cpu_platform_is_refused(cpu_env, name):
    with pytest.raises(ConfigError, match="rollout.name=hf"):
        check_config(_cfg(**{"actor_rollout_ref.rollout.name": name}))


def test_unknown_rollout_name_lists_registered_ones(cpu_env):
    with pytest.raises(ConfigError, match=r"unknown actor_rollout_ref.rollout.name='foo'.*'hf'"):
        check_config(_cfg(**{"actor_rollout_ref.rollout.name": "foo"}))


def test_cpu_device_without_platform_and_platform_without_engine_override(monkeypatch):
    monkeypatch.delenv("VERL_PLATFORM", raising=False)
    with pytest.raises(ConfigError, match="VERL_PLATFORM=cpu"):
        check_config(_cfg())
    monkeypatch.setenv("VERL_PLATFORM", "cpu")
    monkeypatch.delenv("VERL_ENGINE_DEVICE", raising=False)
    with pytest.raises(ConfigError, match="VERL_ENGINE_DEVICE=cuda"):
        check_config(_cfg())


def test_missing_model_folder(cpu_env, tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        check_config(_cfg(**{"actor_rollout_ref.model.path": str(tmp_path / "nope")}))
    # relative folders too (a run folder's models/...), while "org/name" stays a hub id
    for rel in ("runs/x/models/sft_warmup", "./models", "~/no-such-model-folder"):
        with pytest.raises(ConfigError, match="does not exist"):
            check_config(_cfg(**{"actor_rollout_ref.model.path": rel}))
    check_config(_cfg(**{"actor_rollout_ref.model.path": "Qwen/Qwen3-0.6B"}))


def test_model_without_the_codebooks_sid_tokens(cpu_env, tmp_path, tiny_model_dir):
    import numpy as np

    bigger = tuple(s + 4 for s in TINY_SID_SIZES)
    Codebook([np.zeros((s, 4), np.float32) for s in bigger]).save(tmp_path / "codebook.npz")
    cfg = _cfg(**{"actor_rollout_ref.model.path": str(tiny_model_dir),
                  "reward.reward_kwargs.codebook_path": str(tmp_path / "codebook.npz")})
    with pytest.raises(ConfigError, match="lacks 12 of"):
        check_config(cfg)
    same = tuple(TINY_SID_SIZES)
    Codebook([np.zeros((s, 4), np.float32) for s in same]).save(tmp_path / "ok.npz")
    OmegaConf.update(cfg, "reward.reward_kwargs.codebook_path", str(tmp_path / "ok.npz"))
    check_config(cfg)


def test_progressive_grpo_needs_the_kl_loss_and_the_conrec_trainer():
    from omegaconf import OmegaConf

    from conrec_verl.runtime.preflight import ConfigError, check_progressive_grpo

    def cfg(kl=True, mode="conrec_sync", via=None):
        algo = {"adv_estimator": "progressive_grpo", "progressive_grpo": {} if via is None else {"beta_via": via}}
        return OmegaConf.create({"algorithm": algo, "actor_rollout_ref": {"actor": {"use_kl_loss": kl}},
                                 "trainer": {"v1": {"trainer_mode": mode}}})

    check_progressive_grpo(cfg())
    check_progressive_grpo(cfg(mode="sync", via="advantage_scale"))
    with pytest.raises(ConfigError, match="use_kl_loss is false"):
        check_progressive_grpo(cfg(kl=False))
    with pytest.raises(ConfigError, match="trainer_mode=sync: set trainer.v1.trainer_mode=conrec_sync"):
        check_progressive_grpo(cfg(mode="sync"))
    check_progressive_grpo(OmegaConf.create({"algorithm": {"adv_estimator": "grpo"}}))  # other estimators: no check
