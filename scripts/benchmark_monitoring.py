"""Cost of the monitoring callbacks: training-step time with them on vs off.

"On" adds every non-null callback that conf/callbacks/default.yaml has beyond
conf/callbacks/minimal.yaml, at its configured interval; "off" adds none. Both arms train the same
model (same seed) on the same data with the TensorBoard logger, no validation, no checkpoints and
no progress bar. Each repeat runs both arms back to back (alternating which goes first). A step's
time runs from the end of the previous step to the end of its own, on two clocks: wall time, and
the process's CPU time (all its threads, the image-drawing one included).

Per run: the mean step time over the `--steps` steps after `--warmup` (what training pays,
logging steps included) and the median step time (a plain step: what monitoring costs on every
step). Overhead = median over repeats of the paired ratio on/off - 1, so that a load change on a
shared machine between repeats cancels; mean-overhead minus median-overhead is the share of the
logging steps. Prints a markdown table with the command and the machine.

    .venv/bin/python scripts/benchmark_monitoring.py --machine "2-core shared CPU, no GPU"
    .venv/bin/python scripts/benchmark_monitoring.py model.n_layers=16   # Hydra overrides
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from spannorm.bench.machine import describe_machine
from spannorm.bench.stats import paired_ratio
from spannorm.bench.timing import CLOCKS, StepClock
from spannorm.data.prepare import build_datamodule
from spannorm.runs import register_resolvers

CONF = Path(__file__).resolve().parents[1] / "conf"
CLOCK_NAMES = {"wall": "wall", "cpu": "process CPU"}


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
    parser.add_argument("--machine", default=None, help="described in the report (default: probed)")
    return parser.parse_args()


def step_times(cfg, datamodule, callbacks: list[L.Callback], args, log_dir: str) -> dict:
    """Train a fresh model for warmup + steps steps; {clock: {"mean": s, "median": s}} of the
    timed steps."""
    L.seed_everything(cfg.seed, verbose=False)
    clock = StepClock()
    trainer = instantiate(
        cfg.trainer,
        max_steps=args.warmup + args.steps,
        limit_val_batches=0,
        logger=L.pytorch.loggers.TensorBoardLogger(log_dir),
        callbacks=[*callbacks, clock],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(instantiate(cfg.model), datamodule=datamodule)
    result = {}
    for name in CLOCKS:
        durations, _ = clock.step_times(args.warmup, args.steps, name)
        result[name] = {"mean": statistics.mean(durations), "median": statistics.median(durations)}
    return result


def report(times: dict[str, list[dict]], clock: str) -> str:
    """One table row per clock: both arms' medians over repeats and the paired overheads."""
    cells = []
    for statistic in ("mean", "median"):
        off, on = ([run[clock][statistic] for run in times[arm]] for arm in ("off", "on"))
        ratio = paired_ratio(on, off).median
        cells += [
            f"{1e3 * statistics.median(off):.1f}",
            f"{1e3 * statistics.median(on):.1f}",
            f"{100 * (ratio - 1):+.2f}%",
        ]
    return f"| {CLOCK_NAMES[clock]} | " + " | ".join(cells) + " |"


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    register_resolvers()

    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        with tempfile.TemporaryDirectory() as tmp:
            cfg = compose("train", overrides=[f"run_dir={tmp}", *args.overrides])
            minimal = compose("train", overrides=[f"run_dir={tmp}", "callbacks=minimal"])
            monitors = [
                n for n, c in cfg.callbacks.items() if c is not None and n not in minimal.callbacks
            ]
            datamodule = build_datamodule(cfg.data)
            times: dict[str, list[dict]] = {"off": [], "on": []}
            for repeat in range(args.repeats):
                for arm in ("off", "on") if repeat % 2 == 0 else ("on", "off"):
                    callbacks = (
                        [instantiate(cfg.callbacks[n]) for n in monitors] if arm == "on" else []
                    )
                    run = step_times(cfg, datamodule, callbacks, args, f"{tmp}/{arm}{repeat}")
                    times[arm].append(run)
                    print(
                        f"repeat {repeat} monitoring {arm}: mean, median ms/step "
                        + "; ".join(
                            f"{CLOCK_NAMES[clock]} {1e3 * t['mean']:.1f}, {1e3 * t['median']:.1f}"
                            for clock, t in run.items()
                        ),
                        flush=True,
                    )
    model = cfg.model
    print(
        f"\n`{shlex.join(['python', *sys.argv])}` on {args.machine or describe_machine()}, "
        f"torch {torch.__version__}, "
        f"{args.threads} thread(s); model d={model.d_model} L={model.n_layers} "
        f"heads={model.n_heads}, batch {cfg.data.batch_size} x seq {cfg.data.seq_len}, "
        f"{cfg.data.tokenizer} vocab {model.vocab_size}; monitors: {', '.join(monitors)}; "
        f"{args.repeats} repeats of {args.steps} timed steps\n\n"
        "| clock | mean ms/step off | on | overhead | median ms/step off | on | overhead |\n"
        "|---|---|---|---|---|---|---|\n" + "\n".join(report(times, clock) for clock in CLOCKS)
    )


if __name__ == "__main__":
    main()
