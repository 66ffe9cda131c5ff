#!/usr/bin/env bash
# Train the paper's Table 2 ablation rows with the cpu_tiny pipeline on the two real logs, then
# regenerate the quality section of BENCHMARKS.md (baselines + model rows) with bench_quality.py.
#
#     bash benchmarks/run_ablation.sh                 # both logs, run folders under runs/
#     WORK=/tmp/abl DATASETS="ml100k" bash benchmarks/run_ablation.sh
#
# Per log D (ml100k = MovieLens-100K fetched at run time into $WORK/cache; kuairand = the bundled
# sample), all run folders under $WORK (never committed):
#   $WORK/D                 the default pipeline up to GRPO: translation (when the log has item
#                           text) + alignment + warm-up SFT, then progressive GRPO with the collab
#                           reward, without cross-stage cleaning (grpo.cleaning.enabled=false).
#                           models/sft_warmup = "+ alignment", models/grpo = "+ positive penalty"
#   $WORK/D-warmup_only     warm-up SFT straight from the base model          -> "warm-up SFT"
#   $WORK/D-grpo_next_neg   GRPO from "+ alignment", reward neg_only against the single next
#                           dislike (reward.reward_kwargs.targets=next_neg)   -> "+ progressive GRPO"
#   $WORK/D-grpo_neg_only   GRPO from "+ alignment", reward neg_only against GTS = future
#                           dislikes + Swing neighbours                        -> "+ future negative reward"
#   $WORK/D-grpo_cleaning   the profile's GRPO as it ships: collab reward + cross-stage cleaning
#                                                                              -> "+ cross-stage cleaning"
# (the paper's Table 2 rows are trained without cleaning, one change per row; the last row adds it)
# Every step is the resumable pipeline (pipeline.json records finished phases), so rerunning this
# script after an interruption continues where it stopped. Extra pipeline overrides for every run:
# PIPELINE_ARGS="sft.overrides=[...]"; extra bench_quality.py arguments: BENCH_ARGS="--sasrec-epochs 20".
# EVAL=0 trains and stops before the evaluation.
# TRAIN=0 skips all training and evaluates the model rows already trained under $WORK (the others
# are listed as missing in the section).
# REUSE_FROM="ml100k=runs/ml100k_ship" starts $WORK/D from that finished run folder (same profile and
# data config; conrec-pipeline --from: its data, base model and SFT models are linked, not retrained),
# so only the GRPO rows and the warm-up-only row train: about 45 minutes less per log on the 2-core
# CPU. A relative folder is taken from the repository root (the script runs there).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
WORK=${WORK:-runs}
DATASETS=${DATASETS:-"ml100k kuairand"}
TRAIN=${TRAIN:-1}
EVAL=${EVAL:-1}
WRITE=${WRITE:-BENCHMARKS.md}   # the markdown file whose quality section bench_quality.py rewrites
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
read -r -a EXTRA <<< "${PIPELINE_ARGS:-}"
read -r -a BENCH_EXTRA <<< "${BENCH_ARGS:-}"

log() { echo "[run_ablation $(date -u +%H:%M:%S)] $*"; }

data_args() {
  case "$1" in
    ml100k) echo "data.config=movielens data.input_path=$WORK/cache/ml-100k" ;;
    kuairand) echo "data.config=kuairand" ;;
    *) echo "unknown dataset $1 (ml100k | kuairand)" >&2; exit 2 ;;
  esac
}

pipeline() { "$PY" -m conrec_verl.pipeline --profile cpu_tiny "$@" "${EXTRA[@]}"; }

# A run folder started from D's finished data and SFT phases (conrec-pipeline --from), so that
# `--only grpo` trains another GRPO from the same "+ alignment" model.
branch() { pipeline --run-dir "$2" --from "$1" --only data "${DARGS[@]}" "${@:3}"; }

# REUSE_FROM: LOG=RUN_FOLDER pairs, checked before anything runs (a misspelt log would otherwise
# retrain its SFT phases from scratch without a word)
declare -A REUSE=()
read -r -a REUSE_PAIRS <<< "${REUSE_FROM:-}"
for pair in "${REUSE_PAIRS[@]}"; do
  log_name=${pair%%=*}
  folder=${pair#*=}
  if [ "$pair" = "$log_name" ] || [ -z "$folder" ] || [ -z "$log_name" ]; then
    echo "REUSE_FROM: expected LOG=RUN_FOLDER pairs, got '$pair'" >&2; exit 2
  fi
  case " $DATASETS " in
    *" $log_name "*) ;;
    *) echo "REUSE_FROM: '$log_name' is not one of DATASETS ($DATASETS)" >&2; exit 2 ;;
  esac
  REUSE[$log_name]=$folder
done

MODELS=()
REFS=()
for D in $DATASETS; do
  read -r -a DARGS <<< "$(data_args "$D")"
  if [ "$D" = ml100k ] && [ "$TRAIN" != 0 ]; then "$PY" -m conrec_verl.data_prep.fetch_movielens --cache "$WORK/cache"; fi
  RUN=$WORK/$D
  REFS+=(--forget-reference-model "$D=$RUN/models/sft_alignment")
  ROWS=("warm-up SFT=$RUN-warmup_only/models/sft_warmup"
        "+ alignment=$RUN/models/sft_warmup"
        "+ progressive GRPO=$RUN-grpo_next_neg/models/grpo"
        "+ future negative reward=$RUN-grpo_neg_only/models/grpo"
        "+ positive penalty=$RUN/models/grpo"
        "+ cross-stage cleaning=$RUN-grpo_cleaning/models/grpo")
  if [ "$TRAIN" = 0 ]; then
    for row in "${ROWS[@]}"; do
      if [ -f "${row#*=}/config.json" ]; then MODELS+=(--model "$D:$row"); else log "$D: no ${row%%=*} model yet"; fi
    done
    continue
  fi

  SRC=${REUSE[$D]:-}
  if [ -n "$SRC" ] && [ ! -f "$RUN/pipeline.json" ]; then
    log "$D: reusing the data, base model and SFT phases of $SRC"
    pipeline --run-dir "$RUN" --from "$SRC" --only data "${DARGS[@]}" grpo.cleaning.enabled=false
  fi
  log "$D: default pipeline (SFT stages + progressive GRPO, collab reward)"
  pipeline --run-dir "$RUN" --only data,model,sft_translation,sft_alignment,sft_warmup,grpo "${DARGS[@]}" \
    grpo.cleaning.enabled=false

  log "$D: warm-up SFT only (no translation/alignment stage)"
  mkdir -p "$RUN-warmup_only"
  [ -e "$RUN-warmup_only/data" ] || ln -s "$RUN/data" "$RUN-warmup_only/data"
  # the cpu_tiny profile's warm-up stage (recipes/conrec/pipeline/cpu_tiny.yaml), alone
  WARMUP_STAGE=$(grep -o '{name: warmup,.*}' recipes/conrec/pipeline/cpu_tiny.yaml)
  pipeline --run-dir "$RUN-warmup_only" --only data,model,sft_warmup "${DARGS[@]}" "sft.stages=[$WARMUP_STAGE]"

  log "$D: progressive GRPO rewarded on the next dislike only"
  NEXT=("grpo.overrides=[reward.reward_kwargs.variant=neg_only,reward.reward_kwargs.targets=next_neg]"
        grpo.cleaning.enabled=false)
  branch "$RUN" "$RUN-grpo_next_neg" "${NEXT[@]}"
  pipeline --run-dir "$RUN-grpo_next_neg" --only grpo "${DARGS[@]}" "${NEXT[@]}"

  log "$D: progressive GRPO with the future-negative reward (no positive penalty)"
  NEG=("grpo.overrides=[reward.reward_kwargs.variant=neg_only]" grpo.cleaning.enabled=false)
  branch "$RUN" "$RUN-grpo_neg_only" "${NEG[@]}"
  pipeline --run-dir "$RUN-grpo_neg_only" --only grpo "${DARGS[@]}" "${NEG[@]}"

  log "$D: progressive GRPO as the profile ships it (collab reward + cross-stage cleaning)"
  branch "$RUN" "$RUN-grpo_cleaning"
  pipeline --run-dir "$RUN-grpo_cleaning" --only grpo "${DARGS[@]}"

  for row in "${ROWS[@]}"; do MODELS+=(--model "$D:$row"); done
done

if [ "$EVAL" = 0 ]; then log "EVAL=0: models trained, evaluation skipped"; exit 0; fi
log "evaluation + BENCHMARKS.md"
# bench_quality.py reuses $WORK/D/data (the folder the models were trained on) and writes $WORK/D/eval
"$PY" benchmarks/bench_quality.py --work "$WORK" --datasets "$(echo $DATASETS | tr ' ' ,)" "${MODELS[@]}" "${REFS[@]}" \
  --command "$([ "$TRAIN" = 0 ] && echo "TRAIN=0 ")$([ "$DATASETS" != "ml100k kuairand" ] && echo "DATASETS=\"$DATASETS\" ")${BENCH_ARGS:+BENCH_ARGS=\"$BENCH_ARGS\" }bash benchmarks/run_ablation.sh" "${BENCH_EXTRA[@]}" --write "$WRITE"
log "done"
