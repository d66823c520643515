"""Training speed on CPU (conf/benchmark.yaml; the results are summarized in docs/performance.md).

(a) train.py against a bare loop, in `bench.rounds` rounds (the arms' order rotates each round),
    every run in a fresh process:
    - train.py runs as a user runs it, for warmup_steps + timed_steps steps with the default
      callbacks, logging and TensorBoard logger, plus `StepClock`. Its clock: from the end of
      step `warmup_steps` to the end of the last step, less validation;
    - the bare loop (`bare_run`) trains the same model from the same seed on the same DataLoader
      with the LanguageModel's own setup, loss, optimizer and schedule and the trainer's clipping.
      Its clock: the sum over the timed steps of next(batch) + the step;
    - `bench.variants`: train.py again with more overrides (e.g. callbacks=minimal), to price parts;
    - with `bench.malloc_ab`, the bare loop again without `setup` (glibc's malloc left as is).
    Reported: tokens/s per arm and round, the ratios per round, medians over rounds.
(b) fwd+bwd+optimizer step time of every placement against prenorm, interleaved on batches held in
    memory: the median over rounds of (median step of the placement / prenorm's, same round).
(c) the data path built from nothing in a temporary data_dir, stage by stage, and loaded from the
    cache; the share of the timed steps spent waiting for the next batch in each arm of (a).
(d) the peak RSS of the processes of (a) and the MFU of each arm, against the fastest fp32 matmul
    measured here; FLOPs per token = 6 N + 12 L d T (`spannorm.callbacks.throughput`).
Writes <bench.output_dir>/cpu-<date>_<time>.json and .md.
"""

from __future__ import annotations

import datetime
import itertools
import json
import multiprocessing
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from spannorm.analysis.benchmark import (
    BareLoop,
    StepClock,
    bare_run,
    matmul_peak,
    quiet_lightning,
    run_logged,
    template_timing,
    time_data_path,
    time_placements,
)
from spannorm.callbacks.throughput import flops_per_token
from spannorm.cli import UsageError, build_datamodule, console, friendly_errors
from spannorm.model import PLACEMENTS

REPO = Path(__file__).resolve().parents[1]


def check_config(cfg: DictConfig) -> None:
    bench = cfg.bench
    if cfg.trainer.accelerator != "cpu" or str(cfg.trainer.precision) not in ("32-true", "32"):
        raise UsageError("scripts/benchmark.py times the CPU fp32 path: use trainer=cpu")
    if bench.warmup_steps < 1 or bench.timed_steps < 2 or bench.rounds < 1:
        raise UsageError("bench.warmup_steps >= 1, bench.timed_steps >= 2 and bench.rounds >= 1")


def describe_machine() -> str:
    """`<cores>-core <CPU model> CPU, no GPU` (or `a GPU`, if torch sees one)."""
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    names = [line for line in lines if line.startswith("model name")]
    if names:
        model = names[0].split(":", 1)[1].strip()
    return f"{os.cpu_count()}-core {model} CPU, {'a' if torch.cuda.is_available() else 'no'} GPU"


def load() -> float:
    return round(os.getloadavg()[0], 2)


def train_script_run(cfg: DictConfig, workdir: Path, tag: str, extra: list[str]) -> dict:
    """One timed train.py run with the command line's train overrides, then `extra` ones."""
    bench = cfg.bench
    clock = workdir / f"clock-{tag}.json"
    task = HydraConfig.get().overrides.task
    overrides = [o for o in task if not o.lstrip("+~").startswith("bench.")]
    command = [
        sys.executable,
        str(REPO / "train.py"),
        *overrides,
        *extra,
        f"trainer.max_steps={bench.warmup_steps + bench.timed_steps}",
        f"hydra.run.dir={workdir / f'run-{tag}'}",
        f"+callbacks.step_clock._target_={StepClock.__module__}.{StepClock.__name__}",
        f"+callbacks.step_clock.path={clock}",
    ]
    env = {**os.environ, **({"TTY_COMPATIBLE": "1"} if bench.terminal else {})}
    peak_rss = run_logged(command, workdir / f"run-{tag}.log", env)
    timing = template_timing(json.loads(clock.read_text()), bench.warmup_steps, bench.timed_steps)
    return {**vars(timing), "peak_rss_mib": peak_rss}


def bare_loop_run(cfg: DictConfig, fit_setup: bool) -> dict:
    """One timed bare-loop run in a fresh process, as train.py gets."""
    train_cfg = OmegaConf.to_container(cfg, resolve=True)
    steps = (cfg.bench.warmup_steps, cfg.bench.timed_steps)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as process:
        return process.submit(bare_run, train_cfg, *steps, fit_setup).result()


def timed_arms(cfg: DictConfig, workdir: Path) -> tuple[dict, dict]:
    """(a)'s arms, name -> run(round index), and its ratios, name -> (arm, arm) of tokens/s:
    train.py and the bare loop; `bench.variants`, train.py with more overrides; with
    `bench.malloc_ab`, the bare loop without LanguageModel.setup."""
    arms = {
        "train.py": lambda index: train_script_run(cfg, workdir, str(index), []),
        "bare": lambda index: bare_loop_run(cfg, fit_setup=True),
    }
    ratios = {"train.py / bare": ("train.py", "bare")}
    for variant, extra in cfg.bench.variants.items():
        arms[f"train.py {variant}"] = lambda index, variant=variant, extra=list(extra): (
            train_script_run(cfg, workdir, f"{index}-{variant}", extra)
        )
        ratios[f"{variant} / bare"] = (f"train.py {variant}", "bare")
    if cfg.bench.malloc_ab:
        arms["bare, malloc defaults"] = lambda index: bare_loop_run(cfg, fit_setup=False)
        ratios["malloc setting"] = ("bare", "bare, malloc defaults")
    return arms, ratios


def compare_with_bare_loop(cfg: DictConfig, tokens_per_step: int) -> dict:
    """(a): per round and arm, the timing, tokens/s and wait share; the ratios; the medians."""
    bench = cfg.bench
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        arms, ratios = timed_arms(cfg, Path(tmp))
        names = list(arms)
        for index in range(bench.rounds):
            measured = {"load_1min": load()}
            shift = index % len(names)
            for name in [*names[shift:], *names[:shift]]:
                run = arms[name](index)
                run["tokens_per_s"] = tokens_per_step * bench.timed_steps / run["seconds"]
                run["wait_share"] = run["wait_seconds"] / run["seconds"]
                # time beyond timed_steps x the run's median step: the periodic work (checkpoints,
                # monitors at their intervals) measured inside one process, so free of the drift
                # between processes
                run["above_median_share"] = (
                    1 - bench.timed_steps * run["median_step"] / run["seconds"]
                )
                measured[name] = run
            measured["ratios"] = {
                ratio: measured[a]["tokens_per_s"] / measured[b]["tokens_per_s"]
                for ratio, (a, b) in ratios.items()
            }
            rounds.append(measured)
            console.print(
                f"round {index} (load {measured['load_1min']}): "
                + ", ".join(f"{name} {measured[name]['tokens_per_s']:.0f} tok/s" for name in names)
                + "".join(f", {ratio} {value:.3f}" for ratio, value in measured["ratios"].items())
            )
    summary = {
        name: {
            **{
                key: statistics.median(r[name][key] for r in rounds)
                for key in (
                    "tokens_per_s",
                    "median_step",
                    "wait_share",
                    "above_median_share",
                    "median_wait",
                    "faults_per_step",
                )
            },
            "peak_rss_mib": max(r[name]["peak_rss_mib"] for r in rounds),
        }
        for name in names
    }
    ratios = {
        ratio: statistics.median(r["ratios"][ratio] for r in rounds)
        for ratio in rounds[0]["ratios"]
    }
    return {"rounds": rounds, "arms": summary, "ratios": ratios}


def compare_placements(cfg: DictConfig, datamodule) -> dict:
    """(b): per placement, the median step time and its ratio to prenorm's."""
    bench = cfg.bench
    names = list(bench.placements or PLACEMENTS)
    names = names if "prenorm" in names else ["prenorm", *names]
    batches = list(itertools.islice(datamodule.train_dataloader(), 8))

    def make_loop(name: str) -> BareLoop:
        L.seed_everything(cfg.seed, verbose=False)
        steps = 1 + bench.placement_rounds * bench.placement_steps
        return BareLoop(instantiate(cfg.model, norm=name), steps, cfg.trainer.gradient_clip_val)

    medians = time_placements(
        make_loop, names, batches, bench.placement_rounds, bench.placement_steps
    )
    prenorm = medians["prenorm"]
    return {
        name: {
            "median_step": statistics.median(times),
            "ratio": statistics.median(t / p for t, p in zip(times, prenorm, strict=True)),
            "round_medians": times,
        }
        for name, times in medians.items()
    }


def markdown(results: dict) -> str:
    """The results as markdown tables, with the command, the machine and the load."""
    training = results["training"]
    names, ratios = list(training["arms"]), list(training["ratios"])
    peak = max(results["matmul_flops"].values())
    lines = [
        f"Command: `{results['command']}`  ",
        f"Machine: {results['machine']}, torch {results['torch']} ({results['threads']} threads); "
        f"1-minute load average {results['load_start']} at the start, {results['load_end']} at "
        f"the end; {results['started']}, {results['minutes']:.1f} min.  ",
        f"Shape: {results['shape']}.",
        "",
        "(a) tokens/s over the timed steps",
        "",
        "| round | load | " + " | ".join([*names, *ratios]) + " |",
        "|---:|---:|" + "---:|" * (len(names) + len(ratios)),
        *(
            f"| {i} | {r['load_1min']} | "
            + " | ".join(
                [f"{r[n]['tokens_per_s']:.0f}" for n in names]
                + [f"{r['ratios'][k]:.3f}" for k in ratios]
            )
            + " |"
            for i, r in enumerate(training["rounds"])
        ),
        "| median | | "
        + " | ".join(
            [f"{training['arms'][n]['tokens_per_s']:.0f}" for n in names]
            + [f"**{training['ratios'][k]:.3f}**" for k in ratios]
        )
        + " |",
        "",
        "(b) step time (fwd+bwd+optimizer) per placement",
        "",
        "| placement | median step (ms) | / prenorm |",
        "|---|---:|---:|",
        *(
            f"| {name} | {1e3 * p['median_step']:.1f} | {p['ratio']:.3f} |"
            for name, p in results["placements"].items()
        ),
        "",
        "(c) data path (seconds)",
        "",
        "| stage | s |",
        "|---|---:|",
        *(
            f"| {stage} | {'-' if seconds is None else f'{seconds:.2f}'} |"
            for stage, seconds in results.get("data", {}).items()
        ),
        "",
        "(a, c, d) per arm: medians over rounds; peak RSS: the largest process; MFU from the "
        "median tokens/s",
        "",
        "| arm | step (ms) | time above the median step | wait for the batch (ms) | wait share "
        "| page faults / step | peak RSS (MiB) | MFU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        *(
            f"| {name} | {1e3 * arm['median_step']:.1f} | {100 * arm['above_median_share']:.1f}% "
            f"| {1e3 * arm['median_wait']:.2f} | {100 * arm['wait_share']:.2f}% "
            f"| {arm['faults_per_step']:.0f} "
            f"| {arm['peak_rss_mib']:.0f} "
            f"| {100 * arm['tokens_per_s'] * results['flops_per_token'] / peak:.1f}% |"
            for name, arm in training["arms"].items()
        ),
        "",
        "fp32 matmul GFLOP/s by size: "
        + ", ".join(f"{n}: {flops / 1e9:.0f}" for n, flops in results["matmul_flops"].items())
        + f"; FLOPs per token 6N + 12LdT = {results['flops_per_token'] / 1e6:.2f} M.",
        "",
    ]
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path="../conf", config_name="benchmark")
@friendly_errors
def main(cfg: DictConfig) -> None:
    check_config(cfg)
    quiet_lightning()
    bench = cfg.bench
    started, now = time.perf_counter(), datetime.datetime.now()
    results = {
        "command": shlex.join(["python", "scripts/benchmark.py", *sys.argv[1:]]),
        "machine": bench.machine or describe_machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "started": now.isoformat(timespec="seconds"),
        "load_start": load(),
        "shape": (
            f"{cfg.model.norm} d={cfg.model.d_model} L={cfg.model.n_layers} "
            f"heads={cfg.model.n_heads}, batch {cfg.data.batch_size} x seq {cfg.data.seq_len}, "
            f"{cfg.data.tokenizer} vocab {cfg.data.vocab_size}; {bench.rounds} rounds of "
            f"{bench.warmup_steps} + {bench.timed_steps} steps"
        ),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    results["matmul_flops"] = matmul_peak(bench.matmul_sizes)
    console.print(f"matmul peak {max(results['matmul_flops'].values()) / 1e9:.0f} GFLOP/s")
    if bench.cold_data:
        with tempfile.TemporaryDirectory() as data_dir:
            results["data"] = time_data_path(cfg.data, Path(data_dir), bench.cached_repeats)
        console.print(f"data path (s): {results['data']}")
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    results["flops_per_token"] = flops_per_token(instantiate(cfg.model).model, cfg.data.seq_len)
    results["training"] = compare_with_bare_loop(cfg, tokens_per_step)
    results["placements"] = compare_placements(cfg, build_datamodule(cfg.data))
    results["load_end"] = load()
    results["minutes"] = (time.perf_counter() - started) / 60
    out = Path(bench.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"cpu-{now:%Y-%m-%d_%H-%M}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1))
    report = markdown(results)
    stem.with_suffix(".md").write_text(report)
    console.print(report, markup=False)


if __name__ == "__main__":
    main()
