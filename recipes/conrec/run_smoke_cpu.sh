#!/usr/bin/env bash
# Two GRPO steps of stock verl main_ppo on CPU with the hf rollout (tiny model, synthetic data).
# Usage: bash recipes/conrec/run_smoke_cpu.sh [RUN_DIR] [hydra overrides...]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
run_dir="${1:-runs/smoke}"; shift || true
# the CPU environment, from its one definition (conrec_verl.runtime.cpu_env.cpu_env(): the CPU
# platform, oneDNN cache bounds, loopback-only sockets -- docs/security.md)
eval "$(python -m conrec_verl.runtime.cpu_env)"
[ -f "$run_dir/data/rl/train.parquet" ] && [ -f "$run_dir/model/config.json" ] || python -m conrec_verl.smoke --out "$run_dir"
exec python -m verl.trainer.main_ppo --config-path "$here/config" --config-name smoke_cpu \
  smoke_dir="$(cd "$run_dir" && pwd)" "$@"
