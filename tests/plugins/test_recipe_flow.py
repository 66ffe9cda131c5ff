"""All three plugins selected from one recipe yaml, driven through main_ppo's data flow in process:
verl's dataset factory + sampler + stateful dataloader -> (fake rollout) -> the reward manager verl
loads -> verl's v1 advantage path with SkipManager's step -> the conrec_sync stage metric."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from torchdata.stateful_dataloader import StatefulDataLoader

from verl import DataProto
from verl.trainer.ppo.reward import load_reward_manager
from verl.trainer.ppo.utils import create_rl_dataset, create_rl_sampler
from verl.trainer.ppo.v1.utils import compute_advantage_for_multi_trajectories
from verl.utils.dataset.rl_dataset import collate_fn
from verl.utils.skip import SkipManager

from conrec_verl.plugins.trainer_mode import progressive_stage_metrics
from conrec_verl.core.schedule import StageSchedule
from conrec_verl.plugins.dataset import ConrecSidDataset
from conrec_verl.plugins.reward_manager import ConrecRewardManager

from tests.sid_fixtures import make_rl_rows, write_parquet
from .test_reward_manager import one_row, run

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, codebook_path):
    d = tmp_path_factory.mktemp("recipe")
    train = write_parquet(make_rl_rows(5, seed=11), str(d / "train.parquet"))
    val = write_parquet(make_rl_rows(3, seed=12), str(d / "val.parquet"))
    with initialize_config_dir(config_dir=HERE, version_base=None):
        return compose(config_name="recipe_conrec", overrides=[
            f"data.train_files={train}", f"data.val_files={val}",
            f"reward.reward_kwargs.codebook_path={codebook_path}"])


def test_recipe_selects_the_three_plugins(recipe):
    assert recipe.algorithm.adv_estimator == "progressive_grpo"
    assert recipe.reward.reward_manager.name == "conrec"
    assert recipe.data.custom_cls.name == "ConrecSidDataset"
    assert recipe.data.conrec.schedule.stages[1].beta == 0.0005  # interpolation reaches the data config
    assert recipe.algorithm.progressive_grpo.kl_ref == recipe.actor_rollout_ref.actor.kl_loss_coef


def test_training_flow_across_stage_boundaries(recipe, tokenizer):
    cfg = recipe
    schedule = StageSchedule.from_config(cfg.algorithm.progressive_grpo)
    ds = create_rl_dataset(cfg.data.train_files, cfg.data, tokenizer, None, is_train=True)
    assert isinstance(ds, ConrecSidDataset)
    loader = StatefulDataLoader(ds, batch_size=cfg.data.train_batch_size, drop_last=True, collate_fn=collate_fn,
                                sampler=create_rl_sampler(cfg.data, ds), num_workers=0)
    manager = load_reward_manager(cfg, tokenizer)
    assert isinstance(manager, ConrecRewardManager)
    n = cfg.actor_rollout_ref.rollout.n
    steps_per_epoch = len(ds) // cfg.data.train_batch_size  # what verl's trainer computes
    assert steps_per_epoch * cfg.trainer.total_epochs == schedule.total_steps
    stages_seen = []
    try:
        for step, batch in enumerate(loader, start=1):
            SkipManager.set_step(step)  # the trainer does this before each step
            stage = schedule.stage_at(step)
            rewards, uids, stages = [], [], []
            for j, (msgs, rm, extra) in enumerate(zip(batch["raw_prompt"], batch["reward_model"],
                                                      batch["extra_info"])):
                history = [t for t in msgs[0]["content"].split() if t.startswith("<a_")]
                for k in range(n):  # fake rollout: a history item, the ground truth, or junk
                    text = [history[0] if history else "none", rm["ground_truth"][16:40], "junk", history[-1:]][k]
                    out = run(manager, one_row(tokenizer, str(text), gt=rm["ground_truth"], extra_info=extra))
                    rewards.append(out["reward_score"])
                    stages.append(out["reward_extra_info"]["context"])
                    uids.append(f"p{step}_{j}")
            assert set(stages) == {float(stage.context)}  # reward log shows the data's stage
            length = 3
            token_rewards = torch.zeros(len(rewards), length)
            token_rewards[:, -1] = torch.tensor(rewards)
            data = DataProto.from_dict(
                tensors={"token_level_rewards": token_rewards, "response_mask": torch.ones(len(rewards), length)},
                non_tensors={"uid": np.array(uids, dtype=object)})
            adv = compute_advantage_for_multi_trajectories(
                data, batch_keys=[f"{u}_0_0" for u in uids], adv_estimator=cfg.algorithm.adv_estimator,
                config=cfg.algorithm).batch["advantages"]
            # group-normalised and scaled by kl_ref / beta_stage
            grouped = adv[:, -1].reshape(-1, n)
            r = torch.tensor(rewards).reshape(-1, n)
            expected = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-6)
            torch.testing.assert_close(grouped, expected * schedule.advantage_scale(stage), rtol=1e-4, atol=1e-5)
            stages_seen.append(progressive_stage_metrics(cfg, step)["training/conrec_stage"])
    finally:
        SkipManager.set_step(-1)
    assert stages_seen == [1.0, 1.0, 2.0, 2.0, 3.0, 3.0]


def test_validation_dataset_uses_val_context(recipe, tokenizer):
    val = create_rl_dataset(recipe.data.val_files, recipe.data, tokenizer, None, is_train=False)
    assert len(val) == 3 and {val[i]["extra_info"]["context"] for i in range(3)} == {3}
