#!/usr/bin/env bash
# The small-scale reproduction of the SpanNorm paper's claim (docs/results.md), as one resumable
# command. Every job trains in its own fixed directory with resume=auto, so a cut sweep, run
# again with the same command, skips the finished jobs and continues the interrupted one from its
# last checkpoint. One job at a time (2 CPU cores).
#
#   scripts/run_sweeps.sh grid      # issue 16: prenorm and spannorm at 32 blocks over lr x warm-up,
#                                   # most informative cells first (one run per job, see GRID)
#   scripts/run_sweeps.sh depths    # prenorm/spannorm/postnorm at 8, 16 and 64 blocks
#   scripts/run_sweeps.sh report    # the grid and depth tables/plots from the committed summaries
#
# The earlier (60-step warm-up) sweep of docs/results.md:
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

SUMMARIES=${SUMMARIES_DIR:-docs/results/grid/runs}  # one JSON per finished run, committed
BASELINE=6.3615  # the unigram baseline of the default corpus (printed by every run)

job() {  # job NAME NORM LR WARMUP SEED [OVERRIDE...]: one resumable run in $SWEEPS/grid/NAME;
  # skipped once its summary exists (a finished run), else continued from its last checkpoint
  local name=$1 dir=$SWEEPS/grid/$1
  [[ -f $SUMMARIES/$name.json ]] && return 0
  echo "== $(date +%H:%M:%S) $name"
  "$PY" train.py experiment=placement_sweep "model.norm=$2" "optim.lr=$3" \
    "optim.warmup_steps=$4" "seed=$5" "${@:6}" "hydra.run.dir=$dir" resume=auto ||
    echo "   $name ended with status $? (the sweep goes on)"
  "$PY" scripts/sweep_summary.py "$dir" --baseline "$BASELINE" --out "$SUMMARIES/$name.json" || true
}

cell() {  # cell NORM LR WARMUP SEED [LAYERS]: the job of one grid cell (32 blocks unless LAYERS)
  local layers=${5:-32} name="$1_lr$2_w$3_s$4"
  [[ $layers == 32 ]] || name="$1_L${layers}_lr$2_w$3_s$4"
  job "$name" "$1" "$2" "$3" "$4" "model.n_layers=$layers"
}

grid_rounds() {  # grid_rounds "WARMUP LR SEED" ...: prenorm and spannorm at each, interleaved
  # so that every committed partial result compares them
  local round norm lr w seed
  for round in "$@"; do
    read -r w lr seed <<< "$round"
    for norm in prenorm spannorm; do cell "$norm" "$lr" "$w" "$seed"; done
  done
}

best() {  # best NORM: "LR WARMUP" of NORM's best 32-block cell so far (mean over its seeds)
  "$PY" scripts/grid_report.py "$SUMMARIES" --best "$1"
}

neighbour() {  # neighbour LR: the next learning rate of the grid below LR (above the lowest)
  case $1 in 1e-2|0.01) echo 6e-3 ;; 6e-3|0.006) echo 3e-3 ;; 3e-3|0.003) echo 6e-3 ;; *) echo 3e-3 ;; esac
}

best_seeds() {  # a third seed at each placement's best cell
  local norm lr w
  for norm in prenorm spannorm; do
    read -r lr w <<< "$(best $norm)"
    cell "$norm" "$lr" "$w" 3
  done
}

depths() {  # 8, 16 and 64 blocks (same tokens): prenorm and spannorm at their best 32-block
  # cell (seeds 1 and 2) and at a neighbouring lr (seed 1); postnorm at prenorm's best (seed 1,
  # at 32 blocks too; the 32-block prenorm and spannorm runs are the grid's, skipped as done).
  # Shallow first: 8 and 16 blocks cost a quarter and a half of a 32-block run, so the curve
  # over 8-32 is on record before the 64-block runs (twice the cost) start
  local layers norm lr w
  for layers in 8 16 32 64; do
    for norm in prenorm spannorm; do
      read -r lr w <<< "$(best $norm)"
      cell "$norm" "$lr" "$w" 1 "$layers"
    done
    read -r lr w <<< "$(best prenorm)"
    cell postnorm "$lr" "$w" 1 "$layers"
  done
  for layers in 8 16 64; do
    for norm in prenorm spannorm; do
      read -r lr w <<< "$(best $norm)"
      cell "$norm" "$lr" "$w" 2 "$layers"
      cell "$norm" "$(neighbour "$lr")" "$w" 1 "$layers"
    done
  done
}

grid() {  # issue 16's queue, most informative first: the likely-best cells (warm-up 150/300 at
  # lr 3e-3/6e-3) with seeds 1 and 2, a third seed at each best, lns once; then lr 1e-2 next to
  # the best cell (both placements' best, lr 6e-3 / warm-up 300, sits at the grid's edge, so the
  # depth runs wait until the cell beyond it has two seeds); then the depth runs (at the best
  # cell as it stands then), then the rest of the grid (lr 1e-3, warm-up 60) with two seeds
  grid_rounds "150 3e-3 1" "150 6e-3 1" "300 3e-3 1" "300 6e-3 1" \
    "150 3e-3 2" "150 6e-3 2" "300 3e-3 2" "300 6e-3 2"
  best_seeds
  read -r lr w <<< "$(best prenorm)"
  cell lns "$lr" "$w" 1
  grid_rounds "300 1e-2 1" "300 1e-2 2" "150 1e-2 1"
  depths
  grid_rounds "60 3e-3 1" "60 6e-3 1" "150 1e-3 1" "300 1e-3 1" \
    "60 1e-3 1" "60 1e-2 1" "60 3e-3 2" "60 6e-3 2" "150 1e-2 2" "150 1e-3 2" \
    "300 1e-3 2" "60 1e-3 2" "60 1e-2 2"
}

report() {  # tables and figures of the grid and depth runs, from the committed summaries
  "$PY" scripts/grid_report.py "$SUMMARIES" --out docs/results/grid
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
  grid) grid && report ;;
  depths) depths && report ;;
  report) report ;;
  all) depth 1 "$KEY,$OTHERS" seed1 && attn_in_sum 1 && lr 1e-2 && depth 2 "$KEY" seed2 &&
    depth 2 "$OTHERS" seed2_others && attn_in_sum 2 && lr 3e-3 && lr 3e-4 &&
    lr 3e-3 2 prenorm,spannorm && alpha && compare ;;
  *) echo "error: unknown sweep '$1'; choose one of: grid, depths, report, depth, lr, alpha, compare, all" >&2; exit 2 ;;
esac
