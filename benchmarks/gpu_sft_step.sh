#!/usr/bin/env bash
# Seconds per step of verl's SFT trainer on one CUDA GPU for a tiny from-scratch Qwen3: does the GPU
# make the capacity sweep (benchmarks/capacity_sweep.sh) affordable, and what does a step cost?
#   bash benchmarks/gpu_sft_step.sh DATA_DIR [LAYERSxHIDDEN]       (default 2x64; the device tool's GPU)
#   STEPS=7 BATCH=128 DEV=cuda     DEV=cpu runs the same on a CPU (export the CPU environment first:
#                                  conrec_verl.runtime.cpu_env)
#   RECIPE=1: one run instead, the recipe's own micro-batching (1,536 tokens) at BATCH rows, e.g. the
#   per-size step cost of the cpu_small profile's comment: `DEV=cpu RECIPE=1 BATCH=32 STEPS=25 bash
#   benchmarks/gpu_sft_step.sh DATA_DIR 4x128` (then 2x64, ...; compare the medians of steps 6 on)
# Trains DATA_DIR/sft/warmup.parquet with recipes/conrec/config/sft_cpu_tiny.yaml (only device, batch
# and micro-batch token budget changed) three times -- torch.compile as verl configures it, with
# TORCH_COMPILE_DISABLE=1, and with 2,048-token micro-batches instead of 8,192 -- each for STEPS
# steps, and prints the per-step seconds tqdm reports (the first step includes warm-up). With
# PROFILE=1 the first run also writes a cProfile of the trainer process to $WORK/prof.out and prints
# its top entries (it must end within its time limit, TMO seconds, for the profile to be written).
set -uo pipefail
cd "$(dirname "$0")/.."
data=$(cd "${1:?usage: gpu_sft_step.sh DATA_DIR [LAYERSxHIDDEN]}" && pwd)
size=${2:-2x64}; L=${size%x*}; H=${size#*x}
PY=${PYTHON:-python3}; WORK=${WORK:-/tmp/conrec_sft_step}; STEPS=${STEPS:-7}; BATCH=${BATCH:-128}
rm -rf "$WORK"; mkdir -p "$WORK"
export PYTHONUNBUFFERED=1
$PY -c "import torch; print('device:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu', 'torch', torch.__version__)"
$PY -m conrec_verl.model_builder tiny --data-dir "$data" --out "$WORK/model" --layers "$L" --hidden "$H" --seed 0 --overwrite > /dev/null \
  || { echo "model build failed"; exit 1; }
run() {  # NAME ENV... ; overrides in $OVR, a launcher prefix in $PRE
  local name=$1; shift
  local t0=$SECONDS
  # shellcheck disable=SC2086
  env "$@" timeout "${TMO:-75}" $PY -m conrec_verl.runtime.torchrun --standalone --nnodes=1 --local-addr=127.0.0.1 --nproc_per_node=1 ${PRE:-} \
    -m verl.trainer.sft_trainer --config-path "$PWD/recipes/conrec/config" --config-name sft_cpu_tiny \
    model.path="$WORK/model" data.train_files="$data/sft/warmup.parquet" trainer.default_local_dir="$WORK/ckpt_$name" \
    trainer.device="${DEV:-cuda}" trainer.total_training_steps="$STEPS" data.train_batch_size="$BATCH" \
    trainer.resume_mode=disable checkpoint.save_contents=[hf_model] $OVR > "$WORK/$name.log" 2>&1
  local rc=$?
  echo "== $name ($size, batch $BATCH): rc $rc, $(( SECONDS - t0 )) s with start-up; s/step as tqdm reports them:"
  $PY - "$WORK/$name.log" <<'PY'
import re, sys
txt = open(sys.argv[1]).read()
v, last = [], 0  # the epoch bar's readings, one per finished step (not the loading or closing bars)
for m in re.finditer(r"Epoch \d+/\d+:[^\[]*?(\d+)/\d+ \[[^\]]*?,\s*([0-9.]+)(s/it|it/s)\]", txt):
    if int(m.group(1)) > last:
        last = int(m.group(1))
        v.append(float(m.group(2)) if m.group(3) == "s/it" else 1 / float(m.group(2)))
print("   ", " ".join(f"{x:.2f}" for x in v) or "(no step finished)")
if len(v) > 5:
    import statistics
    print(f"    median of steps 6 on: {statistics.median(v[5:]):.3f} s")
PY
}
if [ "${PROFILE:-0}" = 1 ]; then PRE="--no-python $PY -m cProfile -o $WORK/prof.out"; else PRE=; fi
if [ "${RECIPE:-0}" = 1 ]; then
  OVR= run recipe
  exit 0
fi
OVR="data.max_token_len_per_gpu=8192" run compile_default
PRE=
[ -s "$WORK/prof.out" ] && $PY -c "import pstats; pstats.Stats('$WORK/prof.out').sort_stats('tottime').print_stats(25)" | tail -30
OVR="data.max_token_len_per_gpu=8192" run compile_off TORCH_COMPILE_DISABLE=1
OVR="data.max_token_len_per_gpu=2048" run compile_off_2048 TORCH_COMPILE_DISABLE=1
