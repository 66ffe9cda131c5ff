"""The progressive-GRPO stage schedule (pure; no verl, no torch).

One schedule object answers "which stage is training step ``s`` in?" for everything that needs it:
the advantage estimator (per-stage KL weight and advantage normalisation), the dataset adapter
(which prompt context to render for the rows of step ``s``) and the reward manager (the stage it
logs). All of them read the same config block, ``algorithm.progressive_grpo``::

    algorithm:
      adv_estimator: progressive_grpo
      progressive_grpo:
        kl_ref: ${actor_rollout_ref.actor.kl_loss_coef}  # the fixed KL weight verl's actor applies
        norm_adv_by_std: true       # default for stages that do not set it
        epsilon: 1.0e-6
        stages:                     # in order; `steps` = length of the stage in training steps
          - {context: 1, steps: 100, beta: 1.0e-3}   # last-3-days negatives
          - {context: 2, steps: 100, beta: 5.0e-4}   # all negatives
          - {context: 3, steps: 100, beta: 1.0e-3}   # negatives + positives

Steps are verl's ``global_steps`` (the first training step is 1). Stage ``k`` covers steps
``start_k .. end_k`` (inclusive, ``start_1 = 1``); steps after the last stage stay in the last
stage, steps < 1 (e.g. validation before training) belong to the first.

Per-stage beta (the paper re-sets the KL coefficient per stage; values are a [gap]), two ways
(``beta_via``):

* ``kl_loss`` (default): the stage's beta is the KL loss weight itself. The ``conrec_sync`` trainer
  mode hands the actor workers verl's own ``ppo_loss`` with ``kl_loss_coef = beta_stage`` whenever
  the stage changes (verl's public ``set_loss_fn`` worker method), so the actor minimises exactly
  ``L_pg + beta_stage * KL`` and AdamW's moments carry over stage boundaries as in any run whose
  loss changes. Needs ``trainer.v1.trainer_mode=conrec_sync`` and the actor's KL loss.
* ``advantage_scale``: scale the group-normalised advantages by ``c = kl_ref / beta`` against the
  actor's fixed ``kl_ref``: the actor minimises ``c * (L_pg + beta * KL)``. Exact for one step of a
  fresh Adam, but Adam's second moment (memory ~1000 steps) carries the previous stage's gradient
  scale across a boundary and gradient clipping is not scale-free, so across stages it acts largely
  as a learning-rate change; kept for trainers other than ``conrec_sync``.
See :meth:`StageSchedule.advantage_scale`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

CONTEXTS = (1, 2, 3)
BETA_VIA = ("kl_loss", "advantage_scale")


def eligible_contexts(n_recent_neg: int, n_neg: int) -> tuple[int, ...]:
    """The prompt contexts a row can be trained with: the one rule data_prep (stage assignment,
    SFT rows) and the dataset adapter (which rows a curriculum stage draws) both use.

    No prompt may show an empty negative context: context 1 (recent negatives) needs a dislike in
    the last ``recent_days``, contexts 2 and 3 need at least one dislike in the history. A row with
    no dislike at all fits no context."""
    if n_neg <= 0:
        return ()
    return (1, 2, 3) if n_recent_neg > 0 else (2, 3)


def untaught_contexts(taught: Sequence[int], asked: Mapping[str, int | None]) -> list[str]:
    """The askers (``{who: context}``; None = not asked) whose prompt context is none of the
    ``taught`` ones (warm-up SFT's ``sft.warmup.contexts``): a model must never be RL-trained or
    evaluated with a prompt form its SFT stages did not teach it."""
    known = {int(c) for c in taught}
    return [f"{who} (context {int(c)})" for who, c in asked.items() if c is not None and int(c) not in known]


STAGE_ROWS = ("assigned", "eligible")


def rows_by_context(n_recent_neg: Sequence[int], n_neg: Sequence[int], assigned: Sequence[int | None] | None,
                    how: str = "assigned", where: str = "rows") -> dict[int, list[int]]:
    """Which rows each context's stage may draw (the dataset adapter and cross-stage cleaning both
    ask this): rows whose histories give the context a non-empty negative section
    (:func:`eligible_contexts`) and, with ``how="assigned"``, only the rows data_prep assigned to
    that context (``assigned[i]``, so stages train on disjoint rows); ``"eligible"``: every
    eligible row."""
    if how not in STAGE_ROWS:
        raise ScheduleError(f"stage_rows must be one of {STAGE_ROWS}, got {how!r}")
    if len(n_recent_neg) != len(n_neg):
        raise ScheduleError(f"{where}: {len(n_recent_neg)} recent-negative counts for {len(n_neg)} rows")
    out: dict[int, list[int]] = {c: [] for c in CONTEXTS}
    for i, (recent, neg) in enumerate(zip(n_recent_neg, n_neg)):
        ok = eligible_contexts(int(recent), int(neg))
        if how == "assigned":
            stage = None if assigned is None else assigned[i]
            if stage is None:
                raise ScheduleError(f"{where}: row {i} has no extra_info.context (the context data_prep assigned); "
                                    "set data.conrec.stage_rows=eligible")
            ok = tuple(c for c in ok if c == int(stage))
        for c in ok:
            out[c].append(i)
    return out


class ScheduleError(ValueError):
    """The stage schedule config is invalid."""


@dataclass(frozen=True)
class Stage:
    index: int  # 1-based
    context: int  # 1 = recent negatives, 2 = all negatives, 3 = negatives + positives
    steps: int
    start_step: int
    end_step: int
    beta: float | None
    norm_adv_by_std: bool
    name: str = ""

    def contains(self, step: int) -> bool:
        return self.start_step <= step <= self.end_step


def _as_plain(obj: Any) -> Any:
    """DictConfig/ListConfig -> dict/list without importing omegaconf here."""
    if hasattr(obj, "items") and not isinstance(obj, dict):
        return {k: _as_plain(v) for k, v in obj.items()}
    if isinstance(obj, dict):
        return {k: _as_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) or (hasattr(obj, "__iter__") and hasattr(obj, "__len__")
                                          and not isinstance(obj, (str, bytes))):
        return [_as_plain(v) for v in obj]
    return obj


class StageSchedule:
    """Ordered stages over training steps."""

    def __init__(self, stages: Sequence[Stage], kl_ref: float = 0.0, epsilon: float = 1e-6,
                 where: str = "algorithm.progressive_grpo", beta_via: str = "kl_loss"):
        if not stages:
            raise ScheduleError(f"{where}.stages must list at least one stage")
        if beta_via not in BETA_VIA:
            raise ScheduleError(f"{where}.beta_via must be one of {BETA_VIA}, got {beta_via!r}")
        self.beta_via = beta_via
        self.stages = tuple(stages)
        self.kl_ref = float(kl_ref)
        self.epsilon = float(epsilon)
        self.where = where

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None, where: str = "algorithm.progressive_grpo") -> "StageSchedule":
        cfg = _as_plain(config) if config is not None else {}
        if not isinstance(cfg, dict):
            raise ScheduleError(f"{where} must be a mapping, got {type(config).__name__}")
        known = {"stages", "kl_ref", "norm_adv_by_std", "epsilon", "beta_via"}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ScheduleError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
        default_norm = cfg.get("norm_adv_by_std", True)
        default_norm = True if default_norm is None else default_norm
        if not isinstance(default_norm, bool):
            raise ScheduleError(f"{where}.norm_adv_by_std must be true/false, got {default_norm!r}")
        kl_ref = cfg.get("kl_ref", 0.0)
        kl_ref = 0.0 if kl_ref is None else kl_ref
        try:
            kl_ref = float(kl_ref)
        except (TypeError, ValueError):
            raise ScheduleError(f"{where}.kl_ref must be a number, got {kl_ref!r}") from None
        if not math.isfinite(kl_ref) or kl_ref < 0:
            raise ScheduleError(f"{where}.kl_ref must be a finite number >= 0, got {kl_ref}")
        epsilon = float(cfg.get("epsilon", 1e-6) if cfg.get("epsilon") is not None else 1e-6)
        raw_stages = cfg.get("stages")
        if raw_stages is None:
            raise ScheduleError(
                f"{where}.stages is required, e.g. [{{context: 1, steps: 100, beta: 0.001}}, "
                "{context: 2, steps: 100, beta: 0.0005}, {context: 3, steps: 100, beta: 0.001}]"
            )
        if not isinstance(raw_stages, list):
            raise ScheduleError(f"{where}.stages must be a list of stages, got {type(raw_stages).__name__}")
        stages: list[Stage] = []
        start = 1
        stage_keys = {"context", "steps", "beta", "norm_adv_by_std", "name"}
        for i, raw in enumerate(raw_stages):
            key = f"{where}.stages[{i}]"
            if not isinstance(raw, dict):
                raise ScheduleError(f"{key} must be a mapping, got {raw!r}")
            bad = sorted(set(raw) - stage_keys)
            if bad:
                raise ScheduleError(f"{key}: unknown key(s) {bad}; known: {sorted(stage_keys)}")
            context = raw.get("context", i + 1)
            if context not in CONTEXTS:
                raise ScheduleError(f"{key}.context must be one of {CONTEXTS}, got {context!r}")
            steps = raw.get("steps")
            if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
                raise ScheduleError(f"{key}.steps must be a positive integer, got {steps!r}")
            beta = raw.get("beta")
            if beta is not None:
                try:
                    beta = float(beta)
                except (TypeError, ValueError):
                    raise ScheduleError(f"{key}.beta must be a number or null, got {beta!r}") from None
                if not math.isfinite(beta) or beta <= 0:
                    raise ScheduleError(f"{key}.beta must be > 0 (or null for kl_ref), got {beta}")
            norm = raw.get("norm_adv_by_std", default_norm)
            norm = default_norm if norm is None else norm
            if not isinstance(norm, bool):
                raise ScheduleError(f"{key}.norm_adv_by_std must be true/false, got {norm!r}")
            stages.append(Stage(index=i + 1, context=int(context), steps=steps, start_step=start,
                                end_step=start + steps - 1, beta=beta, norm_adv_by_std=norm,
                                name=str(raw.get("name") or f"stage{i + 1}")))
            start += steps
        if kl_ref == 0 and any(s.beta is not None for s in stages):
            raise ScheduleError(
                f"{where}: stages set beta but kl_ref is 0; set kl_ref to the actor's KL weight "
                "(e.g. kl_ref: ${{actor_rollout_ref.actor.kl_loss_coef}} with actor.use_kl_loss=true)"
            )
        beta_via = cfg.get("beta_via", "kl_loss") or "kl_loss"
        if beta_via not in BETA_VIA:
            raise ScheduleError(f"{where}.beta_via must be one of {BETA_VIA}, got {beta_via!r}")
        return cls(stages, kl_ref=kl_ref, epsilon=epsilon, where=where, beta_via=beta_via)

    # -- queries --------------------------------------------------------------------------------
    @property
    def total_steps(self) -> int:
        return self.stages[-1].end_step

    @property
    def boundaries(self) -> list[int]:
        """First step of every stage after the first."""
        return [s.start_step for s in self.stages[1:]]

    def stage_at(self, step: int) -> Stage:
        step = int(step)
        for stage in self.stages:
            if step <= stage.end_step:
                return stage
        return self.stages[-1]

    def advantage_scale(self, stage: Stage) -> float:
        """Factor on the group-normalised advantages that turns the actor's fixed KL weight
        ``kl_ref`` into the stage's ``beta`` (``beta_via: advantage_scale``); 1 when the stage keeps
        ``kl_ref`` or when beta is applied in the KL loss itself (``beta_via: kl_loss``)."""
        if self.beta_via == "kl_loss" or stage.beta is None or self.kl_ref == 0:
            return 1.0
        return self.kl_ref / stage.beta

    def effective_beta(self, stage: Stage) -> float:
        return self.kl_ref if stage.beta is None else stage.beta


# ---------------------------------------------------------------------------------------------
# curriculum order for the dataset adapter
# ---------------------------------------------------------------------------------------------


class CurriculumOrder:
    """Maps a sequential dataset position to (row, stage, step).

    Position ``i`` is trained at step ``i // batch_size + 1`` and therefore in the stage the
    schedule gives for that step. A stage draws only the rows listed for its context in
    ``rows_by_context`` (default: every row for every context), visited in a per-stage permutation
    seeded by ``(seed, stage, pass)``, where ``pass`` counts how often the stage has gone through
    its rows, so the order is deterministic (resumable) and each stage sees every one of its rows
    before repeating.

    ``row_weights`` (cross-stage cleaning, :mod:`conrec_verl.core.cleaning`): per stage index, how
    many times a row of that stage's pool enters it (absent rows: once; 0 drops a row), so rows
    the previous stage's model answered with an item close to the user's future likes can be
    drawn more often. A stage without weights draws exactly as without this argument.
    """

    def __init__(self, schedule: StageSchedule, n_rows: int, batch_size: int, seed: int = 0,
                 total_steps: int | None = None, rows_by_context: Mapping[int, Sequence[int]] | None = None,
                 row_weights: Mapping[int, Mapping[int, int]] | None = None):
        if n_rows < 1:
            raise ScheduleError("the curriculum needs at least one data row")
        if batch_size < 1:
            raise ScheduleError(f"batch size must be >= 1, got {batch_size}")
        self.rows_by_context: dict[int, np.ndarray] | None = None
        if rows_by_context is not None:
            self.rows_by_context = {int(c): np.asarray(list(r), dtype=np.int64) for c, r in rows_by_context.items()}
            for stage in schedule.stages:
                rows = self.rows_by_context.get(stage.context)
                if rows is None or rows.size == 0:
                    raise ScheduleError(f"stage {stage.index} ({stage.name}, context {stage.context}) has no data "
                                        f"row it may train on (rows per context: "
                                        f"{ {c: int(r.size) for c, r in self.rows_by_context.items()} })")
                if rows.min() < 0 or rows.max() >= n_rows:
                    raise ScheduleError(f"rows of context {stage.context} must be in 0..{n_rows - 1}")
        self.schedule = schedule
        self.n_rows = int(n_rows)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.total_steps = int(total_steps) if total_steps else schedule.total_steps
        self._perms: dict[tuple[int, int], np.ndarray] = {}
        self._pools: dict[int, np.ndarray] = {}
        for stage_index, weights in (row_weights or {}).items():
            stage = next((st for st in schedule.stages if st.index == int(stage_index)), None)
            if stage is None:
                raise ScheduleError(f"row weights for stage {stage_index}, but the schedule has stages "
                                    f"1..{len(schedule.stages)}")
            base = self._base_rows(stage)
            allowed = set(base.tolist())
            for row, w in weights.items():
                if int(row) not in allowed:
                    raise ScheduleError(f"stage {stage.index}: weighted row {row} is not one the stage draws")
                if int(w) != w or w < 0:
                    raise ScheduleError(f"stage {stage.index}: row {row} weight must be an integer >= 0, got {w!r}")
            pool = np.repeat(base, [int(weights.get(int(r), 1)) for r in base])
            if pool.size == 0:
                raise ScheduleError(f"stage {stage.index} ({stage.name}): the row weights leave no row to train on")
            self._pools[stage.index] = pool

    def _base_rows(self, stage: Stage) -> np.ndarray:
        if self.rows_by_context is None:
            return np.arange(self.n_rows, dtype=np.int64)
        return self.rows_by_context[stage.context]

    def __len__(self) -> int:
        return self.total_steps * self.batch_size

    def step_of(self, position: int) -> int:
        return position // self.batch_size + 1

    def locate(self, position: int) -> tuple[int, Stage, int]:
        """``(row, stage, step)`` for a dataset position."""
        if not 0 <= position < len(self):
            raise IndexError(f"position {position} out of range 0..{len(self) - 1}")
        step = self.step_of(position)
        stage = self.schedule.stage_at(step)
        first_position_of_stage = (stage.start_step - 1) * self.batch_size
        k = position - first_position_of_stage  # k-th item of this stage
        rows = self._pools.get(stage.index)
        if rows is None and self.rows_by_context is not None:
            rows = self.rows_by_context[stage.context]
        n_pass, offset = divmod(k, self.n_rows if rows is None else len(rows))
        return int(self._perm(stage.index, n_pass, rows)[offset]), stage, step

    def stage_rows(self, stage: Stage) -> int:
        """How many distinct rows ``stage`` draws from."""
        if stage.index in self._pools:
            return int(np.unique(self._pools[stage.index]).size)
        return self.n_rows if self.rows_by_context is None else int(len(self.rows_by_context[stage.context]))

    def _perm(self, stage_index: int, n_pass: int, rows: np.ndarray | None = None) -> np.ndarray:
        key = (stage_index, n_pass)
        perm = self._perms.get(key)
        if perm is None:
            rng = np.random.default_rng([self.seed, stage_index, n_pass])
            perm = rng.permutation(self.n_rows) if rows is None else rows[rng.permutation(len(rows))]
            if len(self._perms) > 64:
                self._perms.clear()
            self._perms[key] = perm
        return perm
