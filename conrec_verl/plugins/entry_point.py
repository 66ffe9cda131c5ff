"""verl plugin entry point (group ``verl.plugins``, name ``conrec``).

``import verl`` imports this module in every process verl starts (driver, task runner, workers).
Importing it registers everything conrec-verl adds to verl's registries:

* platform ``cpu`` (``VERL_PLATFORM=cpu``) -- ``conrec_verl.runtime.cpu_platform``
* rollout ``hf`` (``actor_rollout_ref.rollout.name=hf``) -- ``conrec_verl.runtime.hf_rollout``
* pre-flight config checks before Ray starts -- ``conrec_verl.runtime.preflight``
* reward manager ``conrec`` -- ``conrec_verl.plugins.reward_manager``
* advantage estimator ``progressive_grpo`` -- ``conrec_verl.plugins.advantage``
* v1 trainer mode ``conrec_sync`` (verl's sync trainer + the per-stage KL weight and the stage and
  reward-detail metrics) -- ``conrec_verl.plugins.trainer_mode``

and, on every device, the adaptation ``sft_epoch_resume`` (an SFT run resumed at the end of an
epoch trains every epoch; ``conrec_verl.runtime.verl_compat``).

verl swallows exceptions raised while importing a plugin (they only reach a DEBUG log), so a
broken registration would silently disappear. This module therefore logs every failure at ERROR
level and re-raises, and ``tests/plugins/test_plugin_loading.py`` checks in a fresh interpreter that every
name is visible after ``import verl``.
"""

from __future__ import annotations

import importlib
import logging
import os

logger = logging.getLogger("conrec_verl")

#: Modules whose import registers something with verl, in import order.
REGISTERING_MODULES = (
    "conrec_verl.runtime.cpu_platform",
    "conrec_verl.runtime.hf_rollout",
    "conrec_verl.runtime.preflight",
    "conrec_verl.plugins.reward_manager",
    "conrec_verl.plugins.advantage",
    "conrec_verl.plugins.trainer_mode",
)

#: Names this package adds to verl's registries (checked by tests in a fresh interpreter).
EXPECTED_NAMES = {
    "platforms": ("cpu",),
    "rollouts": ("hf",),
    "adv_estimators": ("progressive_grpo",),
    "reward_managers": ("conrec",),
    "trainer_modes": ("conrec_sync",),
}

_loaded = False


def register_all() -> None:
    """Import every registering module once (idempotent)."""
    global _loaded
    if _loaded:
        return
    for name in REGISTERING_MODULES:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - make verl's silent skip loud
            logger.error("conrec_verl: failed to import plugin module %s: %r", name, exc)
            raise
    _loaded = True


register_all()

# every device: an SFT run resumed at the end of an epoch trains every epoch it was asked for
# (adaptation sft_epoch_resume, conrec_verl.runtime.verl_compat)
from conrec_verl.runtime.verl_compat import install_sft_epoch_resume  # noqa: E402

install_sft_epoch_resume()

# single-node runs (cpu_env()/loopback_env() set this): torch's TCPStore masters on loopback only, on
# any device (the CPU platform installs the same patch; docs/security.md)
if os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0":
    from conrec_verl.runtime.loopback import install_loopback_tcpstore

    install_loopback_tcpstore()
