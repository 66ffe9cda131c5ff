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


# -- the CoNRec reward swapped in: options, codebook and data rows checked before Ray starts -----

def _rows_parquet(path, ground_truths, data_source="conrec"):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"data_source": data_source, "prompt": [{"role": "user", "content": "q"}],
             "reward_model": {"style": "rule", "ground_truth": gt}} for gt in ground_truths]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


@pytest.fixture
def smoke_data(tmp_path):
    from conrec_verl.smoke import write_smoke_dataset

    return write_smoke_dataset(tmp_path / "data", n_train=8, n_val=2)


@pytest.mark.parametrize("swap", ["manager", "function"])
def test_reward_swap_checks_rows_options_and_function_name(cpu_env, tmp_path, smoke_data, swap):
    import json

    from conrec_verl.runtime.preflight import check_reward_data

    book = str(smoke_data / "codebook.npz")
    good = json.loads(__import__("pyarrow.parquet", fromlist=["x"]).read_table(
        smoke_data / "rl" / "train.parquet").column("reward_model").to_pylist()[0]["ground_truth"])

    def cfg(train, **kwargs):
        kwargs = {"codebook_path": book, **kwargs}
        if swap == "manager":
            return _cfg(**{"reward.reward_manager.name": "conrec", "reward.reward_kwargs": kwargs,
                           "data.train_files": train})
        return _cfg(**{"reward.custom_reward_function.path": "pkg://conrec_verl.plugins.compute_score",
                       "reward.custom_reward_function.name": "compute_score",
                       "reward.custom_reward_function.reward_kwargs": kwargs, "data.train_files": [train]})

    where = "reward.reward_kwargs" if swap == "manager" else "reward.custom_reward_function.reward_kwargs"
    check_reward_data(cfg(str(smoke_data / "rl" / "train.parquet")))
    gsm8k = _rows_parquet(tmp_path / "gsm8k.parquet", [json.dumps(good), "72"])
    with pytest.raises(ConfigError, match=rf"gsm8k.parquet: row 1: column 'reward_model.ground_truth'.*\({where}\)"):
        check_reward_data(cfg(gsm8k))
    for no_target in ("{}", '{"answer": "72"}'):
        bad = _rows_parquet(tmp_path / "empty.parquet", [json.dumps(good), json.dumps(good), no_target])
        with pytest.raises(ConfigError, match="empty.parquet: row 2: .*no usable target SID"):
            check_reward_data(cfg(bad))
    assert check_reward_data(cfg(bad), max_rows=2) is None  # only the first rows are read
    assert check_reward_data(cfg(bad, empty_targets="zero")) is None  # the user allowed such rows
    # rows of another task (data_source) go to verl's own scorer: not checked
    check_reward_data(cfg(_rows_parquet(tmp_path / "mixed.parquet", ["72"], data_source="openai/gsm8k")))
    with pytest.raises(ConfigError, match="mixed.parquet: row 0"):
        check_reward_data(cfg(str(tmp_path / "mixed.parquet"), data_sources=["openai/gsm8k", "conrec"]))
    import pyarrow.parquet as pq

    no_source = tmp_path / "no_source.parquet"
    pq.write_table(pq.read_table(gsm8k).drop(["data_source"]), no_source)
    with pytest.raises(ConfigError, match=r"no data_source column, so every row counts as 'conrec'.*\['mydata'\]"):
        check_reward_data(cfg(str(no_source), data_sources=["mydata"]))
    with pytest.raises(ConfigError, match=rf"\({where}\): unknown reward option\(s\) \['gama'\]"):
        check_reward_data(cfg(gsm8k, gama=0.5))
    with pytest.raises(ConfigError, match="codebook"):
        check_reward_data(cfg(gsm8k, codebook_path=str(tmp_path / "none.npz")))
    if swap == "function":
        c = cfg(gsm8k)
        OmegaConf.update(c, "reward.custom_reward_function.name", "score")
        with pytest.raises(ConfigError, match="name='score'.*set reward.custom_reward_function.name=compute_score"):
            check_reward_data(c)


def test_other_rewards_read_no_rows(cpu_env, tmp_path):
    from conrec_verl.runtime.preflight import check_reward_data

    gsm8k = _rows_parquet(tmp_path / "gsm8k.parquet", ["72"])
    check_reward_data(_cfg(**{"data.train_files": gsm8k}))  # verl's own reward: nothing to check
    check_reward_data(_cfg(**{"data.train_files": gsm8k, "reward.custom_reward_function.path": "pkg://my.module",
                              "reward.custom_reward_function.name": "compute_score"}))


@pytest.mark.slow
def test_preflight_fails_a_real_main_ppo_start_before_ray(tmp_path, smoke_data, tiny_model_dir):
    """Through stock main_ppo: gsm8k-style rows with the CoNRec reward, and a CPU run without the
    CPU platform variables (which verl's auto_set_device would otherwise rewrite to cuda), each end
    in seconds with our one message, before Ray starts."""
    import os
    import subprocess
    import sys

    from tests.verl_run import CONFIG_DIR, REPO

    gsm8k = _rows_parquet(tmp_path / "gsm8k.parquet", ['{"answer": "72"}'])
    base = [sys.executable, "-m", "verl.trainer.main_ppo", "--config-path", str(CONFIG_DIR), "--config-name",
            "smoke_cpu", f"smoke_dir={tmp_path}", f"actor_rollout_ref.model.path={tiny_model_dir}",
            f"data.train_files={gsm8k}", f"data.val_files={gsm8k}"]
    swap = ["reward.custom_reward_function.path=pkg://conrec_verl.plugins.compute_score",
            f"+reward.custom_reward_function.reward_kwargs.codebook_path={smoke_data / 'codebook.npz'}"]
    from conrec_verl.runtime.cpu_platform import cpu_env as env_vars

    env = {**os.environ, **env_vars()}
    proc = subprocess.run([*base, *swap], capture_output=True, text=True, env=env, timeout=300, cwd=str(REPO))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "gsm8k.parquet: row 0: column 'reward_model.ground_truth': ground truth has no usable target SID" in out
    assert "ray.init" not in out and "Started a local Ray instance" not in out and "TaskRunner" not in out
    bare = {k: v for k, v in env.items() if k not in ("VERL_PLATFORM", "VERL_ENGINE_DEVICE")}
    proc = subprocess.run(base, capture_output=True, text=True, env=bare, timeout=300, cwd=str(REPO))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "trainer.device=cpu needs the CPU platform: export VERL_PLATFORM=cpu" in out
    assert "Started a local Ray instance" not in out and "TaskRunner" not in out
