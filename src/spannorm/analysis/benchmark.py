"""Timing the training path against a minimal PyTorch loop (used by scripts/benchmark.py).

- `StepClock`: a callback that a timed `train.py` run carries; it records when every training
  batch starts and ends and when validation runs, and writes them as JSON at the end of training.
- `BareLoop`: the same `LanguageModel`'s loss, AdamW groups and warmup+cosine schedule (its own
  `configure_optimizers`) and norm clipping, stepped by a hand-written loop.
- step times per placement, the data path's stages, and the fastest fp32 matmul (the MFU peak).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from spannorm.callbacks.throughput import measure_matmul_flops, peak_memory_mib
from spannorm.cli import build_datamodule, prepare_data
from spannorm.data.shakespeare import ensure_shakespeare


def minor_faults() -> int:
    """Minor page faults of this process so far: pages the kernel mapped in on first touch."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class StepClock(L.Callback):
    """perf_counter() at the start and the end of every training batch, `minor_faults()` at the
    end, and the [start, end] of every validation run after the sanity check; written to `path`
    as JSON when training ends."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.record: dict[str, list] = {
            "batch_start": [],
            "batch_end": [],
            "faults": [],
            "validation": [],
        }
        self._validation_start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.record["batch_start"].append(time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.record["batch_end"].append(time.perf_counter())
        self.record["faults"].append(minor_faults())

    def on_validation_start(self, trainer, pl_module) -> None:
        self._validation_start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.record["validation"].append([self._validation_start, time.perf_counter()])

    def on_train_end(self, trainer, pl_module) -> None:
        self.path.write_text(json.dumps(self.record))


@dataclass
class RunTiming:
    """The timed steps of one run: their wall time (validation excluded), the median step, the
    time spent between steps waiting for the next batch (see `template_timing`, `time_bare`) and
    the minor page faults per step."""

    seconds: float
    median_step: float
    wait_seconds: float
    median_wait: float
    faults_per_step: float


def template_timing(record: dict[str, list], warmup: int, steps: int) -> RunTiming:
    """A `StepClock` record's steps warmup+1 .. warmup+steps: from the end of step `warmup` to the
    end of the last, less any validation in between. The wait before step k is the time from the
    end of step k-1 to the start of step k: fetching the batch plus what Lightning and the
    callbacks that run after the clock do there (LastCheckpoint's saves among them)."""
    starts, ends = record["batch_start"], record["batch_end"]
    window = range(warmup, warmup + steps)  # 0-based indices of the timed steps
    opened, closed = ends[warmup - 1], ends[window[-1]]
    validation = sum(end - start for start, end in record["validation"] if opened < start < closed)
    periods = [ends[i] - ends[i - 1] for i in window]
    waits = [starts[i] - ends[i - 1] for i in window]
    seconds = closed - opened - validation
    faults = (record["faults"][window[-1]] - record["faults"][warmup - 1]) / steps
    return RunTiming(
        seconds, statistics.median(periods), sum(waits), statistics.median(waits), faults
    )


def run_logged(command: Sequence[str], log_path: Path, env: dict[str, str]) -> float:
    """Run `command` with its output in `log_path`; its peak resident set size in MiB."""
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{' '.join(command)} exited {process.returncode}:\n{tail}")
    return usage.ru_maxrss / 2**10  # KiB on Linux


def endless(loader: Iterable) -> Iterator:
    """The loader's batches, pass after pass."""
    while True:
        yield from loader


class BareLoop:
    """One optimizer step of `lm` per call, without Lightning: loss (+ the MoE auxiliary loss),
    backward, gradient-norm clipping at `clip` (none if falsy), AdamW step, schedule step.
    `lm` is prepared as `Trainer.fit` prepares it: `setup("fit")` (unless `fit_setup` is False:
    on CPU that leaves glibc's malloc as it was), then `configure_optimizers()`."""

    def __init__(
        self, lm: L.LightningModule, max_steps: int, clip: float | None, fit_setup: bool = True
    ) -> None:
        # both hooks read the trainer (the device, the step count), so lend it one briefly
        lm.trainer = L.Trainer(
            accelerator="cpu",
            max_steps=max_steps,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        if fit_setup:
            lm.setup("fit")
        configured = lm.configure_optimizers()
        lm.trainer = None
        self.lm, self.clip = lm, clip
        self.optimizer = configured["optimizer"]
        self.schedule = configured["lr_scheduler"]["scheduler"]

    def step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        loss = self.lm.loss(batch)
        aux = self.lm.model.aux_loss()
        (loss if aux is None else loss + aux).backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.lm.parameters(), self.clip)
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)


def time_bare(loop: BareLoop, batches: Iterator, warmup: int, steps: int) -> RunTiming:
    """`warmup` then `steps` timed steps; a step's clock runs from asking for its batch to the end
    of its optimizer step, and its wait is the `next(batches)` call alone."""
    periods, waits = [], []
    for index in range(warmup + steps):
        if index == warmup:
            faults = minor_faults()
        start = time.perf_counter()
        batch = next(batches)
        fetched = time.perf_counter()
        loop.step(batch)
        if index >= warmup:
            periods.append(time.perf_counter() - start)
            waits.append(fetched - start)
    faults = (minor_faults() - faults) / steps
    return RunTiming(
        sum(periods), statistics.median(periods), sum(waits), statistics.median(waits), faults
    )


def bare_run(train_cfg: dict, warmup: int, steps: int, fit_setup: bool = True) -> dict:
    """The bare loop as train.py would train `train_cfg` (a resolved train config): the same
    seed, model, DataLoader, optimizer, schedule and clipping (`fit_setup`: see BareLoop). Meant
    for a fresh process, so that it starts as train.py does; returns its `RunTiming` fields and
    the process's peak RSS (MiB)."""
    cfg = OmegaConf.create(train_cfg)
    quiet_lightning()
    datamodule = build_datamodule(cfg.data)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    clip = cfg.trainer.gradient_clip_val
    loop = BareLoop(instantiate(cfg.model), warmup + steps, clip, fit_setup)
    timing = time_bare(loop, endless(datamodule.train_dataloader()), warmup, steps)
    return {**vars(timing), "peak_rss_mib": peak_memory_mib(torch.device("cpu"))}


def quiet_lightning() -> None:
    """Lightning's info lines (one set per Trainer that BareLoop makes) off."""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)


def time_placements(
    make_loop: Callable[[str], BareLoop],
    placements: Sequence[str],
    batches: Sequence[Any],
    rounds: int,
    steps: int,
) -> dict[str, list[float]]:
    """Per placement, its median step time (fwd+bwd+optimizer, on `batches` already in memory) in
    each of `rounds` rounds; a round runs `steps` steps of every placement in turn, starting one
    placement later each round, after one untimed step of each."""
    loops = {name: make_loop(name) for name in placements}
    for loop in loops.values():
        loop.step(batches[0])
    medians: dict[str, list[float]] = {name: [] for name in placements}
    for round_index in range(rounds):
        shift = round_index % len(placements)
        for name in [*placements[shift:], *placements[:shift]]:
            times = []
            for step in range(steps):
                start = time.perf_counter()
                loops[name].step(batches[(round_index * steps + step) % len(batches)])
                times.append(time.perf_counter() - start)
            medians[name].append(statistics.median(times))
    return medians


def matmul_peak(sizes: Iterable[int]) -> dict[int, float]:
    """FLOP/s of the fastest fp32 [n x n] @ [n x n] on the CPU, for each size n."""
    return {n: measure_matmul_flops(torch.device("cpu"), n) for n in sizes}


def time_data_path(data_cfg, data_dir: Path, cached_repeats: int) -> dict[str, float | None]:
    """Seconds of each stage of building the data from nothing in `data_dir`: the corpus (the
    Shakespeare source only, else None), the tokenizer, then tokenizing the splits and packing
    them; and the median of `cached_repeats` loads of it all from the cache afterwards."""
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
