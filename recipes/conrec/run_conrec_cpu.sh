#!/usr/bin/env bash
# Progressive GRPO on CPU with the conrec plugins.
# Usage: bash recipes/conrec/run_conrec_cpu.sh DATA_DIR MODEL_DIR [hydra overrides...]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
data="$(cd "$1" && pwd)"; model="$(cd "$2" && pwd)"; shift 2
# = conrec_verl.runtime.cpu_env.cpu_env(); the last two bound oneDNN's per-shape caches (memory)
export VERL_PLATFORM=cpu VERL_ENGINE_DEVICE=cuda TORCH_COMPILE_DISABLE=1 WANDB_MODE=${WANDB_MODE:-disabled} \
       TOKENIZERS_PARALLELISM=false ONEDNN_PRIMITIVE_CACHE_CAPACITY=${ONEDNN_PRIMITIVE_CACHE_CAPACITY:-32} \
       LRU_CACHE_CAPACITY=${LRU_CACHE_CAPACITY:-32}
# single node: the transfer queue, Ray's agents and gloo listen on loopback only (docs/security.md)
[ -n "${RAY_ADDRESS:-}" ] || export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=${RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER:-0}
export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-lo}
exec python -m verl.trainer.main_ppo --config-path "$here/config" --config-name conrec_cpu_tiny \
  data_dir="$data" actor_rollout_ref.model.path="$model" "$@"
