"""Compose verl configs with their overrides in a child process, as the trainers will see them.

The pipeline launcher lives for the whole run beside the trainers and must not import torch or
verl (hydra's ``pkg://verl.trainer.config`` search path imports verl), so it asks this module:

    echo '{"grpo": {"config_dir": "...", "config_name": "conrec_cpu_tiny", "overrides": [...]}}' \\
        | python -m conrec_verl.runtime.compose

prints one JSON line ``{"grpo": {"ok": true, "config": {...}}}`` (the resolved config) or
``{"grpo": {"ok": false, "error": "<Hydra's message>"}}`` per request. A bad override, an unknown
key or a value of the wrong type is reported here, before the pipeline's first phase starts.
"""

from __future__ import annotations

import json
import logging
import sys
import warnings


def compose_one(config_dir: str, config_name: str, overrides: list[str]) -> dict:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    try:
        with initialize_config_dir(config_dir=config_dir, version_base=None):
            cfg = compose(config_name=config_name, overrides=list(overrides))
        return {"ok": True, "config": OmegaConf.to_container(cfg, resolve=True)}
    except Exception as exc:  # noqa: BLE001 - every composition error is reported, not raised
        lines = [line for line in str(exc).strip().splitlines() if line.strip()]
        return {"ok": False, "error": " ".join(lines[:3]) or type(exc).__name__}


def main() -> int:
    requests = json.loads(sys.stdin.read() or "{}")
    logging.disable(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # importing verl's config package warns about optional engines
        out = {name: compose_one(r["config_dir"], r["config_name"], r.get("overrides", []))
               for name, r in requests.items()}
    sys.stdout.write("\n" + json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
