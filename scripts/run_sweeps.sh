#!/usr/bin/env bash
# The small-scale reproduction of the SpanNorm paper's claim (docs/results.md), as one resumable
# command. Every job trains in its own fixed directory with resume=auto, so a cut sweep, run
# again with the same command, skips the finished jobs and continues the interrupted one from its
# last checkpoint. One job at a time (2 CPU cores); seed 1 of every placement runs before seed 2.
#
#   scripts/run_sweeps.sh depth     # 8 placements x 2 seeds, plus SpanNorm with attn_in_sum
#   scripts/run_sweeps.sh lr        # prenorm, postnorm, spannorm over a learning-rate grid
#   scripts/run_sweeps.sh compare   # tables and plots into docs/results/
#   scripts/run_sweeps.sh all       # the three in order
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SWEEPS=${SWEEPS_DIR:-outputs/sweeps}
PLACEMENTS=prenorm,postnorm,spannorm,deepnorm,sandwich,mixln,hybridnorm,b2t

depth() {
  "$PY" train.py -m experiment=depth_sweep seed=1,2 "model.norm=$PLACEMENTS" \
    "hydra.sweep.dir=$SWEEPS/depth" resume=auto
  "$PY" train.py -m experiment=depth_sweep seed=1,2 model.norm=spannorm model.attn_in_sum=true \
    "hydra.sweep.dir=$SWEEPS/depth_attn_in_sum" resume=auto
}

lr() {
  "$PY" train.py -m experiment=lr_sweep seed=1 model.norm=prenorm,postnorm,spannorm \
    optim.lr=3e-4,1e-3,3e-3,1e-2 "hydra.sweep.dir=$SWEEPS/lr" resume=auto
}

compare() {
  "$PY" scripts/compare_runs.py "$SWEEPS/depth" "$SWEEPS/depth_attn_in_sum" \
    --group-by model.norm --out docs/results/depth
  "$PY" scripts/compare_runs.py "$SWEEPS/lr" --group-by model.norm --out docs/results/lr
}

case "${1:-all}" in
  depth) depth ;;
  lr) lr ;;
  compare) compare ;;
  all) depth && lr && compare ;;
  *) echo "error: unknown sweep '$1'; choose one of: depth, lr, compare, all" >&2; exit 2 ;;
esac
