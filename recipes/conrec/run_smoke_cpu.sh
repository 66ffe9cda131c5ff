#!/usr/bin/env bash
# Two GRPO steps of stock verl main_ppo on CPU with the hf rollout (tiny model, synthetic data).
# Usage: bash recipes/conrec/run_smoke_cpu.sh [RUN_DIR] [hydra overrides...]
# (the same as `python -m conrec_verl.smoke --out RUN_DIR --train [overrides...]`, which also works
# from a wheel install: it sets the CPU environment of conrec_verl.runtime.cpu_env and runs main_ppo
# with --config-path pkg://conrec_verl.recipes.conrec.config)
set -euo pipefail
run_dir="${1:-runs/smoke}"; shift || true
exec python -m conrec_verl.smoke --out "$run_dir" --train "$@"
