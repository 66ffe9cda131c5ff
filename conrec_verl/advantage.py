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
   ``conrec_sync`` trainer mode sets it as the actor's KL loss weight (:func:`stage_loss_fn`, sent
   to the workers through verl's ``set_loss_fn`` when the stage changes) and the advantages stay
   verl's GRPO ones; with ``beta_via: advantage_scale`` the advantages are multiplied by
   ``kl_ref / beta_stage`` against the actor's fixed ``kl_ref`` (exact for one fresh-Adam step
   only; see :mod:`conrec_verl.core.schedule`).

It prints one line when the stage changes. verl 0.9.1 passes the estimator no metrics dict, so
the per-step metric comes from a trainer mode registered here with verl's v1 trainer registry:
``trainer.v1.trainer_mode=conrec_sync`` is verl's ``sync`` trainer plus ``training/conrec_stage``
(and ``training/conrec_beta``, ``training/conrec_adv_scale``, ``training/conrec_stage_context``)
every step, and ``reward_extra/<key>/mean`` of the reward manager's extra info (which verl's v1
trainer otherwise logs for validation only).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from verl.trainer.ppo import core_algos
from verl.trainer.ppo.core_algos import register_adv_est
from verl.utils.skip import SkipManager

from conrec_verl.core.schedule import Stage, StageSchedule

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
    """verl's current training step in this process (``SkipManager.step``; -1 before training)."""
    return int(SkipManager.step)


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


# ---------------------------------------------------------------------------------------------
# stage metric: a v1 trainer mode that logs the stage every step
# ---------------------------------------------------------------------------------------------

TRAINER_MODE = "conrec_sync"


def progressive_stage_metrics(config: Any, step: int) -> dict[str, float]:
    """:func:`stage_metrics` for a full trainer config; ``{}`` unless ``progressive_grpo`` is selected."""
    algorithm = config.get("algorithm") if hasattr(config, "get") else None
    if algorithm is None or algorithm.get("adv_estimator") != NAME:
        return {}
    return stage_metrics(schedule_from_algorithm_config(algorithm), int(step))


def reward_extra_means(infos: list[dict]) -> dict[str, float]:
    """``{"reward_extra/<key>/mean": mean}`` over the numeric values of per-sample extra-info dicts."""
    sums: dict[str, list[float]] = {}
    for info in infos:
        for key, value in (info or {}).items():
            if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
                sums.setdefault(key, []).append(float(value))
            elif isinstance(value, (bool, np.bool_)):
                sums.setdefault(key, []).append(float(value))
    return {f"reward_extra/{k}/mean": float(np.mean(v)) for k, v in sums.items() if v}


from verl.trainer.ppo.v1.trainer_base import register_trainer  # noqa: E402
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync  # noqa: E402


def stage_loss_fn(actor_config_node, beta: float):
    """verl's own actor loss (``verl.workers.utils.losses.ppo_loss``) bound to the actor config with
    ``kl_loss_coef = beta``: what the actor worker builds at start-up, with the stage's KL weight."""
    from functools import partial

    from omegaconf import OmegaConf

    from verl.utils.config import omega_conf_to_dataclass
    from verl.workers.utils.losses import ppo_loss

    node = OmegaConf.merge(actor_config_node, {"kl_loss_coef": float(beta)})
    return partial(ppo_loss, config=omega_conf_to_dataclass(node))


def apply_poll_interval(replay_buffer, config):
    """Set the replay buffer's poll interval from ``trainer.v1.sync.poll_interval`` (seconds).

    verl 0.9.1's sync trainer waits for a finished rollout batch by sleeping ``poll_interval``
    (2.0 s, not configurable there) between checks, so every step's ``timing_s/gen`` is rounded up
    to a multiple of 2 s: most of a tiny model's step on CPU, 4 of 11 s of a tiny model's step on an
    H200. A short interval (the recipes use 0.05 s; each poll is one metadata read from the transfer
    queue) removes that wait. Unset keeps verl's value."""
    sync_cfg = config.trainer.v1.get("sync", None) or {}
    poll = sync_cfg.get("poll_interval", None)
    if poll is None:
        return replay_buffer
    try:
        poll = float(poll)
    except (TypeError, ValueError):
        poll = -1.0
    if not poll > 0:
        raise ValueError(f"trainer.v1.sync.poll_interval must be a number of seconds > 0, got {sync_cfg.get('poll_interval')!r}")
    if hasattr(replay_buffer, "poll_interval"):
        replay_buffer.poll_interval = poll
    return replay_buffer


@register_trainer(TRAINER_MODE)
class ConrecSyncTrainer(PPOTrainerSync):
    """verl's ``sync`` trainer that also logs ``training/conrec_stage`` (and beta, scale, context)
    every step. verl gives an advantage estimator no metrics dict, so the per-step stage metric
    needs a trainer hook; verl 0.9.1's v1 trainer registry is that hook
    (``trainer.v1.trainer_mode=conrec_sync``).

    verl's trainer branches on ``self.trainer_mode == "sync"`` (replay buffer, exact refill, weight
    sync); this class reports ``"sync"`` so it behaves exactly like the ``sync`` trainer (and reads
    ``trainer.v1.sync.*`` options)."""

    @property
    def trainer_mode(self) -> str:
        return "sync"

    @trainer_mode.setter
    def trainer_mode(self, value: str) -> None:  # verl assigns config.trainer.v1.trainer_mode
        pass

    def _build_replay_buffer(self):
        return apply_poll_interval(super()._build_replay_buffer(), self.config)

    def _update_actor(self, batch, metrics):
        self._apply_stage_beta()
        return super()._update_actor(batch, metrics)

    def _apply_stage_beta(self) -> None:
        """``beta_via: kl_loss``: give the actor workers verl's ``ppo_loss`` with the current stage's
        KL weight whenever it changes (first step after a start or a resume included)."""
        algorithm = self.config.get("algorithm")
        if algorithm is None or algorithm.get("adv_estimator") != NAME:
            return
        schedule = schedule_from_algorithm_config(algorithm)
        if schedule.beta_via != "kl_loss":
            return
        beta = schedule.effective_beta(schedule.stage_at(int(self.global_steps)))
        if getattr(self, "_conrec_beta", None) == beta:
            return
        self.actor_rollout_wg.set_loss_fn(stage_loss_fn(self.config.actor_rollout_ref.actor, beta))
        self._conrec_beta = beta
        print(f"[conrec] step {self.global_steps}: actor KL loss weight set to {beta:g}", flush=True)

    def _compute_metrics(self, batch, metrics, timing_raw, global_steps, epoch):
        out = super()._compute_metrics(batch, metrics, timing_raw, global_steps, epoch)
        metrics.update(progressive_stage_metrics(self.config, global_steps))
        try:
            metrics.update(self._reward_extra_metrics(batch))
        except Exception as exc:  # noqa: BLE001 - logging must never stop training
            logger.warning("conrec: could not aggregate reward extra info for metrics: %r", exc)
        return out

    def _reward_extra_metrics(self, batch) -> dict[str, float]:
        """Means of the reward manager's per-sample ``reward_extra_info`` (verl's v1 trainer logs them
        for validation only) as ``reward_extra/<key>/mean``."""
        import transfer_queue as tq

        non_padding = [not tag.get("is_padding", False) for tag in batch.tags]
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=["extra_fields"])
        fields = list(data["extra_fields"])
        return reward_extra_means(
            [f.get("reward_extra_info", {}) if isinstance(f, dict) else {} for f, keep in zip(fields, non_padding)
             if keep])
