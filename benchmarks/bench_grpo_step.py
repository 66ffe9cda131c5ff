"""Plugin overhead of a CPU GRPO step: stock verl GRPO with a trivial reward vs the same step with
the three conrec plugins (SID dataset + curriculum, progressive_grpo, conrec reward manager, and
the conrec_sync trainer mode), same model, data, batch and sampling, measured in the same run.

    python benchmarks/bench_grpo_step.py [--steps 8] [--work runs/bench_grpo_step]

Prints the median ``timing_s/step`` (first step excluded: it includes warm-up) and the medians of
``timing_s/gen``, ``timing_s/adv`` and ``timing_s/update_actor`` for both runs, and the ratio. Target: the
plugin run within 10 % of the plain one. Uses the smoke recipe's synthetic data and tiny model.

Both runs keep verl's 2 s replay-buffer poll (so the ratio is the plugins' own cost); a third run,
the plugins with the recipes' ``trainer.v1.sync.poll_interval=0.05``, shows what that setting saves
per step (``--no-poll-run`` skips it).
"""

from __future__ import annotations

import argparse
import platform
import re
import shutil
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from conrec_verl.model_builder import save_tiny_model  # noqa: E402
from conrec_verl.smoke import write_smoke_dataset  # noqa: E402
from tests.verl_run import run_main_ppo, step_metrics  # noqa: E402

COMMON = ["trainer.save_freq=-1", "trainer.val_before_train=false", "data.train_batch_size=8",
          "actor_rollout_ref.actor.ppo_mini_batch_size=8", "actor_rollout_ref.rollout.n=4"]


def plugin_overrides(data: Path, steps: int) -> list[str]:
    half = max(1, steps // 2)
    return [
        "algorithm.adv_estimator=progressive_grpo",
        "+algorithm.progressive_grpo.kl_ref=${actor_rollout_ref.actor.kl_loss_coef}",
        f"+algorithm.progressive_grpo.stages=[{{context:1,steps:{half},beta:0.001}},"
        f"{{context:2,steps:{steps - half},beta:0.002}}]",
        "data.custom_cls.path=pkg://conrec_verl.plugins.dataset", "data.custom_cls.name=ConrecSidDataset",
        "+data.conrec.schedule=${algorithm.progressive_grpo}",
        "reward.custom_reward_function.path=null", "reward.reward_manager.name=conrec",
        f"+reward.reward_kwargs.codebook_path={data}/codebook.npz",
        "trainer.total_training_steps=null", "trainer.v1.trainer_mode=conrec_sync",
    ]


def medians(log: str, key: str) -> float:
    steps = step_metrics(log)
    vals = [m[key] for s, m in sorted(steps.items()) if s >= 2 and key in m]
    return statistics.median(vals) if vals else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--work", default="runs/bench_grpo_step")
    ap.add_argument("--no-poll-run", action="store_true", help="skip the run with the short poll interval")
    args = ap.parse_args()
    work = Path(args.work).resolve()
    shutil.rmtree(work, ignore_errors=True)
    data = write_smoke_dataset(work / "data", n_train=64)
    save_tiny_model(work / "model", (16, 16, 16))
    base = [f"smoke_dir={work}", *COMMON]
    runs = {
        "verl grpo + trivial reward": base + [f"trainer.total_training_steps={args.steps}",
                                              f"trainer.default_local_dir={work}/ckpt_plain"],
        "conrec plugins": base + plugin_overrides(data, args.steps) + [f"trainer.default_local_dir={work}/ckpt_conrec"],
    }
    if not args.no_poll_run:
        runs["conrec plugins, poll 0.05 s"] = (base + plugin_overrides(data, args.steps)
                                               + ["+trainer.v1.sync.poll_interval=0.05",
                                                  f"trainer.default_local_dir={work}/ckpt_conrec_poll"])
    keys = ["timing_s/step", "timing_s/gen", "timing_s/adv", "timing_s/update_actor"]
    results = {}
    for name, overrides in runs.items():
        slug = re.sub(r"\W+", "_", name)
        rc, out = run_main_ppo("smoke_cpu", overrides, timeout=900, log_path=work / f"{slug}.log")
        if rc != 0:
            print(out[-3000:])
            print(f"{name}: main_ppo failed")
            return 1
        results[name] = {k: medians(out, k) for k in keys}
    print(f"machine: {platform.platform()}; {args.steps} steps each, medians of steps 2..{args.steps}")
    print("| run | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
    for name, r in results.items():
        print(f"| {name} | " + " | ".join(f"{r[k]:.3f}" for k in keys) + " |")
    names = list(runs)
    plain, conrec = (results[n]["timing_s/step"] for n in names[:2])
    ratio = conrec / plain
    print(f"\nstep time ratio conrec / plain = {ratio:.3f} (target <= 1.10)")
    if len(names) > 2:
        fast = results[names[2]]["timing_s/step"]
        print(f"step time with trainer.v1.sync.poll_interval=0.05: {fast:.3f} s = {fast / plain:.3f}x plain verl grpo")
    return 0 if ratio <= 1.10 else 1


if __name__ == "__main__":
    sys.exit(main())
