"""Every place conrec-verl adapts verl 0.9.1 at run time, in one module.

verl 0.9.1 has no hook for a few things CoNRec needs. Each adaptation is one :class:`Adaptation`
in :data:`ADAPTATIONS` with

- ``still_needed()``: a probe of the installed verl that returns False once verl has the hook we
  would upstream (``docs/upstream.md`` lists the same adaptations, in the same order, with the
  minimal verl change each needs). ``tests/runtime/test_verl_compat.py`` asserts every probe is True, so
  that test fails on the verl release that makes an adaptation unnecessary;
- where the code is: the runtime patches themselves live here (the functions below); the
  adaptations that are overrides in our own subclasses (the trainer mode, the SID dataset) stay in
  their class and are listed here so the list is complete.

Guard: every patch goes through :func:`guard`. On verl ``0.9.1`` (the pinned version) it applies.
On another version a patch whose probe says verl no longer needs it is skipped; one still needed is
applied with one warning naming the adaptation and the version (pyproject pins ``verl==0.9.1``).
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys
from dataclasses import dataclass
from typing import Callable

logger = logging.getLogger(__name__)

#: the verl release every adaptation below was written and tested against
PINNED_VERL = "0.9.1"


@dataclass(frozen=True)
class Adaptation:
    name: str
    what: str
    where: str
    still_needed: Callable[[], bool]


def _source(obj) -> str:
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):
        return ""


# -- probes: True while the installed verl still lacks the hook ------------------------------------

def _needs_poll_interval() -> bool:
    from verl.trainer.ppo.v1.trainer_base import PPOTrainer

    return "poll_interval" not in _source(PPOTrainer._build_replay_buffer)


def _needs_global_step() -> bool:
    from verl.trainer.ppo.v1.trainer_base import PPOTrainer

    src = _source(PPOTrainer._compute_advantage)
    return "global_step" not in src


def _needs_kl_schedule() -> bool:
    from verl.workers.config.actor import ActorConfig

    hint = ActorConfig.__annotations__.get("kl_loss_coef")
    return hint in (float, "float")


def _needs_metrics_hook() -> bool:
    from verl.trainer.ppo.v1 import trainer_base

    return ("reward_extra" not in _source(trainer_base.PPOTrainer._compute_metrics)
            and not hasattr(trainer_base, "register_metrics_fn"))


def _needs_trainer_mode_property() -> bool:
    from verl.trainer.ppo.v1 import trainer_base

    return 'self.trainer_mode == "sync"' in _source(trainer_base)


def _needs_rollout_registry_write() -> bool:
    from verl.workers.rollout import base

    return hasattr(base, "_ROLLOUT_REGISTRY") and not hasattr(base, "register_rollout")


def _needs_preflight_wrap() -> bool:
    from verl.trainer import main_ppo

    src = _source(main_ppo)
    return "auto_set_device(config)" in src and "check_config" not in src


def _needs_backend_normaliser() -> bool:
    from verl.utils import distributed

    return 'f"cpu:gloo,{get_device_name()}:{get_nccl_backend()}"' in _source(distributed)


def _needs_unpinned_offload() -> bool:
    from verl.workers.engine.fsdp import transformer_impl

    return "CPUOffloadPolicy(pin_memory=True)" in _source(transformer_impl)


def _needs_dataset_overrides() -> bool:
    from verl.utils.dataset.rl_dataset import RLHFDataset

    return not hasattr(RLHFDataset, "load_rows")


def _needs_sft_epoch_resume() -> bool:
    from verl.trainer.sft_trainer import SFTTrainer
    from verl.utils.checkpoint.checkpoint_handler import CheckpointHandler

    return ("global_step // self.steps_per_epoch" in _source(SFTTrainer.fit)
            and "steps_per_epoch" not in _source(CheckpointHandler._load_dataloader_state)
            and "% len(self.train_dataloader)" not in _source(CheckpointHandler._load_dataloader_state))


ADAPTATIONS: dict[str, Adaptation] = {a.name: a for a in (
    Adaptation("poll_interval", "the replay buffer's rollout poll interval from trainer.v1.sync.poll_interval",
               "verl_compat.set_poll_interval (ConrecSyncTrainer._build_replay_buffer)", _needs_poll_interval),
    Adaptation("global_step", "the advantage estimator reads the training step from SkipManager.step",
               "verl_compat.global_step (advantage.progressive_grpo)", _needs_global_step),
    Adaptation("stage_kl_coef", "the stage's KL weight sent to the actor with set_loss_fn at each stage change",
               "ConrecSyncTrainer._apply_stage_beta (plugins/trainer_mode.py)", _needs_kl_schedule),
    Adaptation("train_metrics", "reward_extra_info means and the stage logged as training metrics every step",
               "ConrecSyncTrainer._compute_metrics (plugins/trainer_mode.py)", _needs_metrics_hook),
    Adaptation("trainer_mode", "a registered trainer mode that reports 'sync' so verl's branches treat it as sync",
               "ConrecSyncTrainer.trainer_mode (plugins/trainer_mode.py)", _needs_trainer_mode_property),
    Adaptation("rollout_registry", "the hf rollout written into (and pre-flight's rollout check read from) the private _ROLLOUT_REGISTRY",
               "verl_compat.register_rollout, known_rollouts (runtime/hf_rollout.py, preflight.py)", _needs_rollout_registry_write),
    Adaptation("preflight", "pre-flight checks run by wrapping verl.utils.device.auto_set_device",
               "verl_compat.wrap_auto_set_device (runtime/preflight.py)", _needs_preflight_wrap),
    Adaptation("backend_string", "verl's 'cpu:gloo,cpu:gloo' backend string collapsed before init_process_group",
               "verl_compat.install_backend_normaliser (runtime/cpu_platform.py)", _needs_backend_normaliser),
    Adaptation("unpinned_offload", "FSDP2's CPUOffloadPolicy never pins memory on the CPU platform",
               "verl_compat.install_unpinned_cpu_offload (runtime/cpu_platform.py)", _needs_unpinned_offload),
    Adaptation("dataset_rows", "the SID dataset overrides RLHFDataset._read_files_and_tokenize and __getstate__",
               "ConrecSidDataset (plugins/dataset.py)", _needs_dataset_overrides),
    Adaptation("sft_epoch_resume", "an SFT run resumed from a checkpoint at the end of an epoch starts the next epoch "
               "with a fresh dataloader iterator (verl restores the finished one and skips that epoch)",
               "verl_compat.install_sft_epoch_resume (plugins/entry_point.py)", _needs_sft_epoch_resume),
)}


def verl_version() -> str:
    import verl

    return str(getattr(verl, "__version__", "unknown"))


@functools.lru_cache(maxsize=None)
def guard(name: str) -> bool:
    """Whether to apply adaptation ``name`` on the installed verl (once per process)."""
    adaptation = ADAPTATIONS[name]
    version = verl_version()
    if version == PINNED_VERL:
        return True
    if not adaptation.still_needed():
        logger.info("conrec: verl %s has what adaptation %r patched in verl %s; not applied", version, name,
                    PINNED_VERL)
        return False
    logger.warning("conrec: adaptation %r (%s) was written for verl %s, found %s; applied, untested there",
                   name, adaptation.what, PINNED_VERL, version)
    return True


# -- the runtime patches ----------------------------------------------------------------------------

def global_step() -> int:
    """verl's current training step in this process (``SkipManager.step``; -1 before training).
    verl calls advantage estimators without the step (adaptation ``global_step``)."""
    from verl.utils.skip import SkipManager

    return int(SkipManager.step)


def set_poll_interval(replay_buffer, seconds: float):
    """verl 0.9.1's sync trainer builds its replay buffer with a fixed 2 s poll (adaptation
    ``poll_interval``)."""
    if guard("poll_interval") and hasattr(replay_buffer, "poll_interval"):
        replay_buffer.poll_interval = float(seconds)
    return replay_buffer


def register_rollout(name: str, mode: str, class_path: str) -> None:
    """verl 0.9.1 has a public registry for rollout replicas only; the worker-side adapter goes into
    the private ``_ROLLOUT_REGISTRY`` (adaptation ``rollout_registry``)."""
    from verl.workers.rollout import base

    if hasattr(base, "register_rollout"):  # a verl with the public hook
        base.register_rollout(name, mode, class_path)
    elif guard("rollout_registry") and hasattr(base, "_ROLLOUT_REGISTRY"):
        base._ROLLOUT_REGISTRY[(name, mode)] = class_path
    else:
        raise RuntimeError(f"verl {verl_version()} has neither register_rollout nor _ROLLOUT_REGISTRY: "
                           f"cannot register the {name!r} rollout (conrec-verl pins verl=={PINNED_VERL})")


def known_rollouts() -> list[str]:
    """The rollout names verl can build in a worker (pre-flight's check of ``rollout.name``; read
    from the same private registry, adaptation ``rollout_registry``)."""
    from verl.workers.rollout import base

    return sorted({name for name, _mode in getattr(base, "_ROLLOUT_REGISTRY", {})})


def wrap_auto_set_device(check: Callable[[object], None]) -> None:
    """Run ``check(config)`` on the config as the user wrote it, before verl's ``auto_set_device``
    rewrites ``trainer.device`` (the first thing ``main_ppo.main`` does; adaptation ``preflight``)."""
    import verl.utils.device as device_utils

    original = device_utils.auto_set_device
    if getattr(original, "_conrec_preflight", False) or not guard("preflight"):
        return

    @functools.wraps(original)
    def auto_set_device(config) -> None:
        check(config)
        original(config)

    auto_set_device._conrec_preflight = True
    device_utils.auto_set_device = auto_set_device


def normalise_backend(backend):
    """``"cpu:gloo,cpu:gloo"`` -> ``"cpu:gloo"``: drop repeated device types from a backend string."""
    if not isinstance(backend, str) or "," not in backend:
        return backend
    seen: dict[str, str] = {}
    for part in backend.split(","):
        device, _, name = part.partition(":")
        seen.setdefault(device.strip(), name.strip())
    return ",".join(f"{d}:{b}" if b else d for d, b in seen.items())


def install_backend_normaliser() -> None:
    """Wrap ``torch.distributed.init_process_group`` once so verl's backend string, which names the
    CPU twice on the CPU platform, is accepted (adaptation ``backend_string``)."""
    import torch.distributed as dist

    original = dist.init_process_group
    if getattr(original, "_conrec_normalised", False) or not guard("backend_string"):
        return

    def init_process_group(*args, **kwargs):
        if "backend" in kwargs:
            kwargs["backend"] = normalise_backend(kwargs["backend"])
        elif args:
            args = (normalise_backend(args[0]),) + tuple(args[1:])
        return original(*args, **kwargs)

    init_process_group._conrec_normalised = True
    init_process_group.__wrapped__ = original
    dist.init_process_group = init_process_group


def install_unpinned_cpu_offload() -> None:
    """verl's FSDP2 engine gives forward-only models (the reference policy) a
    ``CPUOffloadPolicy(pin_memory=True)``; pinning needs an accelerator. On the CPU platform the
    parameters already live in host memory, so the policy is made to never pin (adaptation
    ``unpinned_offload``)."""
    import torch.distributed.fsdp as fsdp

    original = fsdp.CPUOffloadPolicy
    if getattr(original, "_conrec_unpinned", False) or not guard("unpinned_offload"):
        return

    class UnpinnedCPUOffloadPolicy(original):
        _conrec_unpinned = True

        def __init__(self, pin_memory: bool = False):
            super().__init__(pin_memory=False)

    UnpinnedCPUOffloadPolicy.__name__ = original.__name__
    fsdp.CPUOffloadPolicy = UnpinnedCPUOffloadPolicy
    for name in ("verl.utils.fsdp_utils", "verl.workers.engine.fsdp.transformer_impl"):
        module = sys.modules.get(name)
        if module is not None and getattr(module, "CPUOffloadPolicy", None) is original:
            module.CPUOffloadPolicy = UnpinnedCPUOffloadPolicy


def install_sft_epoch_resume() -> None:
    """verl's SFT trainer saves a checkpoint (with the dataloader's state) after the last batch of
    an epoch; resumed from it, the trainer starts the next epoch (``global_step // steps_per_epoch``)
    but restores the dataloader's finished iterator, so that epoch yields no batch and the run ends
    one epoch short (a run of 8 epochs killed after epoch 2 and resumed trains 7). When the resume
    step is a whole number of epochs, the dataloader's state is not restored: the trainer's
    ``sampler.set_epoch`` then gives the next epoch the order it has in an uninterrupted run
    (adaptation ``sft_epoch_resume``). A resume in the middle of an epoch is left to verl."""
    from verl.utils.checkpoint.checkpoint_handler import CheckpointHandler

    original = CheckpointHandler._load_dataloader_state
    if getattr(original, "_conrec_epoch_resume", False) or not guard("sft_epoch_resume"):
        return

    @functools.wraps(original)
    def _load_dataloader_state(self, checkpoint_path):
        step = int(getattr(self, "resume_global_step", 0) or 0)
        try:
            per_epoch = len(self.train_dataloader)
        except TypeError:  # a loader without a length: leave it to verl
            per_epoch = 0
        if step > 0 and per_epoch > 0 and step % per_epoch == 0:
            logger.info("conrec: resuming at step %d, the end of epoch %d: the next epoch starts with a fresh "
                        "dataloader iterator (adaptation sft_epoch_resume)", step, step // per_epoch)
            return None
        return original(self, checkpoint_path)

    _load_dataloader_state._conrec_epoch_resume = True
    CheckpointHandler._load_dataloader_state = _load_dataloader_state
