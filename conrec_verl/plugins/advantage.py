"""Advantage estimator ``progressive_grpo``: GRPO with CoNRec's per-stage schedule.

Select it with::

    algorithm.adv_estimator=progressive_grpo
    actor_rollout_ref.actor.use_kl_loss=true           # per-stage beta acts through the KL loss
    actor_rollout_ref.actor.kl_loss_coef=0.001         # kl_ref, the fixed weight verl applies
    +algorithm.progressive_grpo.kl_ref=${actor_rollout_ref.actor.kl_loss_coef}
    +algorithm.progressive_grpo.stages=[{context:1,steps:100,beta:0.001},{context:2,steps:100,beta:0.0005},{context:3,steps:100,beta:0.001}]

(see :mod:`conrec_verl.core.schedule` for every key). Importing this module registers the name
with ``verl.trainer.ppo.core_algos.register_adv_est``.

verl calls the estimator without a step; the current step is ``verl.utils.skip.SkipManager.step``,
which both trainers set before every step (and restore on resume) in the process that computes
advantages. For the stage of that step the estimator

1. computes verl's GRPO group-normalised advantages (``compute_grpo_outcome_advantage``) with the
   stage's ``norm_adv_by_std`` (``algorithm.norm_adv_by_std_in_grpo`` is not used by this
   estimator) and the schedule's ``epsilon``;
2. applies the stage's KL weight ``beta_stage``: with ``beta_via: kl_loss`` (default) the
   ``conrec_sync`` trainer mode sets it as the actor's KL loss weight (:func:`conrec_verl.plugins.trainer_mode.stage_loss_fn`, sent
   to the workers through verl's ``set_loss_fn`` when the stage changes) and the advantages stay
   verl's GRPO ones; with ``beta_via: advantage_scale`` the advantages are multiplied by
   ``kl_ref / beta_stage`` against the actor's fixed ``kl_ref`` (exact for one fresh-Adam step
   only; see :mod:`conrec_verl.core.schedule`).

It prints one line when the stage changes. verl 0.9.1 passes the estimator no metrics dict, so
the per-step metrics and the per-stage KL weight come from the trainer mode ``conrec_sync``
(:mod:`conrec_verl.plugins.trainer_mode`).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from verl.trainer.ppo import core_algos
from verl.trainer.ppo.core_algos import register_adv_est

from conrec_verl.core.schedule import Stage, StageSchedule
from conrec_verl.runtime import verl_compat

logger = logging.getLogger(__name__)

NAME = "progressive_grpo"
CONFIG_KEY = "progressive_grpo"

_last_stage: dict[str, Any] = {"index": None}


def schedule_from_algorithm_config(config: Any) -> StageSchedule:
    """The schedule under ``algorithm.progressive_grpo`` (``config`` is the ``algorithm`` node)."""
    block = None
    if config is not None:
        getter = getattr(config, "get", None)
        block = getter(CONFIG_KEY) if getter is not None else getattr(config, CONFIG_KEY, None)
    return StageSchedule.from_config(block, where=f"algorithm.{CONFIG_KEY}")


def current_step() -> int:
    """verl's current training step in this process (-1 before training; verl does not pass it to
    estimators: ``verl_compat.global_step``)."""
    return verl_compat.global_step()


def stage_metrics(schedule: StageSchedule, step: int) -> dict[str, float]:
    """Metrics describing the stage of ``step`` (for a trainer-side metrics hook)."""
    stage = schedule.stage_at(step)
    return {
        "training/conrec_stage": float(stage.index),
        "training/conrec_stage_context": float(stage.context),
        "training/conrec_beta": float(schedule.effective_beta(stage)),
        "training/conrec_adv_scale": float(schedule.advantage_scale(stage)),
    }


def _announce(stage: Stage, schedule: StageSchedule, step: int) -> None:
    if _last_stage["index"] == stage.index:
        return
    _last_stage["index"] = stage.index
    msg = (f"[conrec] progressive_grpo step {step}: stage {stage.index}/{len(schedule.stages)} "
           f"({stage.name}, context {stage.context}, steps {stage.start_step}-{stage.end_step}, "
           f"beta {schedule.effective_beta(stage):g}, advantage scale {schedule.advantage_scale(stage):g}, "
           f"norm_adv_by_std {stage.norm_adv_by_std})")
    logger.warning(msg)
    print(msg, flush=True)


@register_adv_est(NAME)
def compute_progressive_grpo_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray | None = None,
    config: Any = None,
    step: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO advantages for the current progressive stage (``step`` defaults to verl's current step)."""
    if index is None:
        raise ValueError("progressive_grpo needs the group index (uid) of every response; verl passes it as index=")
    schedule = schedule_from_algorithm_config(config)
    step = current_step() if step is None else int(step)
    stage = schedule.stage_at(step)
    _announce(stage, schedule, step)
    advantages, returns = core_algos.compute_grpo_outcome_advantage(
        token_level_rewards=token_level_rewards,
        response_mask=response_mask,
        index=index,
        epsilon=schedule.epsilon,
        norm_adv_by_std_in_grpo=stage.norm_adv_by_std,
    )
    scale = schedule.advantage_scale(stage)
    if scale != 1.0:
        advantages = advantages * scale
        returns = returns * scale
    return advantages, returns
