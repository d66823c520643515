"""Training speed on CPU (conf/benchmark.yaml; the results are summarized in docs/performance.md).

(a) train.py against a bare PyTorch loop. Each of `bench.rounds` rounds runs train.py as a user
    runs it (a fresh process; the default callbacks, logging and TensorBoard logger) for
    warmup_steps + timed_steps steps with a `TwinClock`, which interleaves a bare-loop twin: a copy
    of the model at the same initial weights on its own pass over the same DataLoader, with the
    LanguageModel's own loss, optimizer and schedule and the trainer's clipping, running
    `bench.twin_every` steps after every `bench.twin_every` train.py steps. So both see the same
    process and the same load, which on a shared machine drifts by more than the difference
    sought. train.py's clock: from the end of one step to the end of the next, with the twin's
    steps and validation left out; the twin's: from next(batch) to the end of its step.
    Reported: tokens/s of both and their ratio per round; medians over rounds, each ratio with
    an interval (`spannorm.bench.stats`). `bench.variants` adds train.py runs with more overrides;
    `bench.malloc_ab` adds the bare loop alone in fresh processes, with and without
    train.py's malloc setting (`keep_freed_memory`).
(b) fwd+bwd+optimizer step time of every placement against prenorm, interleaved on batches held in
    memory: the median over rounds of (median step of the placement / prenorm's, same round).
(c) the data path built from nothing in a temporary data_dir, stage by stage, and loaded from the
    cache; the share of the timed steps spent waiting for the next batch in (a).
(d) peak RSS of one more train.py run, without the twin; the MFU of each arm of (a) against the
    fastest fp32 matmul measured here; FLOPs per token 6 N + 12 L d T (callbacks.throughput).
Writes <bench.output_dir>/cpu-<date>_<time>.json and .md.
"""

from __future__ import annotations

import datetime
import itertools
import json
import multiprocessing
import os
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

from spannorm.bench.bare import BareLoop, bare_run, endless, quiet_lightning
from spannorm.bench.machine import describe_machine, load_average
from spannorm.bench.memory import run_logged
from spannorm.bench.stats import Ratio, paired_ratio, summarize
from spannorm.bench.timing import interleaved_rounds
from spannorm.bench.twin import TwinClock, template_timing, twin_timing
from spannorm.callbacks.throughput import flops_per_token, measure_matmul_flops
from spannorm.cli import friendly_errors, launch
from spannorm.console import console
from spannorm.data.prepare import build_datamodule, prepare_data
from spannorm.data.shakespeare import ensure_shakespeare
from spannorm.errors import UsageError
from spannorm.model import PLACEMENTS

REPO = Path(__file__).resolve().parents[1]
TWIN = ": bare twin"  # suffix of the twin arm of a train.py arm
RUN_NUMBERS = itertools.count()  # names the files of each train.py run


def check_config(cfg: DictConfig) -> None:
    bench = cfg.bench
    if cfg.trainer.accelerator != "cpu" or str(cfg.trainer.precision) not in ("32-true", "32"):
        raise UsageError("scripts/benchmark.py times the CPU fp32 path: use trainer=cpu")
    if min(bench.warmup_steps, bench.twin_every) < 1 or bench.rounds < 0 or bench.timed_steps < 2:
        raise UsageError(
            "bench.warmup_steps and bench.twin_every >= 1, bench.rounds >= 0 (0 skips (a)), "
            "bench.timed_steps >= 2"
        )
    if bench.timed_steps % bench.twin_every:
        raise UsageError("bench.timed_steps must be a multiple of bench.twin_every")


def train_script_run(cfg: DictConfig, workdir: Path, name: str, extra: list, twin: bool) -> dict:
    """One timed train.py run (the command line's train overrides, then `extra`): the arm `name`,
    with its peak RSS, and with `twin` the arm `name + TWIN`."""
    bench = cfg.bench
    tag = str(next(RUN_NUMBERS))
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
        f"+callbacks.step_clock._target_={TwinClock.__module__}.{TwinClock.__name__}",
        f"+callbacks.step_clock.path={clock}",
        f"+callbacks.step_clock.warmup={bench.warmup_steps}",
        f"+callbacks.step_clock.twin_every={bench.twin_every if twin else 0}",
    ]
    env = {**os.environ, **({"TTY_COMPATIBLE": "1"} if bench.terminal else {})}
    peak_rss = run_logged(command, workdir / f"run-{tag}.log", env)
    record = json.loads(clock.read_text())
    arms = {name: {**vars(template_timing(record, bench.warmup_steps, bench.timed_steps))}}
    arms[name]["peak_rss_mib"] = peak_rss
    if twin:
        arms[name + TWIN] = {**vars(twin_timing(record)), "peak_rss_mib": None}
    return arms


def bare_loop_run(cfg: DictConfig, fit_setup: bool) -> dict:
    """One timed run of the bare loop alone, in a fresh process."""
    train_cfg = OmegaConf.to_container(cfg, resolve=True)
    steps = (cfg.bench.warmup_steps, cfg.bench.timed_steps)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as process:
        return process.submit(bare_run, train_cfg, *steps, fit_setup).result()


def timed_runs(cfg: DictConfig, workdir: Path) -> tuple[dict, dict]:
    """(a)'s runs, name -> (round -> {arm: timing}), and ratios, name -> (arm, arm) of tokens/s."""
    runs, ratios = {}, {}
    for variant, extra in {"": [], **cfg.bench.variants}.items():
        name = f"train.py {variant}".strip()
        runs[name] = lambda name=name, extra=list(extra): train_script_run(
            cfg, workdir, name, extra, twin=True
        )
        ratios[f"{name} / twin"] = (name, name + TWIN)
    if cfg.bench.malloc_ab:
        runs["bare alone"] = lambda: {
            "bare alone": bare_loop_run(cfg, fit_setup=True),
            "bare alone, malloc defaults": bare_loop_run(cfg, fit_setup=False),
        }
        ratios["malloc setting"] = ("bare alone", "bare alone, malloc defaults")
    return runs, ratios


def with_rates(arm: dict, cfg: DictConfig) -> dict:
    """`arm` with its tokens/s, wait share, and share of time above its median step: the
    periodic work (checkpoints, monitors at their intervals), measured within one process."""
    seconds = arm["seconds"]
    tokens = cfg.data.batch_size * cfg.data.seq_len * cfg.bench.timed_steps
    arm["tokens_per_s"] = tokens / seconds
    arm["wait_share"] = arm["wait_seconds"] / seconds
    arm["above_median_share"] = 1 - cfg.bench.timed_steps * arm["median_step"] / seconds
    return arm


def compare_with_bare_loop(cfg: DictConfig) -> dict:
    """(a) and (d)'s memory run: per round and arm, the timing; the ratios; the medians."""
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        alone = train_script_run(cfg, workdir, "train.py alone", [], twin=False)
        runs, ratios = timed_runs(cfg, workdir)
        names = list(runs)
        for index in range(cfg.bench.rounds):
            measured = {"load_1min": load_average(), "arms": {}}
            shift = index % len(names)
            for name in [*names[shift:], *names[:shift]]:
                for arm, timing in runs[name]().items():
                    measured["arms"][arm] = with_rates(timing, cfg)
            arms = measured["arms"]
            measured["ratios"] = {
                ratio: arms[a]["tokens_per_s"] / arms[b]["tokens_per_s"]
                for ratio, (a, b) in ratios.items()
            }
            rounds.append(measured)
            console.print(
                f"round {index} (load {measured['load_1min']}): "
                + ", ".join(f"{arm} {timing['tokens_per_s']:.0f}" for arm, timing in arms.items())
                + " tok/s"
                + "".join(f"; {ratio} {value:.3f}" for ratio, value in measured["ratios"].items())
            )
    keys = (
        "tokens_per_s",
        "median_step",
        "above_median_share",
        "median_wait",
        "wait_share",
        "faults_per_step",
    )
    summary = {
        arm: {key: statistics.median(r["arms"][arm][key] for r in rounds) for key in keys}
        for arm in rounds[0]["arms"]
    }
    intervals = {ratio: vars(summarize([r["ratios"][ratio] for r in rounds])) for ratio in ratios}
    peak_rss = {
        arm: max(r["arms"][arm]["peak_rss_mib"] for r in rounds)
        for arm in summary
        if rounds[0]["arms"][arm]["peak_rss_mib"] is not None
    }
    return {
        "alone": with_rates(alone["train.py alone"], cfg),
        "rounds": rounds,
        "arms": summary,
        "ratios": intervals,
        "peak_rss_mib": peak_rss,
    }


def compare_placements(cfg: DictConfig, datamodule) -> dict:
    """(b): per placement, its median step time (fwd+bwd+optimizer, on batches already in memory)
    in each round, and the median over rounds of its ratio to prenorm's in the same round; one
    untimed step of each placement first."""
    bench = cfg.bench
    names = list(bench.placements or PLACEMENTS)
    names = names if "prenorm" in names else ["prenorm", *names]
    batches = list(itertools.islice(datamodule.train_dataloader(), 8))

    def arm(name: str):
        L.seed_everything(cfg.seed, verbose=False)
        steps = 1 + bench.placement_rounds * bench.placement_steps
        loop = BareLoop(instantiate(cfg.model, norm=name), steps, cfg.trainer.gradient_clip_val)
        cycle = endless(batches)
        loop.step(next(cycle))
        return lambda: loop.step(next(cycle))

    arms = {name: arm(name) for name in names}
    rounds = interleaved_rounds(arms, bench.placement_rounds, bench.placement_steps)
    medians = {name: [r["wall"][name] for r in rounds] for name in names}
    return {
        name: {
            "median_step": statistics.median(times),
            "ratio": paired_ratio(times, medians["prenorm"]).median,
            "round_medians": times,
        }
        for name, times in medians.items()
    }


def row(cells: list) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def training_section(results: dict) -> list[str]:
    """(a) and (d): per round and arm tokens/s and the ratios, then the per-arm medians."""
    training = results["training"]
    arms, ratios = list(training["arms"]), list(training["ratios"])
    peak = max(results["matmul_flops"].values())

    def per_arm(name: str, arm: dict, peak_rss: float | None) -> str:
        return row(
            [
                name,
                f"{arm['tokens_per_s']:.0f}",
                f"{1e3 * arm['median_step']:.1f}",
                f"{100 * arm['above_median_share']:.1f}%",
                f"{1e3 * arm['median_wait']:.2f}",
                f"{100 * arm['wait_share']:.2f}%",
                f"{arm['faults_per_step']:.0f}",
                "-" if peak_rss is None else f"{peak_rss:.0f}",
                f"{100 * arm['tokens_per_s'] * results['flops_per_token'] / peak:.1f}%",
            ]
        )

    alone = training["alone"]
    return [
        "(a) tokens/s over the timed steps, and ratios",
        "",
        row(["round", "load", *arms, *ratios]),
        row(["---:"] * (2 + len(arms) + len(ratios))),
        *(
            row(
                [i, r["load_1min"]]
                + [f"{r['arms'][a]['tokens_per_s']:.0f}" for a in arms]
                + [f"{r['ratios'][k]:.3f}" for k in ratios]
            )
            for i, r in enumerate(training["rounds"])
        ),
        row(
            ["median", ""]
            + [f"{training['arms'][a]['tokens_per_s']:.0f}" for a in arms]
            + [f"**{training['ratios'][k]['median']:.3f}**" for k in ratios]
        ),
        row(
            ["interval", ""]
            + [""] * len(arms)
            + [Ratio(**r).interval() for r in training["ratios"].values()]
        ),
        "",
        "interval: the order statistics of the rounds' ratios that cover the median ratio with "
        "the confidence shown, whatever their distribution.",
        "",
        "(a, c, d) per arm, medians over rounds (peak RSS: the largest process; a twin runs in its "
        "train.py process); `train.py alone`: one run without a twin",
        "",
        row(
            [
                "arm",
                "tok/s",
                "step (ms)",
                "time above the median step",
                "wait for the batch (ms)",
                "wait share",
                "page faults / step",
                "peak RSS (MiB)",
                "MFU",
            ]
        ),
        row(["---", *["---:"] * 8]),
        *(
            per_arm(name, arm, training["peak_rss_mib"].get(name))
            for name, arm in training["arms"].items()
        ),
        per_arm("train.py alone", alone, alone["peak_rss_mib"]),
        "",
    ]


def markdown(results: dict) -> str:
    """The results as markdown tables, with the command, the machine and the load."""
    lines = [
        f"Command: `{results['command']}`  ",
        f"Machine: {results['machine']}, torch {results['torch']} ({results['threads']} threads); "
        f"1-minute load average {results['load_start']} at the start, {results['load_end']} at "
        f"the end; {results['started']}, {results['minutes']:.1f} min.  ",
        f"Shape: {results['shape']}.",
        "",
        *(training_section(results) if "training" in results else []),
        "fp32 matmul GFLOP/s by size: "
        + ", ".join(f"{n}: {flops / 1e9:.0f}" for n, flops in results["matmul_flops"].items())
        + f"; FLOPs per token 6N + 12LdT = {results['flops_per_token'] / 1e6:.2f} M.",
        "",
    ]
    if "placements" in results:
        lines += [
            "(b) step time (fwd+bwd+optimizer) per placement: median over rounds of the ratio of "
            "the round medians",
            "",
            row(["placement", "median step (ms)", "/ prenorm"]),
            row(["---", "---:", "---:"]),
            *(
                row([name, f"{1e3 * p['median_step']:.1f}", f"{p['ratio']:.3f}"])
                for name, p in results["placements"].items()
            ),
            "",
        ]
    if "data" in results:
        lines += [
            "(c) data path (seconds)",
            "",
            row(["stage", "s"]),
            row(["---", "---:"]),
            *(
                row([stage, "-" if seconds is None else f"{seconds:.2f}"])
                for stage, seconds in results["data"].items()
            ),
            "",
        ]
    return "\n".join(lines)


def time_data_path(data_cfg, data_dir: Path, cached_repeats: int) -> dict[str, float | None]:
    """(c): seconds of each stage of building the data from nothing in `data_dir`: the corpus
    (the Shakespeare source only, else None), the tokenizer, then tokenizing the splits and
    packing them; and the median of `cached_repeats` loads of it all from the cache afterwards."""
    datamodule = instantiate(data_cfg, data_dir=str(data_dir))
    stages: dict[str, float | None] = {"corpus_s": None}
    start = time.perf_counter()
    if datamodule.source == "shakespeare":
        ensure_shakespeare(data_dir)
        stages["corpus_s"] = time.perf_counter() - start
    start = time.perf_counter()
    datamodule.load_tokenizer()
    stages["tokenizer_s"] = time.perf_counter() - start
    stages["tokens_s"] = load_seconds(datamodule)
    stages["cached_s"] = statistics.median(
        load_seconds(instantiate(data_cfg, data_dir=str(data_dir))) for _ in range(cached_repeats)
    )
    return stages


def load_seconds(datamodule) -> float:
    """Seconds of `prepare_data` and `setup` of a datamodule, as train.py runs them."""
    start = time.perf_counter()
    prepare_data(datamodule)
    return time.perf_counter() - start


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
        "load_start": load_average(),
        "shape": (
            f"{cfg.model.norm} d={cfg.model.d_model} L={cfg.model.n_layers} "
            f"heads={cfg.model.n_heads}, batch {cfg.data.batch_size} x seq {cfg.data.seq_len}, "
            f"{cfg.data.tokenizer} vocab {cfg.data.vocab_size}; {bench.rounds} rounds of "
            f"{bench.warmup_steps} + {bench.timed_steps} steps, twin every {bench.twin_every}"
        ),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    cpu = torch.device("cpu")
    results["matmul_flops"] = {n: measure_matmul_flops(cpu, n) for n in bench.matmul_sizes}
    console.print(f"matmul peak {max(results['matmul_flops'].values()) / 1e9:.0f} GFLOP/s")
    if bench.cold_data:
        with tempfile.TemporaryDirectory() as data_dir:
            results["data"] = time_data_path(cfg.data, Path(data_dir), bench.cached_repeats)
        console.print(f"data path (s): {results['data']}")
    results["flops_per_token"] = flops_per_token(instantiate(cfg.model).model, cfg.data.seq_len)
    if bench.rounds:
        results["training"] = compare_with_bare_loop(cfg)
    if bench.placement_rounds:  # 0: skip (b)
        results["placements"] = compare_placements(cfg, build_datamodule(cfg.data))
    results["load_end"] = load_average()
    results["minutes"] = (time.perf_counter() - started) / 60
    out = Path(bench.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"cpu-{now:%Y-%m-%d_%H-%M}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1))
    report = markdown(results)
    stem.with_suffix(".md").write_text(report)
    console.print(report, markup=False)


if __name__ == "__main__":
    launch(main)
