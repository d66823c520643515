"""The run's own summary: `summary.json` in the run directory when the run ends, a small file that
outlives the run directory and is what a study reads (`spannorm.studies`): the run's settings,
final and best validation loss, when it left the unigram plateau, the train/val loss curves, the
last per-block profiles and the per-block stream gradient at every logged step.

Written on rank 0 when training reaches its `max_steps`, and when the divergence guard stops the
run (a diverged run is a result: `diverged_at` says where). A run stopped by a signal writes none,
so that a study continues it (`resume=auto`) instead of counting it as done. The curves are read
back from the run's TensorBoard events (the default logger), so a resumed run's summary holds
every start's points; without them (`logger=null`) it holds the last validation loss only.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L

from spannorm.analysis.compare import Run
from spannorm.errors import TrainingDiverged
from spannorm.files import atomic_output
from spannorm.tags import LAYER_METRICS, block_series

SUMMARY_FILE = "summary.json"

# The settings every summary names first (the keys the committed grid summaries hold); the rest
# of the run's model, optim, data and trainer options follow, so that a study can vary any of them.
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
SETTING_GROUPS = ("model.", "optim.", "data.", "trainer.")


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


def plain(value):
    """A setting as JSON holds it: numbers, strings, booleans, null and lists of them."""
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    if isinstance(value, list | tuple):
        return [plain(item) for item in value]
    return str(value)


def settings_of(run: Run) -> dict:
    extra = {
        key: plain(value)
        for key, value in sorted(run.settings.items())
        if key.startswith(SETTING_GROUPS) and key not in KEYS and not isinstance(value, dict)
    }
    return {**{key: plain(run.settings.get(key)) for key in KEYS}, **extra}


def summarize(run_dir: Path, baseline: float, margin: float = 0.3) -> dict:
    """The summary of the run in `run_dir` (its `.hydra/` files and TensorBoard events)."""
    run_dir = Path(run_dir)
    run = Run.load(run_dir, run_dir.name)
    train_loss = run.scalars.get("train/loss", [])
    logged = run.scalars.get("train/plateau_escape_step")
    return {
        "name": run_dir.name,
        "settings": settings_of(run),
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
        # torch's thread count at each start, [step, threads] (a resumed run has one per start)
        "torch_threads": run.scalars.get("throughput/torch_threads", []),
        "train_loss": train_loss,
        "val_loss": run.scalars.get("val/loss", []),
        # per-block statistics at the last step they were logged (layers/<metric>/block_<l>)
        "profiles": {metric: run.layer_profile(metric) for metric in LAYER_METRICS},
        # the stream gradient of every block at every logged step: [step, [block 0, 1, ...]]
        "stream_grad_norm_history": history(run, "stream_grad_norm"),
    }


def write_summary(summary: dict, path: Path) -> None:
    """Write `summary` as one line of JSON (NaN and inf as null), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(finite_or_null(summary), default=str, allow_nan=False)
    with atomic_output(path) as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")


class RunSummary(L.Callback):
    """Writes `<run dir>/summary.json` at the end of a finished or diverged run (rank 0). The
    unigram baseline is the datamodule's (`unigram_baseline()`); `margin` is the plateau margin
    used when the run did not log `train/plateau_escape_step` itself."""

    def __init__(self, margin: float = 0.3, filename: str = SUMMARY_FILE):
        if margin <= 0:
            raise ValueError(f"callbacks.summary: margin={margin} must be positive (nats)")
        self.margin = margin
        self.filename = filename

    def on_fit_end(self, trainer, pl_module) -> None:
        if trainer.max_steps > 0 and trainer.global_step < trainer.max_steps:
            return  # stopped early (a signal, a time limit): to be continued, not summarized
        self._write(trainer)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, TrainingDiverged):
            self._write(trainer)

    def _write(self, trainer) -> None:
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:  # the events must be on disk before they are read back
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "flush"):
                experiment.flush()
        run_dir = Path(trainer.default_root_dir)
        if not (run_dir / ".hydra" / "config.yaml").is_file():
            return  # not started by a Hydra entry point: no saved config to summarize
        baseline = getattr(trainer.datamodule, "unigram_baseline", None)
        value = float(baseline()) if callable(baseline) else math.nan
        summary = summarize(run_dir, value, self.margin)
        if math.isnan(summary["final_val_loss"]) and "val/loss" in trainer.callback_metrics:
            # no TensorBoard events (logger=null or csv): the last validation still counts; the
            # curves stay empty
            summary["final_val_loss"] = float(trainer.callback_metrics["val/loss"])
        write_summary(summary, run_dir / self.filename)
