"""End to end: stock verl main_ppo on CPU with the hf rollout (the foundation smoke recipe)."""

import os

import pytest

from conrec_verl.model_builder import save_tiny_model
from conrec_verl.smoke import compute_score, write_smoke_dataset
from tests.verl_run import run_main_ppo, run_smoke_cli, step_metrics

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("smoke")
    data = write_smoke_dataset(root / "data", sid_sizes=(16, 16, 16))
    save_tiny_model(root / "model", (16, 16, 16))
    return root, data


def test_smoke_reward_is_a_dense_format_score():
    assert compute_score("conrec", "<a_1><b_2><c_3>", "{}") == 1.0
    assert compute_score("conrec", "x <a_1> y", "{}") == pytest.approx(1 / 3)
    assert compute_score("conrec", "nothing", "{}") == 0.0
    assert compute_score("conrec", None, "{}") == 0.0


def test_two_grpo_steps_validate_save_then_resume(smoke_dir, tmp_path):
    root, _ = smoke_dir
    ckpt = tmp_path / "ckpt"  # fresh folder: resume_mode defaults to auto
    common = [f"smoke_dir={root}", f"trainer.default_local_dir={ckpt}", "trainer.save_freq=1"]
    # the first run through the README's install check, `python -m conrec_verl.smoke --train`
    rc, out = run_smoke_cli(root, common[1:] + ["trainer.val_before_train=true"], log_path=tmp_path / "run1.log")
    assert rc == 0, out[-4000:]
    assert sorted(p.name for p in (root.parent / "cwd").iterdir()) == []  # hydra's outputs went under --out
    # a Ray of its own (conrec_verl.runtime.own_ray), accepted by main_ppo
    launched = next(line for line in out.splitlines() if line.startswith("+ "))
    assert ("++ray_kwargs.ray_init.address=local" in launched) != bool(os.environ.get("RAY_ADDRESS"))
    steps = step_metrics(out)
    assert {1, 2} <= set(steps), f"steps seen: {sorted(steps)}"
    # validation ran before training with greedy decoding (val_kwargs)
    assert any(k.startswith("val-") for k in steps.get(0, {})), "no validation metrics at step 0"
    for s in (1, 2):
        m = steps[s]
        # the trainer's weights reached the rollout: its log-probs match the actor's
        assert m["training/rollout_probs_diff_valid"] == 1.0
        assert m["training/rollout_probs_diff_max"] < 1e-2
    assert any(steps[s]["actor/grad_norm"] > 0 for s in (1, 2)), "no policy gradient"
    assert (ckpt / "global_step_2").is_dir() and (ckpt / "global_step_1").is_dir()

    # resume: same folder, one more step -> starts from step 2's checkpoint and trains step 3 only
    rc, out = run_main_ppo("smoke_cpu", common + ["trainer.total_training_steps=3"], log_path=tmp_path / "run2.log")
    assert rc == 0, out[-4000:]
    assert "global_step_2" in out and "Resuming" in out
    steps = step_metrics(out)
    assert 3 in steps and 1 not in steps and 2 not in steps, f"steps seen: {sorted(steps)}"
    assert steps[3]["training/rollout_probs_diff_max"] < 1e-2  # restored weights reached the rollout
    assert (ckpt / "global_step_3").is_dir()


def test_vllm_rollout_on_cpu_fails_fast_with_advice(smoke_dir, tmp_path):
    root, _ = smoke_dir
    rc, out = run_main_ppo("smoke_cpu", [f"smoke_dir={root}", f"trainer.default_local_dir={tmp_path}",
                                         "actor_rollout_ref.rollout.name=vllm"], timeout=120)
    assert rc != 0
    assert "rollout.name=vllm needs a GPU" in out and "rollout.name=hf" in out
    assert "Started a local Ray instance" not in out  # refused before Ray started


def test_conrec_reward_swaps_into_a_plain_grpo_config(smoke_dir, tmp_path):
    """README "swap the reward in": verl's plain GRPO recipe + only reward overrides."""
    root, data = smoke_dir
    rc, out = run_main_ppo("smoke_cpu", [
        f"smoke_dir={root}", f"trainer.default_local_dir={tmp_path}", "trainer.total_training_steps=1",
        "trainer.val_before_train=true",
        "reward.custom_reward_function.path=null",            # drop the smoke reward ...
        "reward.reward_manager.name=conrec",                  # ... and use the conrec manager
        f"+reward.reward_kwargs.codebook_path={data}/codebook.npz",
    ], log_path=tmp_path / "swap.log")
    assert rc == 0, out[-4000:]
    steps = step_metrics(out)
    val = steps.get(0, {})
    # the conrec manager's extra info reaches verl's validation metrics
    assert any("valid_sid" in k for k in val), sorted(val)[:20]
    assert any("sim_gts" in k for k in val)
    assert 1 in steps and "critic/score/mean" in steps[1]
