"""Summarize one finished run as a small JSON file that outlives its run directory: the settings a
sweep varies, final and best validation loss, when the run left the unigram plateau, the
train/val loss curves and the last per-block gradient and RMS profiles.

    .venv/bin/python scripts/sweep_summary.py outputs/sweeps/grid/prenorm_lr3e-3_w150_s1 \
        --baseline 6.3615 --out docs/results/grid/runs/prenorm_lr3e-3_w150_s1.json

run directories are not committed (outputs/ is ignored); these summaries are, so that a later
session can tabulate a sweep that spans sessions (scripts/run_sweeps.sh report).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from spannorm.analysis.compare import Run
from spannorm.tags import LAYER_METRICS, block_series

KEYS = [
    "model.norm",
    "model.n_layers",
    "model.d_model",
    "model.alpha",
    "optim.lr",
    "optim.warmup_steps",
    "seed",
    "trainer.max_steps",
    "data.batch_size",
    "data.seq_len",
]


def escape_step(train_loss: list[tuple[int, float]], threshold: float) -> int | None:
    """The first logged step whose train loss is below `threshold`, or None."""
    return next((step for step, value in train_loss if value < threshold), None)


def history(run: Run, metric: str) -> list[tuple[int, list[float]]]:
    blocks = [dict(series) for series in block_series(run.scalars, metric)]
    steps = sorted({step for block in blocks for step in block})
    return [(step, [block.get(step, math.nan) for block in blocks]) for step in steps]


def finite_or_null(value):
    """`value` with every NaN or infinite float inside it turned into None (JSON's null)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_or_null(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_null(item) for item in value]
    return value


def summarize(run_dir: Path, baseline: float, margin: float = 0.3) -> dict:
    run = Run.load(run_dir, run_dir.name)
    train_loss = run.scalars.get("train/loss", [])
    logged = run.scalars.get("train/plateau_escape_step")
    return {
        "name": run_dir.name,
        "settings": {key: run.settings.get(key) for key in KEYS},
        "complete": run.complete,
        "last_step": run.last_step,
        "final_val_loss": run.final_val_loss,
        "best_val_loss": run.best_val_loss,
        "diverged_at": run.diverged_at,
        "unigram_baseline": baseline,
        "escape_margin": margin,
        # the callback's per-batch value where it ran; else from the logged train/loss points
        "plateau_escape_step": int(logged[0][1])
        if logged
        else escape_step(train_loss, baseline - margin),
        "median_tokens_per_sec": run.median_tokens_per_sec,
        # torch's thread count at each start, [step, threads] (a resumed run has one per start;
        # empty for runs whose every start came before it was logged, see docs/results.md)
        "torch_threads": run.scalars.get("throughput/torch_threads", []),
        "train_loss": train_loss,
        "val_loss": run.scalars.get("val/loss", []),
        # per-block statistics at the last step they were logged (layers/<metric>/block_<l>)
        "profiles": {metric: run.layer_profile(metric) for metric in LAYER_METRICS},
        # the stream gradient of every block at every logged step: [step, [block 0, 1, ...]]
        "stream_grad_norm_history": history(run, "stream_grad_norm"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument(
        "--baseline",
        type=float,
        required=True,
        help="the unigram baseline (nats) printed by the run",
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    summary = summarize(args.run_dir, args.baseline)
    if not summary["complete"]:
        raise SystemExit(
            f"{args.run_dir} stopped at step {summary['last_step']} before its "
            "max_steps; continue it (resume=auto) before summarizing it"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(finite_or_null(summary), default=str, allow_nan=False)
    args.out.write_text(text + "\n")
    print(
        f"{args.out}: final val loss {summary['final_val_loss']:.4f}, escape step "
        f"{summary['plateau_escape_step']}"
        if not math.isnan(summary["final_val_loss"])
        else f"{args.out}: no validation"
    )


if __name__ == "__main__":
    main()
