#!/usr/bin/env bash
# CoNRec on one CUDA GPU with verl's own trainers and this project's hf rollout (no vLLM):
#   1. warm-up SFT with `torchrun -m verl.trainer.sft_trainer` (SID prompts -> future dislike)
#   2. progressive GRPO with `python -m verl.trainer.main_ppo` + the three conrec plugins
#   3. the same GRPO steps with verl's plain `grpo` and a trivial reward (plugin overhead)
# Usage: bash benchmarks/gpu_hf_grpo.sh DATA_DIR BASE_MODEL_DIR [WORK_DIR]
#   SFT_STEPS=20 (0: no SFT, GRPO starts from BASE_MODEL_DIR)  STAGE_STEPS=3 (GRPO steps per curriculum stage)
#   POLL=2.0: the conrec run's trainer.v1.sync.poll_interval (verl's fixed value, so that the ratio is
#   the plugins' own cost; the recipe's 0.05 s shows the saving)   PLAIN=0: skip the plain-verl run
# Prints each phase's wall time, the per-step timings of both GRPO runs and their ratio (plugin overhead).
set -euo pipefail
data=$(cd "$1" && pwd); model=$(cd "$2" && pwd); work=${3:-/tmp/conrec_gpu}
config="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/recipes/conrec/config"
export WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 RAY_DEDUP_LOGS=1
rm -rf "$work"; mkdir -p "$work"
python3 -c "import torch; print('device:', torch.cuda.get_device_name(0), 'torch', torch.__version__)"

SFT_STEPS=${SFT_STEPS:-20}; STAGE_STEPS=${STAGE_STEPS:-3}
sft="$model"
if [ "$SFT_STEPS" -gt 0 ]; then
t0=$(date +%s)
torchrun --standalone --nnodes=1 --nproc_per_node=1 -m verl.trainer.sft_trainer \
  --config-path "$config" --config-name sft_cpu_tiny trainer.device=cuda engine.dtype=bfloat16 \
  model.path="$model" data.train_files="$data/sft/warmup.parquet" trainer.default_local_dir="$work/sft" \
  trainer.total_training_steps="$SFT_STEPS" > "$work/sft.log" 2>&1 || { tail -40 "$work/sft.log"; exit 1; }
grep -o "step:[0-9]* .*train/loss:[0-9.]*" "$work/sft.log" | sed 's/ - perf.*train\/loss/ loss/' | sed -n '1p;$p'
echo "phase sft: $(( $(date +%s) - t0 )) s"
sft="$work/sft/global_step_$SFT_STEPS/huggingface"
fi

common=(data_dir="$data" actor_rollout_ref.model.path="$sft" actor_rollout_ref.rollout.name=hf
  data.train_batch_size=16 actor_rollout_ref.actor.ppo_mini_batch_size=16 actor_rollout_ref.rollout.n=8
  actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=32 actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=64
  actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=64 actor_rollout_ref.actor.optim.lr=1e-4
  +actor_rollout_ref.model.override_config.attn_implementation=sdpa
  actor_rollout_ref.rollout.agent.num_workers=2 reward.num_workers=2
  transfer_queue.backend.SimpleStorage.num_data_storage_units=2 trainer.save_freq=-1)
n=$STAGE_STEPS
stages="algorithm.progressive_grpo.stages=[{name:recent_neg,context:1,steps:$n,beta:0.001},{name:all_neg,context:2,steps:$n,beta:0.001},{name:neg_and_pos,context:3,steps:$n,beta:0.002}]"

t0=$(date +%s)
python3 -m verl.trainer.main_ppo --config-path "$config" --config-name conrec_gpu_qwen3 "${common[@]}" "$stages" \
  trainer.v1.sync.poll_interval="${POLL:-2.0}" trainer.default_local_dir="$work/grpo" > "$work/grpo.log" 2>&1 || { tail -60 "$work/grpo.log"; exit 1; }
echo "phase grpo (conrec plugins): $(( $(date +%s) - t0 )) s"
grep -o "step:[0-9]* \|training/conrec_stage:[0-9.]*\|critic/score/mean:[-0-9.e]*\|reward_extra/valid_sid/mean:[0-9.e-]*\|rollout_probs_diff_max:[0-9.e-]*\|timing_s/step:[0-9.]*" "$work/grpo.log" | paste -sd' ' | sed 's/step:/\nstep:/g' | grep -v "^$" | awk '!seen[$1]++'

if [ "${PLAIN:-1}" = 0 ]; then
  python3 - "$work/grpo.log" <<'PY'
import re, statistics, sys
text = open(sys.argv[1]).read()
for key in ("step", "gen", "update_actor"):
    vals = [float(m) for m in re.findall(rf"timing_s/{key}:([0-9.]+)", text)]
    print(f"grpo.log: {key} median of steps 2.. {statistics.median(vals[1:] or vals):.3f} s ({len(vals)} steps)")
PY
  exit 0
fi
t0=$(date +%s)
python3 -m verl.trainer.main_ppo --config-path "$config" --config-name conrec_gpu_qwen3 "${common[@]}" \
  algorithm.adv_estimator=grpo data.custom_cls.path=null trainer.v1.trainer_mode=sync trainer.total_training_steps=$((3 * n)) \
  reward.reward_manager.name=naive reward.custom_reward_function.path=pkg://conrec_verl.smoke \
  reward.custom_reward_function.name=compute_score trainer.default_local_dir="$work/grpo_plain" \
  > "$work/grpo_plain.log" 2>&1 || { tail -60 "$work/grpo_plain.log"; exit 1; }
echo "phase grpo (plain verl grpo, trivial reward): $(( $(date +%s) - t0 )) s"
python3 - "$work/grpo.log" "$work/grpo_plain.log" <<'PY'
import re, statistics, sys
med = {}
for path in sys.argv[1:]:
    text = open(path).read()
    name = path.rsplit("/", 1)[-1]
    row = {}
    for key in ("step", "gen", "reward", "adv", "update_actor"):
        vals = [float(m) for m in re.findall(rf"timing_s/{key}:([0-9.]+)", text)]
        row[key] = statistics.median(vals[1:] or vals) if vals else float("nan")
    steps = [float(m) for m in re.findall(r"timing_s/step:([0-9.]+)", text)]
    med[name] = row
    print(f"{name}: {len(steps)} steps, first {steps[0]:.2f} s; medians of the rest: "
          + ", ".join(f"{k} {v:.3f} s" for k, v in row.items()))
a, b = med["grpo.log"], med["grpo_plain.log"]
print(f"plugin overhead: step {a['step'] / b['step']:.3f}x; non-generation part "
      f"{(a['step'] - a['gen']) / (b['step'] - b['gen']):.3f}x (conrec / plain verl grpo)")
PY
