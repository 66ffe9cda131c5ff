"""verl swallows plugin import errors, so prove in a fresh interpreter that `import verl` alone
makes every conrec name visible in verl's registries."""

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

PROBE = r"""
import json, verl
from verl.plugin.platform import PlatformRegistry
from verl.workers.rollout.base import _ROLLOUT_REGISTRY
from verl.workers.rollout.replica import RolloutReplicaRegistry
from verl.trainer.ppo import core_algos
import verl.experimental.reward_loop.reward_manager
from verl.experimental.reward_loop.reward_manager import registry as rm_registry
import verl.utils.device as device_utils
print(json.dumps({
    "platforms": list(PlatformRegistry.registered_names()),
    "rollouts": sorted({name for name, _ in _ROLLOUT_REGISTRY}),
    "replicas": sorted(RolloutReplicaRegistry._registry),
    "adv_estimators": sorted(core_algos.ADV_ESTIMATOR_REGISTRY),
    "reward_managers": sorted(rm_registry.REWARD_MANAGER),
    "trainer_modes": sorted(__import__("verl.trainer.ppo.v1.trainer_base", fromlist=["x"]).TRAINER_REGISTRY),
    "preflight": bool(getattr(device_utils.auto_set_device, "_conrec_preflight", False)),
}))
"""


def _probe(env_extra=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("VERL_")}
    env.update(env_extra or {})
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=180,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_entry_point_is_declared():
    names = {ep.name: ep.value for ep in entry_points(group="verl.plugins")}
    assert names.get("conrec") == "conrec_verl.plugins.entry_point"


def test_fresh_import_of_verl_registers_everything():
    seen = _probe()
    assert "cpu" in seen["platforms"]
    assert "hf" in seen["rollouts"] and "hf" in seen["replicas"]
    assert seen["preflight"] is True
    from conrec_verl.plugins.entry_point import EXPECTED_NAMES

    assert set(EXPECTED_NAMES["adv_estimators"]) <= set(seen["adv_estimators"])
    assert set(EXPECTED_NAMES["reward_managers"]) <= set(seen["reward_managers"])
    assert set(EXPECTED_NAMES["trainer_modes"]) <= set(seen["trainer_modes"])
    assert EXPECTED_NAMES["adv_estimators"] and EXPECTED_NAMES["reward_managers"]


def test_plugin_can_be_switched_off():
    seen = _probe({"VERL_USE_EXTERNAL_PLUGINS": "none"})
    assert "cpu" not in seen["platforms"] and "hf" not in seen["rollouts"]


@pytest.mark.parametrize("old, new, name", [("conrec_verl.compute_score", "conrec_verl.plugins.compute_score", "compute_score"),
                                            ("conrec_verl.dataset", "conrec_verl.plugins.dataset", "ConrecSidDataset")])
def test_the_old_adapter_paths_still_load_and_say_where_they_went(old, new, name):
    """Configs written for 0.1 name pkg://conrec_verl.compute_score and pkg://conrec_verl.dataset."""
    code = (f"import warnings, importlib\nwarnings.simplefilter('always')\n"
            f"with warnings.catch_warnings(record=True) as w:\n    old = importlib.import_module({old!r})\n"
            f"new = importlib.import_module({new!r})\n"
            f"assert old.{name} is new.{name}\n"
            f"assert any(x.category is DeprecationWarning and {new!r} in str(x.message) for x in w), [str(x.message) for x in w]\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
