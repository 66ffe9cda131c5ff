"""The CoNRec reward's definition (no verl import): its options and the reward-variant registry.

:class:`RewardConfig` holds the keys of ``reward.reward_kwargs``; :mod:`conrec_verl.core.scoring`
turns a model output into the two similarities this module's variants combine.

Reward variants (``RewardConfig.variant``)
------------------------------------------
Each variant is one function registered with :func:`register_reward_variant` (its docstring is its
formula, its ``lower_bound`` sets the default format penalty), as verl registers advantage
estimators; :data:`REWARD_VARIANTS` is the registry. The built-in ones, with
``s_g = max cos(out, GTS)`` and ``s_f = max cos(out, FPS)`` over codebook-reconstructed
embeddings (an empty set contributes 0) and ``t = sim_threshold``:

============== ==================================================  ==============
variant         reward                                              paper
============== ==================================================  ==============
collab          ``s_g - gamma * s_f``   (default, the final choice)  (c)
neg_only        ``s_g``                                              (a)
neg_truncated   ``s_g if s_g >= t else 0``                           (b)
double_truncated ``[s_g]_t - gamma * [s_f]_t``, ``[x]_t = x if x >= t else 0``  (d)
hierarchical    ``hier_weights[d-1]`` for the deepest prefix ``d`` shared with a GTS item,
                0 if none (default weights 0.01 / 0.1 / 1 for 3 levels)  (e)
============== ==================================================  ==============

Hit bonus (``hit_bonus``, default 0: the paper's rewards as above). A project extension, not in the
paper: ``hit_bonus`` is added to a valid output's reward when it *is* one of the row's future
dislikes (``future_neg``; the next dislike under ``targets=next_neg``), the event FHR@K counts.
Swing neighbours in GTS earn the similarity, not the bonus. Why: on a warm-up model that already
hits, the similarity rewards alone traded exact hits for closeness (BENCHMARKS.md).

The format penalty defaults to ``lower_bound(variant) - 0.5`` (``-2.0`` for ``collab`` with
``gamma=0.5``) so that any valid SID always scores above garbage; set it explicitly to override.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Callable, Mapping, Sequence

PARSE_MODES = ("first", "strict")
TARGET_SETS = ("gts", "next_neg")
EMPTY_TARGETS = ("error", "zero")


# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------


class ScoringConfigError(ValueError):
    """A reward/scoring option has an invalid value."""


def _number(name: str, value: Any) -> float:
    """``value`` as a finite float, or a :class:`ScoringConfigError` naming the option."""
    if isinstance(value, bool):
        raise ScoringConfigError(f"{name} must be a finite number, got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ScoringConfigError(f"{name} must be a finite number, got {value!r}") from None
    if not math.isfinite(out):
        raise ScoringConfigError(f"{name} must be a finite number, got {value!r}")
    return out


# ---------------------------------------------------------------------------------------------
# reward variants: a registry, like verl's advantage estimators (core_algos.register_adv_est)
# ---------------------------------------------------------------------------------------------

#: ``fn(s_g, s_f, depth, config, hier_weights) -> reward`` of a valid output: ``s_g``/``s_f`` its
#: max cosine to GTS / FPS, ``depth`` the deepest SID prefix it shares with a GTS item, ``config`` the
#: :class:`RewardConfig`, ``hier_weights`` the per-depth weights (``RewardConfig.effective_hier_weights``)
VariantFn = Callable[[float, float, int, "RewardConfig", Sequence[float]], float]


@dataclass(frozen=True)
class RewardVariant:
    name: str
    fn: VariantFn
    #: the lowest reward a valid output can get (the default format penalty is 0.5 below it)
    lower_bound: Callable[["RewardConfig"], float]
    #: which of the paper's reward designs it is
    paper: str = ""


REWARD_VARIANTS: dict[str, RewardVariant] = {}


def register_reward_variant(name: str, lower_bound: Callable[["RewardConfig"], float], paper: str = ""):
    """Register a reward variant (``reward.reward_kwargs.variant=<name>``); the decorated function's
    docstring is its formula. ``lower_bound(config)`` must bound every reward of a valid output from
    below (tests check it for every registered variant). As with verl's registries, the module that
    registers it must be imported in every process that scores (verl's reward workers too): put it
    in a module loaded through a ``verl.plugins`` entry point."""

    def decorate(fn: VariantFn) -> VariantFn:
        if name in REWARD_VARIANTS and REWARD_VARIANTS[name].fn is not fn:
            raise ValueError(f"reward variant {name!r} is already registered")
        REWARD_VARIANTS[name] = RewardVariant(name, fn, lower_bound, paper)
        return fn

    return decorate


def _truncate(x: float, t: float) -> float:
    return x if x >= t else 0.0


def _truncated_floor(config) -> float:
    """The lowest ``[s]_t`` for a cosine ``s``: 0, or ``t`` itself when the threshold is negative."""
    return min(0.0, max(-1.0, config.sim_threshold))


@register_reward_variant("collab", lower_bound=lambda c: -1.0 - c.gamma, paper="(c), the final choice")
def collab_reward(s_g, s_f, depth, config, hier_weights):
    """``s_g - gamma * s_f``: close to what the user will dislike, away from what they will like."""
    return s_g - config.gamma * s_f


@register_reward_variant("neg_only", lower_bound=lambda c: -1.0, paper="(a)")
def neg_only_reward(s_g, s_f, depth, config, hier_weights):
    """``s_g``."""
    return s_g


@register_reward_variant("neg_truncated", lower_bound=_truncated_floor, paper="(b)")
def neg_truncated_reward(s_g, s_f, depth, config, hier_weights):
    """``s_g`` if ``s_g >= sim_threshold`` else 0."""
    return _truncate(s_g, config.sim_threshold)


@register_reward_variant("double_truncated", lower_bound=lambda c: _truncated_floor(c) - c.gamma, paper="(d)")
def double_truncated_reward(s_g, s_f, depth, config, hier_weights):
    """``[s_g]_t - gamma * [s_f]_t`` with ``[x]_t = x if x >= sim_threshold else 0``."""
    return _truncate(s_g, config.sim_threshold) - config.gamma * _truncate(s_f, config.sim_threshold)


@register_reward_variant("hierarchical", lower_bound=lambda c: 0.0, paper="(e)")
def hierarchical_reward(s_g, s_f, depth, config, hier_weights):
    """``hier_weights[d-1]`` for the deepest prefix ``d`` shared with a GTS item, 0 if none."""
    return hier_weights[depth - 1] if depth > 0 else 0.0


#: the built-in variants (the registry may hold more)
VARIANTS = tuple(REWARD_VARIANTS)


@dataclass(frozen=True)
class RewardConfig:
    """Options of the CoNRec reward; the keys of ``reward.reward_kwargs`` (minus ``codebook_path``)."""

    variant: str = "collab"
    #: weight of the future-positive penalty (paper: [gap]; 0.5 keeps the negative term dominant)
    gamma: float = 0.5
    #: similarity truncation threshold of the truncated variants (paper: 0.6)
    sim_threshold: float = 0.6
    #: reward of an invalid output; ``None`` = ``lower_bound(variant) - 0.5``
    format_penalty: float | None = None
    #: reward per prefix depth 1..L for ``hierarchical``; ``None`` = ``10 ** -(L - d)``
    hier_weights: tuple[float, ...] | None = None
    #: ``first`` (first complete in-range SID counts) or ``strict`` (output must be one SID)
    parse_mode: str = "first"
    #: refuse ground truths whose ``sid_build`` differs from the codebook's fingerprint
    check_sid_build: bool = True
    #: positive target set: ``gts`` (future_neg ∪ swing) or ``next_neg`` (the single next dislike)
    targets: str = "gts"
    #: a ground truth with no usable target SID (``{}``, empty lists, only out-of-range SIDs):
    #: ``error`` (a :class:`GroundTruthError`: every output would score the same, no signal) or
    #: ``zero`` (score it with similarity 0, counted in ``Scorer.n_empty_targets``, warned once)
    empty_targets: str = "error"
    #: added to the reward of an output that is one of the row's future dislikes (``future_neg``, or
    #: ``next_neg`` under ``targets=next_neg``; not a Swing neighbour): 0 = the paper's reward
    hit_bonus: float = 0.0

    def __post_init__(self):
        if self.variant not in REWARD_VARIANTS:
            raise ScoringConfigError(f"reward variant {self.variant!r} unknown; choose one of {tuple(REWARD_VARIANTS)}")
        if self.parse_mode not in PARSE_MODES:
            raise ScoringConfigError(f"parse_mode {self.parse_mode!r} unknown; choose one of {PARSE_MODES}")
        if self.targets not in TARGET_SETS:
            raise ScoringConfigError(f"targets {self.targets!r} unknown; choose one of {TARGET_SETS}")
        if self.empty_targets not in EMPTY_TARGETS:
            raise ScoringConfigError(f"empty_targets {self.empty_targets!r} unknown; choose one of {EMPTY_TARGETS}")
        for name in ("gamma", "sim_threshold", "hit_bonus"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ScoringConfigError(f"{name} must be a finite number, got {value!r}")
        if self.gamma < 0:
            raise ScoringConfigError(f"gamma must be >= 0, got {self.gamma}")
        if self.hit_bonus < 0:
            raise ScoringConfigError(f"hit_bonus must be >= 0 (a bonus, the variant's lower bound stays valid), "
                                     f"got {self.hit_bonus}")
        if self.format_penalty is not None and not math.isfinite(float(self.format_penalty)):
            raise ScoringConfigError(f"format_penalty must be finite, got {self.format_penalty!r}")
        if self.hier_weights is not None:
            object.__setattr__(self, "hier_weights", tuple(_number("hier_weights", w) for w in self.hier_weights))

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any] | None, ignore: Sequence[str] = ()) -> "RewardConfig":
        """Build from a dict / DictConfig; unknown keys (other than ``ignore``) are an error."""
        options = dict(options or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(k for k in options if k not in known and k not in ignore)
        if unknown:
            raise ScoringConfigError(f"unknown reward option(s) {unknown}; known: {sorted(known | set(ignore))}")
        kwargs = {k: v for k, v in options.items() if k in known}
        if kwargs.get("hier_weights") is not None:
            weights = kwargs["hier_weights"]
            if isinstance(weights, (str, bytes)) or not hasattr(weights, "__iter__"):
                raise ScoringConfigError(f"hier_weights must be a list of numbers (one per SID level), got {weights!r}")
            kwargs["hier_weights"] = tuple(_number("hier_weights", w) for w in weights)
        for key in ("gamma", "sim_threshold", "format_penalty", "hit_bonus"):
            if key in kwargs and kwargs[key] is not None:
                kwargs[key] = _number(key, kwargs[key])
        for key in ("check_sid_build",):
            if key in kwargs and not isinstance(kwargs[key], bool):
                raise ScoringConfigError(f"{key} must be true or false, got {kwargs[key]!r}")
        return cls(**kwargs)

    def variant_fn(self) -> VariantFn:
        """The registered function of :attr:`variant`."""
        return REWARD_VARIANTS[self.variant].fn

    def lower_bound(self) -> float:
        """The lowest reward a valid SID can get under this variant."""
        return float(REWARD_VARIANTS[self.variant].lower_bound(self))

    def effective_format_penalty(self) -> float:
        if self.format_penalty is not None:
            return float(self.format_penalty)
        return self.lower_bound() - 0.5

    def effective_hier_weights(self, num_levels: int) -> tuple[float, ...]:
        if self.hier_weights is None:
            return tuple(10.0 ** -(num_levels - d) for d in range(1, num_levels + 1))
        if len(self.hier_weights) != num_levels:
            raise ScoringConfigError(
                f"hier_weights has {len(self.hier_weights)} entries but the codebook has {num_levels} levels"
            )
        return self.hier_weights
