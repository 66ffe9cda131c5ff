"""Semantic-ID dataset adapter for verl (``data.custom_cls``), with the progressive context curriculum.

Select it with::

    data:
      custom_cls: {path: pkg://conrec_verl.plugins.dataset, name: ConrecSidDataset}
      shuffle: false                           # required: the adapter orders and shuffles itself
      train_files: <data_dir>/rl/train.parquet
      val_files: <data_dir>/rl/val.parquet
      conrec:
        schedule: ${algorithm.progressive_grpo}  # the one schedule everything reads
        val_context: 3                           # prompt context of validation rows
    trainer: {total_epochs: 1}                 # one pass over the curriculum = the schedule

It reads the RL parquet written by data_prep (``docs/data-format.md``: ``hist_neg_recent``,
``hist_neg``, ``hist_pos``, ``reward_model``, ...) and re-renders every prompt with
:func:`conrec_verl.core.prompts.render_history_prompt` for the prompt context of its stage
(1 = last-3-days negatives, 2 = all negatives, 3 = negatives + positives), dropping the oldest
history first until the chat-templated prompt fits ``data.max_prompt_length`` tokens (the
instruction is never cut).

Curriculum design (verl 0.9.1 has no curriculum sampler). Training files: ``len(dataset) =
total_steps * data.train_batch_size`` and position ``i`` is trained at step
``i // train_batch_size + 1`` (verl's ``SequentialSampler`` with ``data.shuffle=false`` and
``drop_last``), so it renders the row that :class:`conrec_verl.core.schedule.CurriculumOrder`
assigns to that position, for the context of that step's stage. A stage draws only rows that
its context can show with a non-empty negative section, and (``data.conrec.stage_rows:
assigned``, the default) only the rows data_prep assigned to that context (``extra_info.context``);
``stage_rows: eligible`` lets every stage draw every eligible row. ``data.conrec.row_weights``: a
folder of cross-stage cleaning decisions (:mod:`conrec_verl.core.cleaning`; the pipeline writes
them) that re-weight the rows of the stages they name. Rows are shuffled within each
stage with ``data.seed``. Everything is a pure function of the position, so the stateful
dataloader's restored position after a resume yields exactly the prompts of the resumed step's
stage. Validation files (``data_files == data.val_files``), or ``data.conrec.mode: fixed``: one
item per row, rendered for ``val_context`` (validation) / ``context`` (fixed); their old names
``val_stage`` / ``stage`` are still accepted.

Limits: DAPO-style group filtering with refill draws extra prompts and shifts the step alignment;
``trainer.total_training_steps`` larger than the schedule starts a second pass from stage 1 (the
adapter logs ``total_steps``; set ``data.conrec.total_steps`` to match).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow.parquet as pq
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from verl.utils.dataset.rl_dataset import RLHFDataset

from conrec_verl.core.contract import HISTORY_COLUMNS, GroundTruth, GroundTruthError, missing_rl_columns, renamed_option, row_context
from conrec_verl.core.prompts import chat_prompt_length, render_history_prompt
from conrec_verl.core.cleaning import CleaningError, load_row_weights
from conrec_verl.core.schedule import CONTEXTS, CurriculumOrder, ScheduleError, StageSchedule, rows_by_context
from conrec_verl.core.sid import SID_TOKEN_RE, parse_sid

logger = logging.getLogger(__name__)

#: the ground-truth lists whose SIDs must be tokens of the model (GTS and FPS)
GROUND_TRUTH_SID_KEYS = ("future_neg", "swing", "future_pos")
MODES = ("auto", "curriculum", "fixed")


class ConrecDataError(ValueError):
    """The RL parquet, its SIDs or the adapter config cannot be used."""


#: ``data.conrec`` keys renamed to the one vocabulary (a context is what a prompt shows, a stage a
#: position in the schedule): old name -> new name, both accepted
CONTEXT_KEY_ALIASES = {"val_stage": "val_context", "stage": "context"}


def _context_option(cfg: Mapping[str, Any], key: str) -> Any:
    """``data.conrec.<key>`` (default 3), also under its old name; both given and different is an error."""
    old = next(o for o, n in CONTEXT_KEY_ALIASES.items() if n == key)
    try:
        return renamed_option(cfg, key, old, default=3, where="data.conrec.")
    except ValueError as exc:
        raise ConrecDataError(str(exc)) from None


def _plain(value: Any) -> Any:
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _file_list(files: Any) -> list[str]:
    files = _plain(files)
    if files is None:
        return []
    if isinstance(files, str):
        return [files]
    return [str(f) for f in files]


def _same_files(a: Sequence[str], b: Sequence[str]) -> bool:
    norm = lambda fs: [os.path.abspath(os.path.expanduser(f)) for f in fs]  # noqa: E731
    return bool(a) and norm(a) == norm(b)


class ConrecSidDataset(RLHFDataset):
    """RL prompts in SID tokens, rendered per progressive stage (see module docstring)."""

    def __init__(self, data_files: str | list[str], tokenizer: Any, config: DictConfig, processor: Any = None,
                 max_samples: int = -1, **kwargs: Any):
        self._conrec_source_files = _file_list(data_files)
        conrec_cfg = _plain(config.get("conrec")) if config.get("conrec") is not None else {}
        if not isinstance(conrec_cfg, dict):
            raise ConrecDataError(f"data.conrec must be a mapping, got {conrec_cfg!r}")
        self.conrec_cfg = conrec_cfg
        known = {"schedule", "val_context", "context", "mode", "total_steps", "check_sid_tokens", "stage_rows",
                 "row_weights", *CONTEXT_KEY_ALIASES}
        unknown = sorted(set(conrec_cfg) - known)
        if unknown:
            raise ConrecDataError(f"data.conrec: unknown key(s) {unknown}; known: {sorted(known)}")
        super().__init__(data_files=data_files, tokenizer=tokenizer, config=config, processor=processor,
                         max_samples=max_samples)

    # -- loading ----------------------------------------------------------------------------------
    def _read_files_and_tokenize(self):
        rows: list[dict] = []
        for source, local in zip(self._conrec_source_files, self.data_files):
            rows.extend(self._read_one(source, local))
        if not rows:
            raise ConrecDataError(f"no rows in {self._conrec_source_files}")
        if self.max_samples is not None and 0 < self.max_samples < len(rows):
            if self.shuffle:
                rng = np.random.default_rng(*((self.seed,) if self.seed is not None else ()))
                keep = sorted(rng.choice(len(rows), size=self.max_samples, replace=False).tolist())
            else:
                keep = range(self.max_samples)
            rows = [rows[i] for i in keep]
        self.dataframe = rows
        self._setup_mode()
        self._check_instruction_fits()

    def _read_one(self, source: str, local: str) -> list[dict]:
        if not str(local).endswith(".parquet"):
            raise ConrecDataError(f"{source}: the SID dataset adapter reads .parquet files only")
        try:
            table = pq.read_table(local)
        except Exception as exc:  # noqa: BLE001 - name the file
            raise ConrecDataError(f"{source}: cannot read parquet ({exc})") from exc
        missing = missing_rl_columns(table.column_names)
        if missing:
            raise ConrecDataError(
                f"{source}: missing column(s) {missing} needed by the SID dataset adapter "
                f"(see docs/data-format.md); the file has {table.column_names}"
            )
        records = table.to_pylist()
        vocab = self._sid_vocab() if self.conrec_cfg.get("check_sid_tokens", True) else None
        out = []
        for i, rec in enumerate(records):
            row = {"data_source": rec.get("data_source") or "conrec",
                   "ability": rec.get("ability") or "negative_recommendation",
                   "extra_info": dict(rec.get("extra_info") or {})}
            for col in HISTORY_COLUMNS:
                value = rec.get(col)
                value = [] if value is None else value
                if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
                    raise ConrecDataError(f"{source}: column {col!r}, row {i}: expected a list of SID strings, "
                                          f"got {value!r:.120}")
                for s in value:
                    self._check_sid(s, vocab, source, col, i)
                row[col] = value
            rm = rec.get("reward_model")
            if not isinstance(rm, dict) or "ground_truth" not in rm:
                raise ConrecDataError(f"{source}: column 'reward_model', row {i}: expected "
                                      f"{{style, ground_truth}}, got {rm!r:.120}")
            gt = rm["ground_truth"]
            try:
                parsed = GroundTruth.parse(gt)
            except GroundTruthError as exc:
                raise ConrecDataError(f"{source}: column 'reward_model.ground_truth', row {i}: {exc}") from None
            for key in GROUND_TRUTH_SID_KEYS:
                for s in getattr(parsed, key):
                    self._check_sid(s, vocab, source, f"reward_model.ground_truth.{key}", i)
            row["reward_model"] = {"style": rm.get("style") or "rule", "ground_truth": gt}
            out.append(row)
        return out

    def _sid_vocab(self):
        tok = self.tokenizer
        if tok is None:
            return None
        vocab = set(tok.get_vocab())
        # added tokens are in get_vocab() for fast tokenizers; include them explicitly anyway
        vocab.update(getattr(tok, "added_tokens_encoder", {}) or {})
        return vocab

    @staticmethod
    def _check_sid(s: Any, vocab, source: str, column: str, row: int) -> None:
        if not isinstance(s, str) or parse_sid(s) is None:
            raise ConrecDataError(f"{source}: column {column!r}, row {row}: {s!r} is not a SID string "
                                  "like '<a_3><b_17><c_0>'")
        if vocab is None:
            return
        for match in SID_TOKEN_RE.finditer(s):
            if match.group(0) not in vocab:
                raise ConrecDataError(
                    f"{source}: column {column!r}, row {row}: SID {s} uses token {match.group(0)} that the "
                    "tokenizer does not know; build the model with the codebook's SID tokens "
                    "(conrec_verl.model_builder: save_tiny_model / extend_model_with_sid_tokens)"
                )

    # -- curriculum -------------------------------------------------------------------------------
    def _setup_mode(self) -> None:
        cfg = self.conrec_cfg
        mode = cfg.get("mode", "auto") or "auto"
        if mode not in MODES:
            raise ConrecDataError(f"data.conrec.mode must be one of {MODES}, got {mode!r}")
        is_val = _same_files(self._conrec_source_files, _file_list(self.config.get("val_files"))) and not \
            _same_files(self._conrec_source_files, _file_list(self.config.get("train_files")))
        schedule_cfg = cfg.get("schedule")
        self.order: CurriculumOrder | None = None
        self.fixed_context: int | None = None
        if mode == "fixed" or (mode == "auto" and (is_val or schedule_cfg is None)):
            key = "val_context" if is_val else "context"
            context = _context_option(cfg, key)
            if context not in CONTEXTS:
                raise ConrecDataError(f"data.conrec.{key} must be one of {CONTEXTS}, got {context!r}")
            self.fixed_context = int(context)
            if mode == "auto" and not is_val and schedule_cfg is None:
                logger.warning("ConrecSidDataset: no data.conrec.schedule; rendering every training row for "
                               "context %s (no curriculum)", self.fixed_context)
            return
        if schedule_cfg is None:
            raise ConrecDataError("data.conrec.mode=curriculum needs data.conrec.schedule "
                                  "(e.g. schedule: ${algorithm.progressive_grpo})")
        if self.config.get("shuffle", False):
            raise ConrecDataError(
                "data.shuffle must be false with the curriculum: verl's RandomSampler would mix stages. "
                "The adapter shuffles rows within each stage itself (seeded by data.seed)."
            )
        schedule = StageSchedule.from_config(schedule_cfg, where="data.conrec.schedule")
        batch_size = self.config.get("train_batch_size")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConrecDataError(f"data.train_batch_size must be a positive integer, got {batch_size!r}")
        seed = self.config.get("seed")
        try:
            row_weights = load_row_weights(cfg.get("row_weights"))
            self.order = CurriculumOrder(schedule, n_rows=len(self.dataframe), batch_size=batch_size,
                                         seed=0 if seed is None else int(seed), total_steps=cfg.get("total_steps"),
                                         rows_by_context=self._rows_by_context(cfg.get("stage_rows", "assigned")),
                                         row_weights=row_weights)
        except (ScheduleError, CleaningError) as exc:
            raise ConrecDataError(f"{', '.join(self._conrec_source_files)}: {exc}") from None
        logger.info("ConrecSidDataset: curriculum over %d steps x %d prompts, stage boundaries at steps %s, "
                    "rows per stage %s", self.order.total_steps, batch_size, schedule.boundaries,
                    [self.order.stage_rows(st) for st in schedule.stages])
        if row_weights:
            print(f"[conrec] cross-stage cleaning: row weights for stage(s) {sorted(row_weights)} from "
                  f"{cfg.get('row_weights')} ({ {k: len(v) for k, v in sorted(row_weights.items())} } rows re-weighted)",
                  flush=True)

    def _rows_by_context(self, how: str) -> dict[int, list[int]]:
        """Which rows each context's stage may draw (:func:`conrec_verl.core.schedule.rows_by_context`,
        the rule cross-stage cleaning screens by too)."""
        rows = self.dataframe
        assigned = [row_context(r.get("extra_info")) for r in rows] if how == "assigned" else None
        return rows_by_context([len(r["hist_neg_recent"] or ()) for r in rows], [len(r["hist_neg"] or ()) for r in rows],
                               assigned, how=how, where=", ".join(self._conrec_source_files))

    # -- rendering --------------------------------------------------------------------------------
    def prompt_length(self, text: str) -> int:
        return chat_prompt_length(self.tokenizer, text, self.apply_chat_template_kwargs)

    def _fits(self, text: str) -> bool:
        return self.prompt_length(text) <= self.max_prompt_length

    def _check_instruction_fits(self) -> None:
        empty = render_history_prompt(3, [], [], [])
        n = self.prompt_length(empty)
        if n > self.max_prompt_length:
            raise ConrecDataError(f"data.max_prompt_length={self.max_prompt_length} is smaller than the prompt "
                                  f"with empty histories ({n} tokens); raise it")

    def render(self, row: Mapping[str, Any], context: int) -> str:
        return render_history_prompt(context, row["hist_neg_recent"], row["hist_neg"], row["hist_pos"],
                                     fits=self._fits)

    def locate(self, item: int) -> tuple[int, int, int | None, int | None]:
        """``(row, context, stage_index, step)`` of dataset position ``item``."""
        if self.order is None:
            if not 0 <= item < len(self.dataframe):
                raise IndexError(item)
            return item, self.fixed_context, None, None
        row, stage, step = self.order.locate(item)
        return row, stage.context, stage.index, step

    def __getstate__(self):
        # RLHFDataset drops its rows when pickled (and re-reads them on resume); dataloader worker
        # processes started with "spawn" would then have no rows. Ours are plain lists: keep them.
        return self.__dict__.copy()

    def __len__(self):
        return len(self.order) if self.order is not None else len(self.dataframe)

    def __getitem__(self, item):
        row_index, context, stage_index, step = self.locate(int(item))
        row = self.dataframe[row_index]
        messages = [{"role": "user", "content": self.render(row, context)}]
        extra_info = dict(row["extra_info"])
        extra_info.pop("stage", None)  # the old name of the field, in folders written before it was renamed
        extra_info.update(context=context, conrec_row=row_index)
        if stage_index is not None:
            extra_info.update(stage_index=stage_index, conrec_step=step)
        index = extra_info.get("index", row_index)
        return {
            "data_source": row["data_source"],
            "prompt": messages,
            "ability": row["ability"],
            "reward_model": dict(row["reward_model"]),
            "extra_info": extra_info,
            "raw_prompt": messages,
            "dummy_tensor": torch.tensor([0], dtype=torch.uint8),
            "index": index,
            "tools_kwargs": extra_info.get("tools_kwargs", {}),
            "interaction_kwargs": extra_info.get("interaction_kwargs", {}),
        }
