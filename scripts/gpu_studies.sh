#!/usr/bin/env bash
# Run studies on one GPU machine, many jobs at a time, within a fixed wall-clock budget: the
# science studies of docs/results.md (Part 3) that were run on the lent H200.
#
#   scripts/gpu_studies.sh budget_x4:8 budget_x1:3 moe:3 collapse:2   # study:jobs-at-a-time ...
#
# Each study is `python study.py study=<name> run` with the Hydra joblib launcher, every job on the
# GPU in fp32 (trainer.accelerator=gpu trainer.precision=32-true: the same arithmetic as the CPU
# runs, no bf16), each a separate process. A 20-step smoke run goes first (it also builds the data
# caches that the jobs then share); if it fails the script stops there.
#
# Environment: GPU_STUDIES_SECONDS (default 520): when to stop (the studies are cut, finished runs
# kept); PYTHON (default python3); missing packages are installed from .whl/ (see
# scripts/gpu_check.sh prepare) into /tmp/spannorm-site. When OUT is set (the device tool's
# output folder) the summaries, study logs and run logs are packed there as they come
# (studies.tgz, every 20 s), with machine.txt and smoke.log.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
SECONDS_BUDGET=${GPU_STUDIES_SECONDS:-520}
OUT=${OUT:-outputs/gpu_studies}
mkdir -p "$OUT" outputs
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
export SPANNORM_DATA_DIR=${SPANNORM_DATA_DIR:-data}
# GPU_STUDIES_ARGS replaces the GPU overrides (a dry run on CPU: "trainer.accelerator=cpu")
read -r -a GPU <<<"${GPU_STUDIES_ARGS:-trainer.accelerator=gpu trainer.precision=32-true}"
START=$(date +%s)
elapsed() { echo $(($(date +%s) - START)); }

if ! "$PYTHON" -c "import hydra, omegaconf, hydra_plugins.hydra_joblib_launcher" 2>/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/spannorm-site .whl/*.whl || exit 1
  export PYTHONPATH="$PYTHONPATH:/tmp/spannorm-site"
fi

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PYTHON" -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)"
  nproc --all
} >"$OUT/machine.txt" 2>&1

smoke() {
  "$PYTHON" train.py experiment=placement_sweep "${GPU[@]}" trainer.max_steps=10 \
    trainer.val_check_interval=5 hydra.run.dir="$(mktemp -d)" overwrite=true >>"$OUT/smoke.log" 2>&1
}
MPS=0
if command -v nvidia-cuda-mps-control >/dev/null && nvidia-cuda-mps-control -d 2>>"$OUT/smoke.log"; then
  MPS=1
fi
echo "mps: $MPS" >>"$OUT/machine.txt"
t0=$(date +%s)
if ! smoke; then
  if [[ $MPS == 1 ]]; then
    echo quit | nvidia-cuda-mps-control
    MPS=0
    echo "smoke run failed under MPS; again without" | tee -a "$OUT/machine.txt"
    smoke || { echo "smoke run failed: $OUT/smoke.log" >&2; tail -30 "$OUT/smoke.log"; exit 1; }
  else
    echo "smoke run failed: $OUT/smoke.log" >&2
    tail -30 "$OUT/smoke.log"
    exit 1
  fi
fi
echo "smoke run: $(($(date +%s) - t0)) s, mps $MPS" | tee -a "$OUT/machine.txt"

names=()
pids=()
for entry in "$@"; do
  name=${entry%%:*}
  jobs_at_once=${entry#*:}
  [[ $jobs_at_once == "$entry" ]] && jobs_at_once=2
  names+=("$name")
  # its own process group, so that stopping it stops its jobs and nobody else's
  setsid "$PYTHON" study.py study="$name" run "${GPU[@]}" hydra/launcher=joblib \
    hydra.launcher.n_jobs="$jobs_at_once" >"outputs/gpu_studies_$name.log" 2>&1 &
  pids+=($!)
done

pack() {
  local files=()
  for name in "${names[@]}"; do
    files+=(docs/results/"$name"/runs outputs/studies/"$name"/study.log "outputs/gpu_studies_$name.log")
    for run in outputs/studies/"$name"/runs/*/; do
      [[ -f $run/summary.json ]] && files+=("$run"summary.json)
      [[ -f $run/train.log ]] && files+=("$run"train.log)
    done
  done
  tar czf "$OUT/studies.tgz.part" --ignore-failed-read "${files[@]}" 2>/dev/null
  mv "$OUT/studies.tgz.part" "$OUT/studies.tgz"
}

while (($(elapsed) < SECONDS_BUDGET)); do
  alive=0
  for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
  ((alive)) || break
  sleep 20
  pack
  n=0
  for name in "${names[@]}"; do
    n=$((n + $(ls outputs/studies/"$name"/runs/*/summary.json 2>/dev/null | wc -l)))
  done
  echo "$(elapsed) s: $n runs finished"
done
for pid in "${pids[@]}"; do kill -- -"$pid" 2>/dev/null; done
sleep 2
for pid in "${pids[@]}"; do kill -9 -- -"$pid" 2>/dev/null; done
pack
for name in "${names[@]}"; do
  echo "== $name"
  grep -E '^\[20' "outputs/studies/$name/study.log" 2>/dev/null | tail -4
done
[[ $MPS == 1 ]] && echo quit | nvidia-cuda-mps-control
echo "done after $(elapsed) s"
