#!/usr/bin/env bash
# The small-scale reproduction of the SpanNorm paper's claim (docs/results.md), as one resumable
# command. Every job trains in its own fixed directory with resume=auto, so a cut sweep, run
# again with the same command, skips the finished jobs and continues the interrupted one from its
# last checkpoint. One job at a time (2 CPU cores).
#
#   scripts/run_sweeps.sh grid      # the lr x warm-up grid and its depth runs: the study
#                                   # conf/study/placement_grid.yaml (python study.py
#                                   # study=placement_grid; docs/studies.md), then its report
#   scripts/run_sweeps.sh report    # python study.py study=placement_grid report
#
# The placement sweep of docs/results.md (60 warm-up steps), as the multiruns it ran as:
#   scripts/run_sweeps.sh depth     # 8 placements + SpanNorm with attn_in_sum, seeds 1 and 2
#   scripts/run_sweeps.sh lr        # prenorm, postnorm, spannorm at lr 1e-2, 3e-3, 3e-4
#                                   # (lr 1e-3 is the depth sweep), and seed 2 of prenorm
#                                   # and spannorm at 3e-3
#   scripts/run_sweeps.sh alpha     # SpanNorm's inferred skip scale: alpha 1 and (2L)^(1/4) at
#                                   # lr 1e-3, alpha 1 at lr 1e-2 and at 1e-3 with seed 2
#                                   # (sqrt(2L) = 8 is the default)
#   scripts/run_sweeps.sh compare   # tables and plots into docs/results/
#   scripts/run_sweeps.sh all       # all of it, most informative runs first: seed 1 of every
#                                   # placement, the highest lr, seed 2 of prenorm/postnorm/
#                                   # spannorm, then the rest; the alpha runs; compare
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SWEEPS=${SWEEPS_DIR:-outputs/sweeps}

KEY=prenorm,postnorm,spannorm  # the placements the paper's claim is about
OTHERS=deepnorm,sandwich,mixln,hybridnorm,b2t

multirun() {  # multirun DIR EXPERIMENT SEED PLACEMENTS [OVERRIDE...]: one resumable multirun
  # into $SWEEPS/DIR
  "$PY" train.py -m "experiment=$2" "seed=$3" "model.norm=$4" "${@:5}" \
    "hydra.sweep.dir=$SWEEPS/$1" resume=auto
}

depth() {  # depth SEED PLACEMENTS NAME [OVERRIDE...]: into $SWEEPS/depth/NAME
  multirun "depth/$3" placement_sweep "$1" "$2" "${@:4}"
}

attn_in_sum() {  # attn_in_sum SEED: SpanNorm with the attention output inside the normalized sum
  depth "$1" spannorm "seed${1}_attn_in_sum" model.attn_in_sum=true
}

lr() {  # lr LR [SEED PLACEMENTS]: at one learning rate, into $SWEEPS/lr/LR (seed 1, the key
  # placements) or $SWEEPS/lr/LR_seedSEED
  local seed=${2:-1} name=$1
  [[ $seed == 1 ]] || name=${1}_seed$seed
  multirun "lr/$name" lr_sweep "$seed" "${3:-$KEY}" "optim.lr=$1"
}

alpha() {  # SpanNorm at other skip scales, into $SWEEPS/alpha/LR (seed 1) and 1e-3_seed2
  multirun alpha/1e-3 placement_sweep 1 spannorm model.alpha=1,deepnorm &&
    multirun alpha/1e-2 lr_sweep 1 spannorm model.alpha=1 optim.lr=1e-2 &&
    multirun alpha/1e-3_seed2 placement_sweep 2 spannorm model.alpha=1
}

study() {  # the lr x warm-up grid and depth runs: the study conf/study/placement_grid.yaml
  "$PY" study.py study=placement_grid "$@"
}

compare() {  # whatever has run so far; unfinished runs are marked and left out of the statistics
  shopt -s nullglob
  "$PY" scripts/compare_runs.py "$SWEEPS"/depth/seed* \
    --group-by model.norm,model.attn_in_sum --out docs/results/depth
  "$PY" scripts/compare_runs.py "$SWEEPS"/depth/seed[12]/[02] \
    --group-by model.norm --out docs/results/prenorm_vs_spannorm
  "$PY" scripts/compare_runs.py "$SWEEPS"/lr/* "$SWEEPS"/depth/seed[12]/[012] \
    --group-by model.norm --pivot optim.lr --out docs/results/lr
  "$PY" scripts/compare_runs.py "$SWEEPS"/lr/*/2 "$SWEEPS"/depth/seed1/2 \
    --group-by optim.lr --out docs/results/spannorm_by_lr
  "$PY" scripts/compare_runs.py "$SWEEPS"/alpha/* "$SWEEPS"/depth/seed1/2 "$SWEEPS"/lr/1e-2/2 \
    --group-by optim.lr --pivot model.alpha --out docs/results/alpha
}

case "${1:-all}" in
  depth) depth 1 "$KEY,$OTHERS" seed1 && attn_in_sum 1 &&
    depth 2 "$KEY" seed2 && depth 2 "$OTHERS" seed2_others && attn_in_sum 2 ;;
  lr) lr 1e-2 && lr 3e-3 && lr 3e-4 && lr 3e-3 2 prenorm,spannorm ;;
  alpha) alpha ;;
  compare) compare ;;
  grid | depths) study run && study report ;;
  report) study report ;;
  all) depth 1 "$KEY,$OTHERS" seed1 && attn_in_sum 1 && lr 1e-2 && depth 2 "$KEY" seed2 &&
    depth 2 "$OTHERS" seed2_others && attn_in_sum 2 && lr 3e-3 && lr 3e-4 &&
    lr 3e-3 2 prenorm,spannorm && alpha && compare ;;
  *) echo "error: unknown sweep '$1'; choose one of: grid, report, depth, lr, alpha, compare, all" >&2; exit 2 ;;
esac
