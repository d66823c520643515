#!/usr/bin/env bash
# The small-scale reproduction of the SpanNorm paper's claim (docs/results.md), as one resumable
# command. Every job trains in its own fixed directory with resume=auto, so a cut sweep, run
# again with the same command, skips the finished jobs and continues the interrupted one from its
# last checkpoint. One job at a time (2 CPU cores).
#
#   scripts/run_sweeps.sh depth     # 8 placements + SpanNorm with attn_in_sum, seeds 1 and 2
#   scripts/run_sweeps.sh lr        # prenorm, postnorm, spannorm at lr 3e-4, 3e-3, 1e-2
#                                   # (lr 1e-3 is the depth sweep's seed 1)
#   scripts/run_sweeps.sh compare   # tables and plots into docs/results/
#   scripts/run_sweeps.sh all       # seed 1 of the depth sweep, the LR sweep, seed 2, compare
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SWEEPS=${SWEEPS_DIR:-outputs/sweeps}
PLACEMENTS=prenorm,postnorm,spannorm,deepnorm,sandwich,mixln,hybridnorm,b2t

depth_seed() {  # one seed of every placement, then SpanNorm with the attention output in the sum
  "$PY" train.py -m experiment=depth_sweep "seed=$1" "model.norm=$PLACEMENTS" \
    "hydra.sweep.dir=$SWEEPS/depth/seed$1" resume=auto
  "$PY" train.py -m experiment=depth_sweep "seed=$1" model.norm=spannorm model.attn_in_sum=true \
    "hydra.sweep.dir=$SWEEPS/depth/seed${1}_attn_in_sum" resume=auto
}

lr() {
  "$PY" train.py -m experiment=lr_sweep seed=1 model.norm=prenorm,postnorm,spannorm \
    optim.lr=3e-4,3e-3,1e-2 "hydra.sweep.dir=$SWEEPS/lr" resume=auto
}

compare() {
  local depth_runs=("$SWEEPS"/depth/seed*)
  "$PY" scripts/compare_runs.py "${depth_runs[@]}" \
    --group-by model.norm,model.attn_in_sum --out docs/results/depth
  "$PY" scripts/compare_runs.py "$SWEEPS/lr" "$SWEEPS"/depth/seed1/{0,1,2} \
    --group-by model.norm --pivot optim.lr --out docs/results/lr
}

case "${1:-all}" in
  depth) depth_seed 1 && depth_seed 2 ;;
  lr) lr ;;
  compare) compare ;;
  all) depth_seed 1 && lr && depth_seed 2 && compare ;;
  *) echo "error: unknown sweep '$1'; choose one of: depth, lr, compare, all" >&2; exit 2 ;;
esac
