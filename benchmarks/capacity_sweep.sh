#!/usr/bin/env bash
# Does capacity close the gap? Warm-up SFT of from-scratch Qwen3 models of several sizes on one
# data_prep folder, checkpoints every EVERY epochs up to EPOCHS, each scored on the folder's whole
# evaluation split by conrec-eval (context 3 within 384 tokens, as the GRPO rows are asked).
#
#     DATA=runs/ml100k/data OUT=runs/capacity bash benchmarks/capacity_sweep.sh
#     SIZES="2x64 4x256 8x512" EPOCHS=6 EVERY=2 DEVICE=cuda ...   (the defaults)
#
# Every row is trained by verl's own SFT trainer (recipes/conrec/config/sft_cpu_tiny.yaml, the
# warm-up stage of the cpu_tiny profile, only the size and the epochs changed) straight from the
# base model (the "warm-up SFT" row of the Table 2 ablation). The evaluation split is the test
# split: this is an exploration of capacity, not a model selection, and says so in its output.
# Results: $OUT/<size>/eval/report.md and one summary table, $OUT/capacity.md (written as the
# sweep goes, so a cut-off run keeps what finished).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
: "${DATA:?set DATA to a data_prep folder}"
OUT=${OUT:-runs/capacity}
SIZES=${SIZES:-"2x64 4x256 8x512"}
EPOCHS=${EPOCHS:-6}
EVERY=${EVERY:-2}
DEVICE=${DEVICE:-cuda}
LR=${LR:-2e-3}
BATCH=${BATCH:-32}
EVAL_ARGS=${EVAL_ARGS:-}
mkdir -p "$OUT"
DATA=$(cd "$DATA" && pwd)
OUT=$(cd "$OUT" && pwd)
if [ "$DEVICE" = cpu ]; then
  eval "$("$PY" -c 'from conrec_verl.runtime.cpu_env import cpu_env; print(" ".join(f"export {k}={v}" for k, v in cpu_env().items()))')"
fi
log() { echo "[capacity $(date -u +%H:%M:%S)] $*"; }
ROWS=$("$PY" -c "import pyarrow.parquet as pq; print(pq.ParquetFile('$DATA/sft/warmup.parquet').metadata.num_rows)")
STEPS_PER_EPOCH=$(( ROWS / BATCH ))
SUMMARY=$OUT/capacity.md
{
  echo "# Warm-up SFT capacity sweep ($(basename "$(dirname "$DATA")")/$(basename "$DATA"), $ROWS rows, batch $BATCH, lr $LR)"
  echo
  echo "Test split, FHR@20 [95% interval]; an exploration, not a model selection."
  echo
  echo "| size (layers x hidden) | parameters | epochs | FHR@20 | HR@20 | sim_future_neg@20 | sim_future_pos@20 | train s |"
  echo "|---|---|---|---|---|---|---|---|"
} > "$SUMMARY"
for size in $SIZES; do
  L=${size%x*}; H=${size#*x}
  RUN=$OUT/$size
  log "$size: base model"
  "$PY" -m conrec_verl.model_builder tiny --data-dir "$DATA" --out "$RUN/base" --layers "$L" --hidden "$H" --seed 0 --overwrite
  log "$size: warm-up SFT, $EPOCHS epochs ($STEPS_PER_EPOCH steps each), a checkpoint every $EVERY"
  t0=$(date +%s)
  "$PY" -m conrec_verl.runtime.torchrun --standalone --nnodes=1 --local-addr=127.0.0.1 --nproc_per_node=1 -m verl.trainer.sft_trainer \
    --config-path "$PWD/recipes/conrec/config" --config-name sft_cpu_tiny \
    model.path="$RUN/base" data.train_files="$DATA/sft/warmup.parquet" trainer.default_local_dir="$RUN/sft" \
    trainer.device="$DEVICE" trainer.total_epochs="$EPOCHS" trainer.save_freq=$(( STEPS_PER_EPOCH * EVERY )) \
    optim.lr="$LR" data.train_batch_size="$BATCH" data.micro_batch_size_per_gpu="$BATCH" \
    checkpoint.save_contents=[hf_model] trainer.experiment_name="capacity_$size" > "$RUN/sft.log" 2>&1 \
    || { log "$size: SFT failed, see $RUN/sft.log"; tail -20 "$RUN/sft.log"; continue; }
  train_s=$(( $(date +%s) - t0 ))
  MODELS=()
  for ckpt in "$RUN"/sft/global_step_*; do
    step=${ckpt##*_}
    MODELS+=(--model "$size e$(( step / STEPS_PER_EPOCH ))=$ckpt/huggingface" --model-prompt "$size e$(( step / STEPS_PER_EPOCH ))=3,384")
  done
  log "$size: evaluation of ${#MODELS[@]} arguments"
  # shellcheck disable=SC2086
  "$PY" -m conrec_verl.evaluation --data "$DATA" --out "$RUN/eval" --baselines none --thresholds none \
    --device "$DEVICE" --dtype float32 "${MODELS[@]}" $EVAL_ARGS > "$RUN/eval.log" 2>&1 \
    || { log "$size: evaluation failed, see $RUN/eval.log"; tail -20 "$RUN/eval.log"; continue; }
  "$PY" - "$RUN/eval/metrics.json" "$RUN/base" "$train_s" >> "$SUMMARY" <<'EOF'
import json, math, sys
from pathlib import Path

from safetensors import safe_open

report, base, train_s = json.load(open(sys.argv[1])), Path(sys.argv[2]), sys.argv[3]
with safe_open(str(base / "model.safetensors"), "pt") as f:
    n = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
for r in sorted(report["rows"], key=lambda r: int(r["name"].rsplit(" e", 1)[1])):
    m, ci = r["metrics"], (r.get("ci") or {}).get("FHR@20") or [float("nan")] * 2
    size, ep = r["name"].rsplit(" e", 1)
    print(f"| {size} | {n / 1e6:.2f} M | {ep} | {m['FHR@20']:.4f} [{ci[0]:.3f}, {ci[1]:.3f}] | {m['HR@20']:.4f} | "
          f"{m.get('sim_future_neg@20', float('nan')):.3f} | {m.get('sim_future_pos@20', float('nan')):.3f} | {train_s} |")
EOF
  tail -n +7 "$SUMMARY"
done
log "done: $SUMMARY"
