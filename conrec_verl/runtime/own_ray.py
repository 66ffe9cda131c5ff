"""Whether a ``main_ppo`` run starts a Ray of its own: one rule for every launcher (pure; no verl).

Left to itself, verl's ``ray.init`` attaches to whatever Ray cluster last started on the machine
(another job's, a test's, a ``data_prep engine=ray`` build's) and then refuses verl's ``num_cpus``
for it. So a launcher adds ``++ray_kwargs.ray_init.address=local`` (a fresh Ray for the run, shut
down with it) unless the user points the run at a cluster: ``RAY_ADDRESS`` set, or an override that
names ``ray_kwargs.ray_init.address``.

Readers: ``conrec_verl.pipeline`` (its GRPO phase), ``conrec_verl.smoke --train`` and the recipe
scripts, which call ``python -m conrec_verl.runtime.own_ray [overrides...]``: it prints the override
to add (or nothing).
"""

from __future__ import annotations

import os
import sys
from typing import Iterable, Mapping

OVERRIDE = "++ray_kwargs.ray_init.address=local"


def own_ray_overrides(overrides: Iterable, env: Mapping[str, str] | None = None) -> list[str]:
    """``[OVERRIDE]``, or ``[]`` where ``env`` (default ``os.environ``) has ``RAY_ADDRESS`` or one of
    ``overrides`` names ``ray_init.address``."""
    env = os.environ if env is None else env
    if env.get("RAY_ADDRESS") or any("ray_init.address" in str(o) for o in overrides):
        return []
    return [OVERRIDE]


def main(argv: list[str] | None = None) -> None:
    print(" ".join(own_ray_overrides(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    main()
