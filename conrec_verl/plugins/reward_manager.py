"""verl reward-loop manager ``conrec``: the collaborative negative reward of CoNRec.

Select it with::

    reward.reward_manager.name=conrec
    +reward.reward_kwargs.codebook_path=<data_dir>/codebook.npz
    +reward.reward_kwargs.variant=collab   # collab | neg_only | neg_truncated | double_truncated | hierarchical
    +reward.reward_kwargs.gamma=0.5         # and sim_threshold, format_penalty, hier_weights, parse_mode,
                                            # check_sid_build (see conrec_verl.core.reward.RewardConfig)

(in a recipe yaml the ``+`` is not needed). Importing this module registers the name with
``verl.experimental.reward_loop.reward_manager.register``; ``conrec_verl.plugins.entry_point`` imports it in
every verl process.

Per trajectory it reads the SID that counts (see :mod:`conrec_verl.core.scoring`) from the
response's token ids: with a tokenizer that has the build's SID tokens, a response made of SID
tokens and special tokens (what a trained or trie-constrained model writes) maps token ids to codes
through :class:`conrec_verl.core.sid.SidTokenMap` without decoding; any other response is decoded
and its text parsed, which gives the same SID. It scores it against ``reward_model.ground_truth`` (GTS = future_neg
∪ swing, FPS = future_pos) and returns ``{"reward_score", "reward_extra_info"}``; verl puts the score
on the last response token. ``reward_extra_info`` (logged by verl): ``valid_sid``, ``exact_hit``
(also as ``acc``), ``prefix_depth``, ``sim_gts``, ``sim_fps`` and ``context`` (the prompt context 1..3 the row
was rendered for: ``extra_info.context`` written by the dataset adapter, else the context of the
schedule's stage at ``global_steps``; 0 if unknown) and ``conrec_row`` (1).

Mixed data: only rows whose ``data_source`` is one of ``reward_kwargs.data_sources`` (default
``["conrec"]``, what data_prep writes) get the CoNRec reward. Any other row is scored as verl's
``naive`` manager would score it: by the configured ``reward.custom_reward_function`` or verl's
``default_compute_score`` for its ``data_source``; its extra info carries the same keys (CoNRec's
zeroed, ``acc`` from that scorer, ``conrec_row`` 0), because verl stacks every row's keys. Scoring
runs in the event loop's executor, like verl's managers, so rollouts are not blocked.
"""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import DictConfig, OmegaConf

from verl import DataProto
from verl.experimental.reward_loop.reward_manager import register
from verl.experimental.reward_loop.reward_manager.base import RewardManagerBase

from conrec_verl.plugins.compute_score import DEFAULT_DATA_SOURCES, get_scorer, split_data_sources
from conrec_verl.core.schedule import StageSchedule
from conrec_verl.core.contract import row_context
from conrec_verl.core.scoring import ScoreResult, Scorer
from conrec_verl.core.sid import SID_TOKEN_RE, SidTokenError, SidTokenMap

logger = logging.getLogger(__name__)

NAME = "conrec"


def reward_options(config: Any) -> dict:
    """``config.reward.reward_kwargs`` as a plain dict (empty if absent)."""
    reward = config.get("reward") if hasattr(config, "get") else None
    options = reward.get("reward_kwargs") if reward is not None and hasattr(reward, "get") else None
    if options is None:
        return {}
    if isinstance(options, DictConfig):
        return OmegaConf.to_container(options, resolve=True)
    return dict(options)


def _schedule_of(config: Any) -> StageSchedule | None:
    try:
        algorithm = config.get("algorithm")
        if algorithm is None or algorithm.get("progressive_grpo") is None:
            return None
        return StageSchedule.from_config(algorithm.get("progressive_grpo"))
    except Exception as exc:  # noqa: BLE001 - the estimator reports schedule errors loudly
        logger.warning("conrec reward: cannot read algorithm.progressive_grpo for stage logging: %s", exc)
        return None


@register(NAME)
class ConrecRewardManager(RewardManagerBase):
    """Collaborative negative reward: ``max cos(out, GTS) - gamma * max cos(out, FPS)`` and variants."""

    def __init__(self, config: DictConfig, tokenizer: Any, compute_score: Any = None,
                 reward_router_address: str | None = None, reward_model_tokenizer: Any = None, **kwargs: Any):
        super().__init__(config, tokenizer, compute_score)
        options, self.data_sources = split_data_sources(reward_options(config), where="reward.reward_kwargs")
        self.scorer: Scorer = get_scorer(options, where="reward.reward_kwargs")
        self.other_score = compute_score  # verl's custom_reward_function, else default_compute_score
        self.schedule = _schedule_of(config)
        self.reward_router_address = reward_router_address
        self.reward_model_tokenizer = reward_model_tokenizer
        # Decode keeping special tokens (a tokenizer may register the SID tokens as special ones,
        # which skip_special_tokens=True would delete), then drop the non-SID special tokens.
        specials = getattr(tokenizer, "all_special_tokens", None) or []
        self._strip_tokens = sorted((t for t in specials if t and not SID_TOKEN_RE.fullmatch(t)), key=len,
                                    reverse=True)
        # the token form: SID token ids -> codes; the ids of the special tokens the text form drops
        try:
            self.token_map: SidTokenMap | None = SidTokenMap(tokenizer, self.scorer.codebook.sizes)
        except (SidTokenError, AttributeError, TypeError):
            self.token_map = None  # SIDs are spelled in text: always parse the decoded text
        self._skip_ids = frozenset()
        if self.token_map is not None:
            ids = tokenizer.convert_tokens_to_ids(self._strip_tokens) if self._strip_tokens else []
            unk = getattr(tokenizer, "unk_token_id", None)
            self._skip_ids = frozenset(int(i) for i in ids if i is not None and (i != unk or unk is None))

    def decode(self, token_ids) -> str:
        text = self.tokenizer.decode(token_ids, skip_special_tokens=False)
        for token in self._strip_tokens:
            if token in text:
                text = text.replace(token, "")
        return text

    @classmethod
    def init_class(cls, config: DictConfig, tokenizer: Any):
        """Load the codebook once per process (``get_scorer`` caches it for every instance)."""
        if cls._class_initialized:
            return
        get_scorer(split_data_sources(reward_options(config), where="reward.reward_kwargs")[0],
                   where="reward.reward_kwargs")
        cls._class_initialized = True

    def _context(self, item) -> float:
        """The prompt context of the row (what the dataset rendered it with), else the one the
        schedule trains at the row's step, else 0."""
        value = row_context(item.non_tensor_batch.get("extra_info"))
        if value is not None:
            try:
                return float(value)
            except (TypeError, ValueError):
                pass
        step = item.non_tensor_batch.get("global_steps")
        if self.schedule is not None and step is not None:
            try:
                return float(self.schedule.stage_at(int(step)).context)
            except (TypeError, ValueError):
                pass
        return 0.0

    def parse(self, token_ids) -> tuple:
        """The SID that counts in a response (``None`` if none), from its token ids where they are
        SID and special tokens only, else from its decoded text."""
        tokens = self.token_map.sid_tokens(token_ids, self._skip_ids) if self.token_map is not None else None
        if tokens is not None:
            return self.scorer.parse_sid_tokens(tokens)
        return self.scorer.parse_output(self.decode(token_ids))

    def score_sid(self, codes, ground_truth: Any, context: float = 0.0) -> dict:
        result = self.scorer.score_parsed(codes, ground_truth)
        info = result.as_extra_info()
        info["acc"] = info["exact_hit"]
        info["context"] = float(context)
        info["conrec_row"] = 1.0
        return {"reward_score": float(result.reward), "reward_extra_info": info}

    def score_other(self, data_source: Any, text: str, ground_truth: Any, extra_info: Any) -> dict:
        """A row of another task: verl's naive-manager scoring, CoNRec's extra-info keys zeroed."""
        import inspect

        from verl.utils.reward_score import default_compute_score

        fn = self.other_score or default_compute_score
        if inspect.iscoroutinefunction(fn):
            raise TypeError("conrec reward manager: an async custom_reward_function is not supported for "
                            "rows of other data sources; use verl's naive manager for that task")
        result = fn(data_source=data_source, solution_str=text, ground_truth=ground_truth,
                    extra_info=extra_info if isinstance(extra_info, dict) else {})
        score = float(result["score"] if isinstance(result, dict) else result)
        acc = result.get("acc", score) if isinstance(result, dict) else score
        info = dict(_ZERO_INFO)
        info.update(acc=float(acc), context=0.0, conrec_row=0.0)
        return {"reward_score": score, "reward_extra_info": info}

    async def run_single(self, data: DataProto) -> dict:
        item = data[-1:][0]  # multi-sequence outputs: score the last sequence, like verl's naive manager
        response_ids = item.batch["responses"]
        response_length = response_ids.shape[-1]
        valid_length = int(item.batch["attention_mask"][-response_length:].sum())
        ground_truth = item.non_tensor_batch["reward_model"]["ground_truth"]
        data_source = item.non_tensor_batch.get("data_source", DEFAULT_DATA_SOURCES[0])
        if data_source not in self.data_sources:
            text = self.tokenizer.decode(response_ids[:valid_length], skip_special_tokens=True)
            extra = item.non_tensor_batch.get("extra_info", {})
            return await self.loop.run_in_executor(
                None, lambda: self.score_other(data_source, text, ground_truth, extra))
        token_ids = response_ids[:valid_length].tolist()
        context = self._context(item)
        return await self.loop.run_in_executor(
            None, lambda: self.score_sid(self.parse(token_ids), ground_truth, context))


#: the extra-info keys of a CoNRec row, zeroed (rows of other data sources carry them too)
_ZERO_INFO = {key: 0.0 for key in ScoreResult(reward=0.0, valid=False).as_extra_info()}
