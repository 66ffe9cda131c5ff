"""Stock ``python -m verl.trainer.main_ppo`` on CPU with all three plugins, across a stage boundary,
then a resume from a checkpoint in the middle of the second stage (slow: two real runs, ~3-4 min).

Uses the foundation's CPU runtime recipe (``recipes/conrec/config/smoke_cpu.yaml``) and smoke data
(``conrec_verl.smoke``) and swaps in the conrec plugins with overrides.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from conrec_verl.recipes import CONFIG_PKG  # the shipped recipes, as hydra finds them from a wheel install

pytestmark = pytest.mark.slow

PLUGIN_OVERRIDES = [
    "algorithm.adv_estimator=progressive_grpo",
    "+algorithm.progressive_grpo.kl_ref=${actor_rollout_ref.actor.kl_loss_coef}",
    "+algorithm.progressive_grpo.stages=[{context:1,steps:2,beta:0.001},{context:2,steps:2,beta:0.0005}]",
    "data.custom_cls.path=pkg://conrec_verl.plugins.dataset",
    "data.custom_cls.name=ConrecSidDataset",
    "+data.conrec.schedule=${algorithm.progressive_grpo}",
    "reward.custom_reward_function.path=null",
    "reward.reward_manager.name=conrec",
    "trainer.total_training_steps=null",
    "trainer.v1.trainer_mode=conrec_sync",
    "trainer.save_freq=3",
]


def main_ppo(smoke, *overrides, timeout=420):
    env = dict(os.environ, VERL_PLATFORM="cpu", VERL_ENGINE_DEVICE="cuda", TORCH_COMPILE_DISABLE="1",
               WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "verl.trainer.main_ppo", "--config-path", CONFIG_PKG,
           "--config-name", "smoke_cpu", f"smoke_dir={smoke}",
           f"+reward.reward_kwargs.codebook_path={smoke}/data/codebook.npz", *PLUGIN_OVERRIDES, *overrides]
    proc = subprocess.run(cmd, cwd=str(smoke), env=env, capture_output=True, text=True, timeout=timeout)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    return log


def step_metrics(log: str) -> dict[int, dict[str, str]]:
    out = {}
    for line in log.splitlines():
        m = re.search(r"step:(\d+) - (.*)$", line)
        if m and "training/global_step" in line:
            out[int(m.group(1))] = dict(kv.split(":", 1) for kv in m.group(2).split(" - ") if ":" in kv)
    return out


def kl_coef(metrics: dict[str, str]) -> float:
    keys = [k for k in metrics if k.endswith("kl_coef")]
    assert keys, sorted(metrics)
    return float(metrics[keys[0]])


def prompts_of(path: str) -> list[str]:
    with open(path) as fh:
        return sorted(json.loads(line)["input"] for line in fh)


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    """One uninterrupted 4-step run (stages: steps 1-2 context 1, steps 3-4 context 2)."""
    tmp_path = tmp_path_factory.mktemp("main_ppo_plugins")
    smoke = tmp_path / "smoke"
    subprocess.run([sys.executable, "-m", "conrec_verl.smoke", "--out", str(smoke)], cwd=tmp_path, check=True,
                   capture_output=True)
    log = main_ppo(smoke, f"trainer.default_local_dir={tmp_path}/ck_a", f"trainer.rollout_data_dir={tmp_path}/roll_a")
    return tmp_path, smoke, log


def test_main_ppo_trains_across_a_stage_boundary(run_a):
    _, _, log = run_a
    steps = step_metrics(log)
    assert sorted(steps) == [1, 2, 3, 4]
    assert [float(steps[s]["training/conrec_stage"]) for s in (1, 2, 3, 4)] == [1.0, 1.0, 2.0, 2.0]
    assert [float(steps[s]["reward_extra/context/mean"]) for s in (1, 2, 3, 4)] == [1.0, 1.0, 2.0, 2.0]
    for key in ("valid_sid", "exact_hit", "prefix_depth", "sim_gts", "sim_fps"):
        assert f"reward_extra/{key}/mean" in steps[1]
    assert "[conrec] progressive_grpo step 3: stage 2/2" in log
    # stage 2 renders the full negative history: longer prompts than stage 1
    assert float(steps[3]["prompt_length/mean"]) > float(steps[2]["prompt_length/mean"])
    # the stage's beta is the KL weight verl's actor loss used (its own kl_coef metric), set once per stage
    assert [kl_coef(steps[s]) for s in (1, 2, 3, 4)] == [0.001, 0.001, 0.0005, 0.0005]
    assert log.count("actor KL loss weight set to") == 2


def test_main_ppo_resumes_in_the_middle_of_a_stage(run_a):
    """Resume from the step-3 checkpoint (middle of stage 2) into a fresh directory: only step 4
    runs, in stage 2, on exactly the prompts the uninterrupted run trained on at step 4."""
    tmp_path, smoke, _ = run_a
    log_b = main_ppo(smoke, f"trainer.default_local_dir={tmp_path}/ck_b", f"trainer.rollout_data_dir={tmp_path}/roll_b",
                     "trainer.resume_mode=resume_path", f"trainer.resume_from_path={tmp_path}/ck_a/global_step_3")
    steps_b = step_metrics(log_b)
    assert sorted(steps_b) == [4]
    assert float(steps_b[4]["training/conrec_stage"]) == 2.0
    assert kl_coef(steps_b[4]) == 0.0005  # the resumed run sets stage 2's beta before its first update
    assert prompts_of(f"{tmp_path}/roll_b/4.jsonl") == prompts_of(f"{tmp_path}/roll_a/4.jsonl")
    assert prompts_of(f"{tmp_path}/roll_a/4.jsonl") != prompts_of(f"{tmp_path}/roll_a/3.jsonl")
