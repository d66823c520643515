#!/usr/bin/env bash
# GPU check: tokens/s, MFU and peak memory of a GPT-2-small-shaped dense model (d=768, 12 blocks,
# 12 heads, sequence 1024, BPE vocab 8192 on the Shakespeare corpus) and its MoE variant (8
# experts, top-2), trained in bf16 with model.compile=true for a fixed number of steps; then the
# same under trainer=fsdp when more than one GPU is visible. Every callback of
# conf/callbacks/default.yaml is on (the monitors and the final checkpoint; no progress bar), as a
# user runs it. The figures are those the throughput callback logs to TensorBoard (throughput/*),
# as medians over its windows; tok/s/GPU is throughput/tokens_per_sec_per_device.
#
#   scripts/gpu_check.sh prepare          # here, with the network: fetch into .whl/ the wheels a
#                                         # bare GPU machine lacks; build the corpus and its caches
#   GPU_CHECK_DRY=1 scripts/gpu_check.sh  # the same path on CPU at toy sizes (fsdp on 2 processes)
#   scripts/gpu_check.sh                  # on the GPU machine, with .whl/, data/shakespeare/ and
#                                         # data/cache/ copied beside the checkout
#
# Environment: SPANNORM_DATA_DIR (default data) holds shakespeare/{train,validation}.txt;
# GPU_CHECK_STEPS (default 150), GPU_CHECK_BATCH (default 32 sequences per GPU),
# GPU_CHECK_RUN_TIMEOUT (default 220 s per training run); when OUT is set (the device tool's
# output folder) the summary and each run's log end are copied there.
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ -x .venv/bin/python ]]; then PYTHON=${PYTHON:-.venv/bin/python}; else PYTHON=${PYTHON:-python3}; fi
export SPANNORM_DATA_DIR=${SPANNORM_DATA_DIR:-data}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
WHEELS=(hydra-core==1.3.8 omegaconf==2.3.1 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19)
SDIST_ONLY=(antlr4-python3-runtime==4.9.3)  # no wheel on PyPI: built here (pure Python)

fetch_wheels() {
  local platforms=(manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64)
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]/#/--platform=}" -d .whl "${WHEELS[@]}" &&
    "$PYTHON" -m pip wheel -q --no-deps -w .whl "${SDIST_ONLY[@]}"
}

install_missing() {
  "$PYTHON" -c "import hydra, omegaconf, datasets" 2>/dev/null && return 0
  if ! compgen -G ".whl/*.whl" >/dev/null; then
    echo "error: packages are missing and there is no .whl/ folder; run 'scripts/gpu_check.sh" \
      "prepare' where pip works and carry .whl" >&2
    return 1
  fi
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/spannorm-site .whl/*.whl || return 1
  export PYTHONPATH="$PYTHONPATH:/tmp/spannorm-site"
}

build_corpus() {  # the default data config's corpus, tokenizer and token caches
  "$PYTHON" - <<'PY'
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from spannorm.cli import register_resolvers

register_resolvers()

with initialize_config_dir(version_base="1.3", config_dir=str(Path("conf").resolve())):
    instantiate(compose("train").data).prepare_data()
PY
}

if [[ "${1:-}" == prepare ]]; then
  fetch_wheels && build_corpus || exit 1
  echo "ready to carry: .whl ($(ls .whl | wc -l) wheels), $SPANNORM_DATA_DIR/shakespeare," \
    "$SPANNORM_DATA_DIR/cache"
  exit 0
fi

for split in train validation; do
  if [[ ! -s "$SPANNORM_DATA_DIR/shakespeare/$split.txt" ]]; then
    echo "error: $SPANNORM_DATA_DIR/shakespeare/$split.txt is missing: build the corpus where pip" \
      "works (scripts/gpu_check.sh prepare) and carry $SPANNORM_DATA_DIR/shakespeare and" \
      "$SPANNORM_DATA_DIR/cache, or set SPANNORM_DATA_DIR" >&2
    exit 2
  fi
done
install_missing || exit 1

STEPS=${GPU_CHECK_STEPS:-150}
if [[ -n "${GPU_CHECK_DRY:-}" ]]; then
  export OMP_NUM_THREADS=1
  STEPS=${GPU_CHECK_STEPS:-20}
  shape=(model.d_model=64 model.n_layers=2 model.n_heads=2 data.seq_len=64
    "data.batch_size=${GPU_CHECK_BATCH:-4}")
  device=(trainer.accelerator=cpu trainer.precision=32-true)
  n_devices=2  # CPU processes standing in for GPUs
else
  shape=(model.d_model=768 model.n_layers=12 model.n_heads=12 data.seq_len=1024
    "data.batch_size=${GPU_CHECK_BATCH:-32}")
  device=()
  n_devices=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())") || exit 1
  if ((n_devices == 0)); then
    echo "error: no GPU visible to torch; GPU_CHECK_DRY=1 runs the CPU path" >&2
    exit 1
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
"$PYTHON" -c "import torch, lightning; print('torch', torch.__version__, '| lightning', lightning.__version__)"

common=(
  "${shape[@]}" model.compile=true
  "trainer.max_steps=$STEPS" ++trainer.limit_val_batches=0 trainer.log_every_n_steps=10
  callbacks.throughput.every_n_steps=10 callbacks.progress=null checkpoint_every_n_steps=null
  ++trainer.enable_progress_bar=false
)
variants=(dense moe)
declare -A variant_overrides=([dense]="model.ffn=dense" [moe]="model.ffn=moe model.n_experts=8 model.top_k=2")
root=outputs/gpu_check/$(date +%Y-%m-%d_%H-%M-%S)
runs=() failed=()

train() {  # train NAME OVERRIDES...: one run in $root/NAME, its output in $root/NAME.log
  local name=$1 start=$SECONDS
  shift
  echo "== $name: $*"
  if timeout "${GPU_CHECK_RUN_TIMEOUT:-220}" "$PYTHON" train.py "${common[@]}" "$@" \
    "hydra.run.dir=$root/$name" >"$root/$name.log" 2>&1; then
    runs+=("$root/$name")
  else
    echo "FAILED (exit $?); the end of $root/$name.log:"
    tail -n 30 "$root/$name.log"
    failed+=("$name")
  fi
  echo "   $((SECONDS - start)) s"
}

mkdir -p "$root"
for variant in "${variants[@]}"; do
  # shellcheck disable=SC2086  # the overrides are space-separated words
  train "$variant" "${device[@]}" trainer=gpu ${variant_overrides[$variant]}
done
if ((n_devices > 1)); then
  for variant in "${variants[@]}"; do
    # shellcheck disable=SC2086
    train "fsdp_$variant" "${device[@]}" trainer=fsdp "trainer.devices=$n_devices" \
      ${variant_overrides[$variant]}
  done
fi

"$PYTHON" - "${runs[@]}" <<'PY' | tee "$root/summary.txt"
"""One line per run: parameters, throughput/* medians, peak memory and the training loss."""
import statistics
import sys
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from spannorm.cli import register_resolvers

register_resolvers()
from spannorm.callbacks.throughput import matmul_params
from spannorm.analysis.scalars import read_scalars

header = ("run", "GPUs", "params", "active", "tok/s/GPU", "MFU", "TFLOP/s", "step ms", "peak GiB",
          "train loss")
print(("{:<11}" + "{:>11}" * (len(header) - 1)).format(*header))
for run in map(Path, sys.argv[1:]):
    cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    with torch.device("meta"):
        model = instantiate(cfg.model).model
    scalars = read_scalars(run)

    def median(tag):
        return statistics.median(v for _, v in scalars[tag]) if tag in scalars else float("nan")

    peak = max((v for _, v in scalars.get("throughput/peak_memory_mib", [])), default=float("nan"))
    losses = [v for _, v in scalars.get("train/loss", [])] or [float("nan")]
    row = (run.name, cfg.trainer.devices, f"{model.num_params(non_embedding=False) / 1e6:.1f}M",
           f"{matmul_params(model) / 1e6:.1f}M", f"{median('throughput/tokens_per_sec_per_device'):,.0f}",
           f"{100 * median('throughput/mfu'):.1f}%", f"{median('throughput/tflops'):.1f}",
           f"{median('throughput/step_time_ms'):.0f}", f"{peak / 1024:.2f}",
           f"{losses[0]:.2f}>{losses[-1]:.2f}")
    print(("{:<11}" + "{:>11}" * (len(row) - 1)).format(*row))
PY
summary_status=$?

if [[ -n "${OUT:-}" ]]; then
  cp "$root/summary.txt" "$OUT/"
  for log in "$root"/*.log; do tail -n 200 "$log" >"$OUT/$(basename "$log")"; done
fi
echo "runs under $root"
if ((${#failed[@]} || summary_status)); then
  echo "FAILED: ${failed[*]:-summary}"
  exit 1
fi
