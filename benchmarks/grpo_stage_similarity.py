"""Per curriculum stage of a GRPO run: how close the rollouts were to the users' future dislikes
(``sim_gts``, the reward's positive term) and future likes (``sim_fps``, the positive penalty's
term), from the run's console log (``RUN/logs/grpo.log``, the ``conrec_sync`` trainer's
``reward_extra/*/mean`` and ``training/conrec_stage`` metrics).

    python benchmarks/grpo_stage_similarity.py "collab=runs/ml100k" "neg_only=runs/ml100k-grpo_neg_only"

Prints a markdown table: one line per run and stage, the mean over the stage's steps of each
metric, and the first/last step values, so a reader sees whether the positive penalty pushes
outputs away from likes (lower ``sim_fps`` than a run without it).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

KEYS = ("sim_gts", "sim_fps", "exact_hit", "valid_sid", "non_item_sid")
_STEP = re.compile(r"step:(\d+) - (.*)$")


def stage_means(log_text: str) -> dict[int, dict[str, float]]:
    """``{stage: {metric: mean over the stage's steps}}`` (plus ``steps``) from a console log."""
    per_step: dict[int, dict[str, float]] = {}
    for line in log_text.splitlines():
        m = _STEP.search(line)
        if not m or "training/conrec_stage" not in line:
            continue
        vals = {}
        for item in m.group(2).split(" - "):
            key, sep, val = item.partition(":")
            if not sep:
                continue
            try:
                vals[key.strip()] = float(re.sub(r"^np\.\w+\((.*)\)$", r"\1", val.strip()))
            except ValueError:
                continue
        per_step[int(m.group(1))] = vals
    out: dict[int, dict[str, float]] = {}
    for step in sorted(per_step):
        vals = per_step[step]
        stage = int(vals.get("training/conrec_stage", 0))
        acc = out.setdefault(stage, {"steps": 0.0})
        acc["steps"] += 1
        for k in KEYS:
            v = vals.get(f"reward_extra/{k}/mean")
            if v is not None:
                acc[k] = acc.get(k, 0.0) + v
                acc[f"{k}_n"] = acc.get(f"{k}_n", 0.0) + 1
    for acc in out.values():
        for k in KEYS:
            if acc.get(f"{k}_n"):
                acc[k] = acc[k] / acc.pop(f"{k}_n")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", metavar="NAME=RUN_DIR", help="a pipeline run folder (its logs/grpo.log)")
    args = p.parse_args(argv)
    print("| run | stage | steps | " + " | ".join(KEYS) + " |")
    print("|---|---|---|" + "---|" * len(KEYS))
    for spec in args.runs:
        name, _, run = spec.partition("=")
        log = Path(run) / "logs" / "grpo.log"
        if not log.is_file():
            print(f"{log}: not found", file=sys.stderr)
            return 2
        for stage, acc in sorted(stage_means(log.read_text(errors="replace")).items()):
            cells = [f"{acc[k]:.3f}" if k in acc else "–" for k in KEYS]
            print(f"| {name} | {stage} | {int(acc['steps'])} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
