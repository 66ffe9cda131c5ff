#!/usr/bin/env bash
# Two GRPO steps of stock verl main_ppo on CPU with the hf rollout (tiny model, synthetic data).
# Usage: bash recipes/conrec/run_smoke_cpu.sh [RUN_DIR] [hydra overrides...]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
run_dir="${1:-runs/smoke}"; shift || true
# = conrec_verl.runtime.cpu_env.cpu_env(); the last two bound oneDNN's per-shape caches (memory)
export VERL_PLATFORM=cpu VERL_ENGINE_DEVICE=cuda TORCH_COMPILE_DISABLE=1 WANDB_MODE=${WANDB_MODE:-disabled} \
       TOKENIZERS_PARALLELISM=false ONEDNN_PRIMITIVE_CACHE_CAPACITY=${ONEDNN_PRIMITIVE_CACHE_CAPACITY:-32} \
       LRU_CACHE_CAPACITY=${LRU_CACHE_CAPACITY:-32}
# single node: the transfer queue, Ray's agents and gloo listen on loopback only (docs/security.md)
[ -n "${RAY_ADDRESS:-}" ] || export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=${RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER:-0}
export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-lo}
[ -f "$run_dir/data/rl/train.parquet" ] && [ -f "$run_dir/model/config.json" ] || python -m conrec_verl.smoke --out "$run_dir"
exec python -m verl.trainer.main_ppo --config-path "$here/config" --config-name smoke_cpu \
  smoke_dir="$(cd "$run_dir" && pwd)" "$@"
