"""Pre-flight checks of a verl config, run in the driver before Ray starts.

A misconfigured verl run usually fails a minute in, deep inside a Ray actor, with a message about
something else (``vllm version None not supported`` for a CPU run that names vLLM). These checks
turn the common mistakes of this project's users into one clear error in the first seconds:

* the CPU runtime asked for (``VERL_PLATFORM=cpu`` or ``trainer.device=cpu``) without the other,
  or with a GPU-only rollout;
* an unknown ``actor_rollout_ref.rollout.name``;
* a Ray cluster address (``ray_kwargs.ray_init.address``) with the single-node loopback setting;
* ``progressive_grpo`` without the actor's KL loss, or with ``beta_via: kl_loss`` outside the
  ``conrec_sync`` trainer mode;
* a model folder that does not exist, or whose tokenizer lacks the semantic-ID tokens of the
  codebook the run uses (the reward's ``codebook_path`` or ``<data_dir>/codebook.npz``);
* the CoNRec reward selected (``reward.reward_manager.name=conrec`` or
  ``reward.custom_reward_function.path=pkg://conrec_verl.plugins.compute_score``) with reward options it
  does not know, a codebook it cannot load, or training rows without a usable CoNRec ground truth
  (the first ``CONREC_PREFLIGHT_ROWS`` rows of every ``data.train_files``, default 256): one
  message naming the file, the row and the missing field, instead of an error after Ray started
  and the first batch was rolled out.

verl calls ``verl.utils.device.auto_set_device(config)`` first thing in ``main_ppo.main``; the
plugin wraps that function (:func:`install`) so the checks run there, on the configuration as the
user wrote it (before verl's ``auto_set_device`` rewrites ``trainer.device`` for the detected
accelerator). They are pure functions of the config (:func:`check_config`), unit-tested without
Ray and through a real ``main_ppo`` start (``tests/runtime/test_preflight.py``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

GPU_ONLY_ROLLOUTS = ("vllm", "sglang", "trtllm")


class ConfigError(ValueError):
    """A verl config that cannot work; the message says which key to change."""


def _get(config, dotted: str, default=None):
    node = config
    for part in dotted.split("."):
        if node is None:
            return default
        try:
            node = node.get(part) if hasattr(node, "get") else getattr(node, part, None)
        except Exception:  # noqa: BLE001 - missing interpolations etc.
            return default
    return default if node is None else node


def _codebook_path(config) -> str | None:
    """The codebook of the CoNRec reward's options, found as the reward finds it
    (``compute_score.resolve_codebook_path``: ``codebook_path``, else ``<data_dir>/codebook.npz``)."""
    from conrec_verl.plugins.compute_score import resolve_codebook_path
    from conrec_verl.core.reward import ScoringConfigError

    try:
        found = conrec_reward_options(config)
    except ConfigError:
        found = None
    options = dict(found[1]) if found else {}
    options["codebook_path"] = options.get("codebook_path") or _get(config, "reward.reward_kwargs.codebook_path")
    try:
        return resolve_codebook_path(options)
    except ScoringConfigError:
        return None


def check_progressive_grpo(config) -> None:
    """``progressive_grpo`` sets a KL weight per stage: it needs the actor's KL loss, and with
    ``beta_via: kl_loss`` (default) the ``conrec_sync`` trainer mode that applies it."""
    if str(_get(config, "algorithm.adv_estimator", "") or "") != "progressive_grpo":
        return
    if not bool(_get(config, "actor_rollout_ref.actor.use_kl_loss", False)):
        raise ConfigError(
            "algorithm.adv_estimator=progressive_grpo sets the KL weight per stage, but "
            "actor_rollout_ref.actor.use_kl_loss is false (no KL term to weight): set it to true")
    via = str(_get(config, "algorithm.progressive_grpo.beta_via", "kl_loss") or "kl_loss")
    mode = str(_get(config, "trainer.v1.trainer_mode", "") or "")
    if via == "kl_loss" and mode != "conrec_sync":
        raise ConfigError(
            f"algorithm.progressive_grpo.beta_via=kl_loss applies each stage's beta through the conrec_sync "
            f"trainer mode, but trainer.v1.trainer_mode={mode or 'unset'}: set trainer.v1.trainer_mode=conrec_sync "
            "(or +algorithm.progressive_grpo.beta_via=advantage_scale)")


COMPUTE_SCORE_MODULE = "conrec_verl.plugins.compute_score"


def conrec_reward_options(config) -> tuple[str, dict] | None:
    """``(config key, options)`` of the CoNRec reward when the run uses it (as the ``conrec`` reward
    manager or as ``compute_score`` under verl's manager), else None."""
    from omegaconf import DictConfig, OmegaConf

    def plain(node):
        return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})

    if str(_get(config, "reward.reward_manager.name", "") or "") == "conrec":
        return "reward.reward_kwargs", plain(_get(config, "reward.reward_kwargs"))
    path = str(_get(config, "reward.custom_reward_function.path", "") or "")
    module_path = path[len("pkg://"):] if path.startswith("pkg://") else None
    if module_path == COMPUTE_SCORE_MODULE or path.replace(os.sep, "/").endswith("conrec_verl/plugins/compute_score.py"):
        name = str(_get(config, "reward.custom_reward_function.name", "") or "")
        if name != "compute_score":
            raise ConfigError(f"reward.custom_reward_function.name={name!r}: {COMPUTE_SCORE_MODULE} defines "
                              "compute_score; set reward.custom_reward_function.name=compute_score")
        return "reward.custom_reward_function.reward_kwargs", plain(
            _get(config, "reward.custom_reward_function.reward_kwargs"))
    return None


def _train_files(config) -> list[str]:
    files = _get(config, "data.train_files")
    if files is None:
        return []
    return [str(files)] if isinstance(files, str) else [str(f) for f in files]


def check_reward_data(config, max_rows: int | None = None) -> None:
    """The CoNRec reward can score this run: its options are valid, its codebook loads, and the first
    ``max_rows`` rows of every training file carry a ground truth it can use (a JSON object whose
    targets hold at least one SID of the codebook, of the build the codebook was made for, unless the
    reward option ``empty_targets: zero`` allows rows without one)."""
    found = conrec_reward_options(config)
    if found is None:
        return
    where, options = found
    from conrec_verl.plugins.compute_score import DEFAULT_DATA_SOURCES, VERL_CALL_KWARGS, get_scorer, split_data_sources
    from conrec_verl.core.contract import GroundTruthError
    from conrec_verl.core.reward import ScoringConfigError

    for key in VERL_CALL_KWARGS:
        options.pop(key, None)
    try:
        options, sources = split_data_sources(options, where=where)
        scorer = get_scorer(options, where=where)
    except (ScoringConfigError, OSError, ValueError) as exc:
        raise ConfigError(f"the CoNRec reward ({where}): {exc}") from None
    limit = int(max_rows if max_rows is not None else os.environ.get("CONREC_PREFLIGHT_ROWS", "256"))
    for path in _train_files(config):
        if not path.endswith(".parquet") or not os.path.isfile(path):
            continue  # verl reports missing files itself; other formats are not read here
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except Exception as exc:  # noqa: BLE001 - name the file
            raise ConfigError(f"{path}: cannot read parquet ({exc})") from None
        if "reward_model" not in pf.schema_arrow.names:
            raise ConfigError(f"{path}: no column 'reward_model', but the CoNRec reward ({where}) reads "
                              "reward_model.ground_truth of every row (docs/data-format.md; python -m conrec_verl.data_prep "
                              "writes it)")
        seen = ours = 0
        has_source = "data_source" in pf.schema_arrow.names
        columns = ["reward_model", "data_source"] if has_source else ["reward_model"]
        for batch in pf.iter_batches(batch_size=min(limit, 1024), columns=columns):
            data_sources = batch.column("data_source").to_pylist() if has_source else [None] * batch.num_rows
            for rm, source in zip(batch.column("reward_model").to_pylist(), data_sources):
                if (source or DEFAULT_DATA_SOURCES[0]) not in sources:  # the reward manager's default too
                    seen += 1  # another task's row: verl's own scorer takes it
                    if seen >= limit:
                        break
                    continue
                ours += 1
                gt = rm.get("ground_truth") if isinstance(rm, dict) else None
                field = "reward_model.ground_truth"
                try:
                    if gt is None:
                        raise GroundTruthError("missing")
                    scorer.targets(gt)  # no usable target is an error unless empty_targets: zero
                except GroundTruthError as exc:
                    raise ConfigError(f"{path}: row {seen}: column '{field}': {exc}; the CoNRec reward ({where}) "
                                      "needs the ground truth data_prep writes (docs/data-format.md)") from None
                seen += 1
                if seen >= limit:
                    break
            if seen >= limit:
                break
        if seen and not ours and not has_source:
            raise ConfigError(f"{path}: no data_source column, so every row counts as {DEFAULT_DATA_SOURCES[0]!r}, "
                              f"which is not in {where}.data_sources={list(sources)}: the CoNRec reward would score "
                              "none of them (add the column or list the source)")


def check_config(config, platform: str | None = None) -> None:
    """Raise :class:`ConfigError` for the first misconfiguration found."""
    platform = (platform if platform is not None else os.environ.get("VERL_PLATFORM", "")).strip().lower()
    device = str(_get(config, "trainer.device", "") or "").lower()
    rollout = str(_get(config, "actor_rollout_ref.rollout.name", "") or "")

    if device == "cpu" and platform != "cpu":
        raise ConfigError(
            "trainer.device=cpu needs the CPU platform: export VERL_PLATFORM=cpu VERL_ENGINE_DEVICE=cuda "
            "(see conrec_verl.runtime.cpu_platform.cpu_env) before running main_ppo"
        )
    if platform == "cpu":
        if device and device != "cpu":
            raise ConfigError(f"VERL_PLATFORM=cpu but trainer.device={device}: set trainer.device=cpu")
        if os.environ.get("VERL_ENGINE_DEVICE", "") != "cuda":
            raise ConfigError(
                "VERL_PLATFORM=cpu also needs VERL_ENGINE_DEVICE=cuda (verl registers its FSDP engine for "
                "cuda/npu only; the variable picks the engine class, tensors stay on the CPU)"
            )
        if rollout in GPU_ONLY_ROLLOUTS:
            raise ConfigError(
                f"actor_rollout_ref.rollout.name={rollout} needs a GPU, but VERL_PLATFORM=cpu selects the CPU "
                "runtime: use actor_rollout_ref.rollout.name=hf (or unset VERL_PLATFORM on a GPU machine)"
            )
    check_ray_address(config)
    if rollout:
        from conrec_verl.runtime.verl_compat import known_rollouts

        known = known_rollouts()
        if rollout not in known:
            raise ConfigError(f"unknown actor_rollout_ref.rollout.name={rollout!r}; registered rollouts: {known}")

    check_progressive_grpo(config)

    model_path = _get(config, "actor_rollout_ref.model.path")
    if model_path and not str(model_path).startswith(("hdfs://", "s3://")):
        local = Path(os.path.expanduser(str(model_path)))
        # a hub id is "name" or "org/name": anything else (absolute, ./, ~, two or more "/") is a folder
        text = str(model_path)
        looks_local = (local.is_absolute() or text.startswith((".", "~")) or text.rstrip("/").count("/") >= 2
                       or local.exists())
        if looks_local and not local.exists():
            raise ConfigError(f"actor_rollout_ref.model.path={model_path} does not exist")
        book_path = _codebook_path(config)
        if local.exists() and book_path:
            check_model_has_sid_tokens(local, book_path)

    check_reward_data(config)


def check_ray_address(config) -> None:
    """A Ray cluster address with the single-node loopback setting of ``cpu_env()``
    (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``): the driver would take 127.0.0.1 as its node IP and
    announce it to a cluster whose other nodes cannot reach it (docs/security.md, "Multi-node")."""
    address = str(_get(config, "ray_kwargs.ray_init.address", "") or "")
    if address and address != "local" and os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0":
        raise ConfigError(
            f"ray_kwargs.ray_init.address={address} reaches a Ray cluster, but RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 "
            "(the single-node loopback setting of cpu_env()) makes this driver listen on 127.0.0.1 only: pass the "
            "address as RAY_ADDRESS instead (cpu_env() then leaves the setting out), or set "
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1; see docs/security.md"
        )


def check_model_has_sid_tokens(model_path, codebook_path) -> None:
    from transformers import AutoTokenizer

    from conrec_verl.core.sid import Codebook
    from conrec_verl.model_builder import MissingSidTokensError, check_sid_tokens

    book = Codebook.load(codebook_path)
    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    try:
        check_sid_tokens(tokenizer, book.sizes, where=f"the tokenizer of {model_path}")
    except MissingSidTokensError as exc:
        raise ConfigError(str(exc)) from exc


def _check_unless_skipped(config) -> None:
    if os.environ.get("CONREC_SKIP_PREFLIGHT", "") != "1":
        check_config(config)


def install() -> None:
    """Run :func:`check_config` on the config as the user wrote it, before verl's
    ``auto_set_device`` rewrites it and before Ray starts (``verl_compat.wrap_auto_set_device``)."""
    from conrec_verl.runtime import verl_compat

    verl_compat.wrap_auto_set_device(_check_unless_skipped)


install()
