"""Trainer mode ``conrec_sync`` (``trainer.v1.trainer_mode=conrec_sync``): verl's ``sync`` trainer
plus what the progressive schedule needs from a trainer, registered with verl's v1 trainer registry.

- the stage's KL weight as the actor's KL loss weight: verl's own ``ppo_loss`` with
  ``kl_loss_coef = beta_stage`` sent to the workers with verl's ``set_loss_fn`` when the stage
  changes (also after a resume) -- a true per-stage beta (``beta_via: kl_loss``);
- ``training/conrec_stage`` (and ``conrec_beta``, ``conrec_adv_scale``, ``conrec_stage_context``)
  every step, and ``reward_extra/<key>/mean`` of the reward manager's extra info (verl's v1 trainer
  logs those for validation only);
- the replay buffer's poll interval from ``trainer.v1.sync.poll_interval``.

Where this reaches into verl internals is listed in :mod:`conrec_verl.runtime.verl_compat`.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

from conrec_verl.plugins.advantage import NAME, schedule_from_algorithm_config, stage_metrics
from conrec_verl.runtime import verl_compat

logger = logging.getLogger(__name__)

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
    return verl_compat.set_poll_interval(replay_buffer, poll)


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
