#!/usr/bin/env bash
# Does capacity close the gap? Warm-up SFT of from-scratch Qwen3 models of several sizes on one
# data_prep folder, checkpoints every EVERY epochs up to EPOCHS, each scored on the folder's whole
# evaluation split by conrec-eval (context 3 within 384 tokens, as the GRPO rows are asked).
#
#     DATA=runs/ml100k/data OUT=runs/capacity bash benchmarks/capacity_sweep.sh
#     SIZES="2x64 4x256 8x512" EPOCHS=6 EVERY=2 DEVICE=cuda ...   (the defaults)
#
# A size may carry its own learning rate, LAYERSxHIDDEN:LR (e.g. "4x256:1e-3"; else $LR).
# SFT_ARGS: extra overrides for verl's SFT trainer (e.g. data.max_token_len_per_gpu=8192: fewer,
# larger micro-batches on a GPU). TRAIN_TIMEOUT: seconds one size may train (0 = no limit); a size
# stopped by it is scored on the checkpoints it saved, and the table says so. EVAL_FROM: score
# only checkpoints of this epoch or later (default: every one).
#
# On the lent H200 a step of verl's SFT trainer took ~5 s for every size tried (2 x 64 to 8 x 512,
# 128-row steps; BENCHMARKS.md "Warm-up SFT on the GPU"), so 8 epochs of three sizes do not fit one
# session's 15 minutes of device time there; on the 2-core CPU see the cpu_small profile.
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
SFT_ARGS=${SFT_ARGS:-}
TRAIN_TIMEOUT=${TRAIN_TIMEOUT:-0}
EVAL_FROM=${EVAL_FROM:-0}
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
  echo "| size (layers x hidden) | lr | parameters | epochs | FHR@20 | HR@20 | sim_future_neg@20 | sim_future_pos@20 | train s |"
  echo "|---|---|---|---|---|---|---|---|---|"
} > "$SUMMARY"
for spec in $SIZES; do
  size=${spec%%:*}
  lr=$LR
  [ "$spec" != "$size" ] && lr=${spec#*:}
  L=${size%x*}; H=${size#*x}
  RUN=$OUT/$size
  log "$size: base model"
  "$PY" -m conrec_verl.model_builder tiny --data-dir "$DATA" --out "$RUN/base" --layers "$L" --hidden "$H" --seed 0 --overwrite
  log "$size: warm-up SFT, $EPOCHS epochs ($STEPS_PER_EPOCH steps each, lr $lr), a checkpoint every $EVERY"
  t0=$(date +%s)
  LIMIT=()
  [ "$TRAIN_TIMEOUT" -gt 0 ] && LIMIT=(timeout --signal=TERM --kill-after=20 "$TRAIN_TIMEOUT")
  status=0
  # shellcheck disable=SC2086
  "${LIMIT[@]}" "$PY" -m conrec_verl.runtime.torchrun --standalone --nnodes=1 --local-addr=127.0.0.1 --nproc_per_node=1 -m verl.trainer.sft_trainer \
    --config-path "$PWD/recipes/conrec/config" --config-name sft_cpu_tiny \
    model.path="$RUN/base" data.train_files="$DATA/sft/warmup.parquet" trainer.default_local_dir="$RUN/sft" \
    trainer.device="$DEVICE" trainer.total_epochs="$EPOCHS" trainer.save_freq=$(( STEPS_PER_EPOCH * EVERY )) \
    optim.lr="$lr" data.train_batch_size="$BATCH" data.micro_batch_size_per_gpu="$BATCH" \
    checkpoint.save_contents=[hf_model] trainer.experiment_name="capacity_$size" $SFT_ARGS > "$RUN/sft.log" 2>&1 \
    || status=$?
  train_s=$(( $(date +%s) - t0 ))
  if [ "$status" = 124 ] || [ "$status" = 137 ]; then
    log "$size: stopped by TRAIN_TIMEOUT=$TRAIN_TIMEOUT s; scoring the checkpoints it saved"
    train_s="$train_s (stopped)"
  elif [ "$status" != 0 ]; then
    log "$size: SFT failed, see $RUN/sft.log"; tail -20 "$RUN/sft.log"; continue
  fi
  grep -o "step:[0-9]*" "$RUN/sft.log" | tail -1 | sed "s/^/[capacity] $size last logged /" || true
  MODELS=()
  for ckpt in "$RUN"/sft/global_step_*; do
    step=${ckpt##*_}
    [ -f "$ckpt/huggingface/config.json" ] || continue
    [ $(( step / STEPS_PER_EPOCH )) -ge "$EVAL_FROM" ] || continue
    MODELS+=(--model "$size e$(( step / STEPS_PER_EPOCH ))=$ckpt/huggingface" --model-prompt "$size e$(( step / STEPS_PER_EPOCH ))=3,384")
  done
  [ ${#MODELS[@]} -gt 0 ] || { log "$size: no checkpoint to score"; continue; }
  log "$size: evaluation of $(( ${#MODELS[@]} / 4 )) checkpoints"
  # shellcheck disable=SC2086
  "$PY" -m conrec_verl.evaluation --data "$DATA" --out "$RUN/eval" --baselines none --thresholds none \
    --device "$DEVICE" --dtype float32 "${MODELS[@]}" $EVAL_ARGS > "$RUN/eval.log" 2>&1 \
    || { log "$size: evaluation failed, see $RUN/eval.log"; tail -20 "$RUN/eval.log"; continue; }
  "$PY" - "$RUN/eval/metrics.json" "$RUN/base" "$train_s" "$lr" >> "$SUMMARY" <<'EOF'
import json, math, sys
from pathlib import Path

from safetensors import safe_open

report, base, train_s, lr = json.load(open(sys.argv[1])), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
with safe_open(str(base / "model.safetensors"), "pt") as f:
    n = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
for r in sorted(report["rows"], key=lambda r: int(r["name"].rsplit(" e", 1)[1])):
    m, ci = r["metrics"], (r.get("ci") or {}).get("FHR@20") or [float("nan")] * 2
    size, ep = r["name"].rsplit(" e", 1)
    print(f"| {size} | {lr} | {n / 1e6:.2f} M | {ep} | {m['FHR@20']:.4f} [{ci[0]:.3f}, {ci[1]:.3f}] | {m['HR@20']:.4f} | "
          f"{m.get('sim_future_neg@20', float('nan')):.3f} | {m.get('sim_future_pos@20', float('nan')):.3f} | {train_s} |")
EOF
  log "$size: scored"
  tail -n +7 "$SUMMARY"
done
log "done: $SUMMARY"
