#!/usr/bin/env bash
# Every performance figure of BENCHMARKS.md (issue "Performance and scale"), one command:
#
#     bash benchmarks/run_perf.sh                 # about 90 min on 2 quiet cores (data prep ~30, pipeline ~40)
#     QUICK=1 bash benchmarks/run_perf.sh         # smaller sizes, a few minutes (a smoke run)
#
# (a) reward manager vs verl's naive manager and (b) the pure scorer: bench_reward.py --check;
# (c) data_prep at 3M / 10M events, engine=ray against engine=local, and 30M with engine=ray only
#     (the local engine would need ~20 GB there): bench_data_prep.py; what the embeddings/Swing
#     worker holds per training event, codes vs the table of string ids: bench_train_codes.py;
# (d) a CPU GRPO step with the conrec plugins vs verl's grpo + trivial reward: bench_grpo_step.py;
# the one-command pipeline's wall time and peak memory: bench_pipeline.py.
# Each script prints its figures and its baseline ratio from the same run; the whole output is
# also written to $LOG (default runs/perf.log). The GPU figures come from benchmarks/gpu_hf_grpo.sh
# on a GPU machine. Exit status: non-zero when a script fails or misses its target.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
LOG=${LOG:-runs/perf.log}
mkdir -p "$(dirname "$LOG")"
: > "$LOG"
status=0
run() {
  echo "== $* ($(date -u +%FT%TZ))" | tee -a "$LOG"
  "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || { echo "== exit $rc: $*" | tee -a "$LOG"; status=1; }
}
if [ "${QUICK:-0}" = 1 ]; then
  run "$PY" benchmarks/bench_reward.py --responses 5000 --rows 512
  run "$PY" benchmarks/bench_data_prep.py --millions 0.1,0.3 --ray-at 0.3 --sizes "[32,32,32]"
  run "$PY" benchmarks/bench_train_codes.py --millions 0.3
  run "$PY" benchmarks/bench_grpo_step.py --steps 4
else
  run "$PY" benchmarks/bench_reward.py --check
  run "$PY" benchmarks/bench_data_prep.py --millions 3,10,30 --ray-at 3,10,30 --local-at 3,10 --ray-partitions 16
  run "$PY" benchmarks/bench_train_codes.py --millions 1,10
  run "$PY" benchmarks/bench_grpo_step.py
  run "$PY" benchmarks/bench_pipeline.py
fi
echo "figures in $LOG" >&2
exit $status
