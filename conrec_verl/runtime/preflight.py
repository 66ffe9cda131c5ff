"""Pre-flight checks of a verl config, run in the driver before Ray starts.

A misconfigured verl run usually fails a minute in, deep inside a Ray actor, with a message about
something else (``vllm version None not supported`` for a CPU run that names vLLM). These checks
turn the common mistakes of this project's users into one clear error in the first seconds:

* the CPU runtime asked for (``VERL_PLATFORM=cpu`` or ``trainer.device=cpu``) without the other,
  or with a GPU-only rollout;
* an unknown ``actor_rollout_ref.rollout.name``;
* ``progressive_grpo`` without the actor's KL loss, or with ``beta_via: kl_loss`` outside the
  ``conrec_sync`` trainer mode;
* a model folder that does not exist, or whose tokenizer lacks the semantic-ID tokens of the
  codebook the run uses (``reward.reward_kwargs.codebook_path`` or ``data.conrec.data_dir``).

verl calls ``verl.utils.device.auto_set_device(config)`` first thing in ``main_ppo.main``; the
plugin wraps that function (:func:`install`) so the checks run there. They are pure functions of
the config (:func:`check_config`) and are unit-tested without Ray.
"""

from __future__ import annotations

import functools
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
    path = _get(config, "reward.reward_kwargs.codebook_path")
    if path:
        return str(path)
    data_dir = _get(config, "data.conrec.data_dir")
    if data_dir:
        return str(Path(str(data_dir)) / "codebook.npz")
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
    if rollout:
        from verl.workers.rollout.base import _ROLLOUT_REGISTRY

        known = sorted({name for name, _mode in _ROLLOUT_REGISTRY})
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


def install() -> None:
    """Wrap ``verl.utils.device.auto_set_device`` so :func:`check_config` runs before Ray starts."""
    import verl.utils.device as device_utils

    original = device_utils.auto_set_device
    if getattr(original, "_conrec_preflight", False):
        return

    @functools.wraps(original)
    def auto_set_device(config) -> None:
        original(config)
        if os.environ.get("CONREC_SKIP_PREFLIGHT", "") != "1":
            check_config(config)

    auto_set_device._conrec_preflight = True
    device_utils.auto_set_device = auto_set_device


install()
