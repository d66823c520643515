"""Cost of the monitoring callbacks: mean training-step time with them on vs off.

"On" adds every callback that conf/callbacks/default.yaml has beyond conf/callbacks/minimal.yaml,
at its configured interval; "off" adds none. Both arms train the same model (same seed) on the same
data with the TensorBoard logger, no validation, no checkpoints and no progress bar. Each repeat
runs both arms (alternating which goes first); a run's step time is the time its `--steps` steps
after `--warmup` took, divided by `--steps`, on two clocks: wall time, and the process's CPU time
(all its threads; on a shared machine it is far less disturbed by other processes than wall time).
Prints a markdown table of the medians over repeats, with the command and the machine.

    .venv/bin/python scripts/benchmark_monitoring.py --machine "2-core shared CPU, no GPU"
    .venv/bin/python scripts/benchmark_monitoring.py model.n_layers=16   # Hydra overrides
"""

from __future__ import annotations

import argparse
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from spannorm.cli import build_datamodule

CONF = Path(__file__).resolve().parents[1] / "conf"


class StepTimer(L.Callback):
    """Wall and process CPU time from the end of step `warmup` to the end of the last step."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.start = self.end = (0.0, 0.0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = (time.perf_counter(), time.process_time())
        if trainer.global_step == self.warmup:
            self.start = now
        self.end = now


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/train.yaml")
    parser.add_argument("--steps", type=int, default=100, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads; 1 keeps a shared CPU from oversubscribing",
    )
    parser.add_argument("--machine", default=f"{platform.processor() or platform.machine()} CPU")
    return parser.parse_args()


def step_seconds(cfg, datamodule, callbacks: list[L.Callback], args, log_dir: str) -> tuple:
    """Train a fresh model for warmup + steps steps; the (wall, CPU) seconds per timed step."""
    L.seed_everything(cfg.seed, verbose=False)
    timer = StepTimer(args.warmup)
    trainer = instantiate(
        cfg.trainer,
        max_steps=args.warmup + args.steps,
        limit_val_batches=0,
        logger=L.pytorch.loggers.TensorBoardLogger(log_dir),
        callbacks=[*callbacks, timer],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(instantiate(cfg.model), datamodule=datamodule)
    return tuple(
        (end - start) / args.steps for start, end in zip(timer.start, timer.end, strict=True)
    )


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    import spannorm.cli  # noqa: F401  (registers the config resolvers)

    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        with tempfile.TemporaryDirectory() as tmp:
            cfg = compose("train", overrides=[f"run_dir={tmp}", *args.overrides])
            minimal = compose("train", overrides=[f"run_dir={tmp}", "callbacks=minimal"])
            monitors = [
                n for n, c in cfg.callbacks.items() if c is not None and n not in minimal.callbacks
            ]
            datamodule = build_datamodule(cfg.data)
            times: dict[str, list[tuple[float, float]]] = {"off": [], "on": []}
            for repeat in range(args.repeats):
                for arm in ("off", "on") if repeat % 2 == 0 else ("on", "off"):
                    callbacks = (
                        [instantiate(cfg.callbacks[n]) for n in monitors] if arm == "on" else []
                    )
                    seconds = step_seconds(cfg, datamodule, callbacks, args, f"{tmp}/{arm}{repeat}")
                    times[arm].append(seconds)
                    print(
                        f"repeat {repeat} monitoring {arm}: wall, CPU ms/step "
                        f"{1e3 * seconds[0]:.1f}, {1e3 * seconds[1]:.1f}",
                        flush=True,
                    )
    model = cfg.model
    rows = []
    for clock, name in enumerate(("wall", "process CPU")):
        off, on = ([run[clock] for run in times[arm]] for arm in ("off", "on"))
        overhead = 100 * (statistics.median(on) / statistics.median(off) - 1)
        rows.append(
            f"| {name} | {1e3 * statistics.median(off):.1f} | {1e3 * statistics.median(on):.1f} "
            f"| {overhead:+.2f}% | {', '.join(f'{1e3 * t:.0f}' for t in off)} "
            f"| {', '.join(f'{1e3 * t:.0f}' for t in on)} |"
        )
    print(
        f"\n`{shlex.join([Path(sys.executable).name, *sys.argv])}` on {args.machine}, "
        f"torch {torch.__version__}, {args.threads} thread(s); model d={model.d_model} "
        f"L={model.n_layers} heads={model.n_heads}, batch {cfg.data.batch_size} x seq "
        f"{cfg.data.seq_len}, {cfg.data.tokenizer} vocab {model.vocab_size}; monitors: "
        f"{', '.join(monitors)}; {args.repeats} repeats of {args.steps} timed steps\n\n"
        "| clock | off: median ms/step | on: median ms/step | overhead | off runs | on runs |\n"
        "|---|---|---|---|---|---|\n" + "\n".join(rows)
    )


if __name__ == "__main__":
    main()
