#!/usr/bin/env bash
# Progressive GRPO on CPU with the conrec plugins.
# Usage: bash recipes/conrec/run_conrec_cpu.sh DATA_DIR MODEL_DIR [hydra overrides...]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
data="$(cd "$1" && pwd)"; model="$(cd "$2" && pwd)"; shift 2
# the CPU environment, from its one definition (conrec_verl.runtime.cpu_env.cpu_env(): the CPU
# platform, oneDNN cache bounds, loopback-only sockets -- docs/security.md)
eval "$(python -m conrec_verl.runtime.cpu_env)"
# a Ray of its own for the run unless RAY_ADDRESS or an override names a cluster (conrec_verl.runtime.own_ray)
own_ray="$(python -m conrec_verl.runtime.own_ray "$@")"
exec python -m verl.trainer.main_ppo --config-path "$here/config" --config-name conrec_cpu_tiny \
  data_dir="$data" actor_rollout_ref.model.path="$model" $own_ray "$@"
