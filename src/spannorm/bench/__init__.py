"""Timing the training path against a minimal PyTorch loop (used by scripts/benchmark.py).

- `BareLoop`: the same `LanguageModel`'s loss, AdamW groups, warmup+cosine schedule (its
  own `configure_optimizers`) and norm clipping, stepped by a hand-written loop.
- `StepClock`: a callback that a timed `train.py` run carries. It records when every training
  batch starts and ends, and can interleave a bare-loop twin of the model into the run: every
  `twin_every` steps, as many bare steps of the twin, whose time it leaves out of the run's.
- step times per placement, the data path's stages, and the fastest fp32 matmul (the MFU peak).
"""

from __future__ import annotations

import json
import logging
import math
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
from spannorm.data.prepare import build_datamodule, prepare_data
from spannorm.data.shakespeare import ensure_shakespeare
from spannorm.training.memory import keep_freed_memory


def minor_faults() -> int:
    """Minor page faults of this process so far: pages the kernel mapped in on first touch."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def endless(loader: Iterable) -> Iterator:
    """The loader's batches, pass after pass."""
    while True:
        yield from loader


class BareLoop:
    """One optimizer step of `lm` per call, without Lightning: loss (+ the MoE auxiliary loss),
    backward, gradient-norm clipping at `clip` (none if falsy), AdamW step, schedule step.
    `lm` is prepared as `train` prepares a run: its malloc setting, `keep_freed_memory()` (unless
    `fit_setup` is False: that leaves glibc's malloc as it was), then `configure_optimizers()`."""

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
            keep_freed_memory()
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


def bare_steps(loop: BareLoop, batches: Iterator, count: int) -> tuple[list[float], list[float]]:
    """`count` steps; per step, the time from asking for its batch to the end of its optimizer
    step, and the time of the `next(batches)` call alone (the wait for data)."""
    periods, waits = [], []
    for _ in range(count):
        start = time.perf_counter()
        batch = next(batches)
        fetched = time.perf_counter()
        loop.step(batch)
        periods.append(time.perf_counter() - start)
        waits.append(fetched - start)
    return periods, waits


@dataclass
class RunTiming:
    """Timed steps: their total and median time, the total and median wait for the next batch,
    and the minor page faults per step."""

    seconds: float
    median_step: float
    wait_seconds: float
    median_wait: float
    faults_per_step: float

    @classmethod
    def of(cls, periods: list[float], waits: list[float], faults: int) -> RunTiming:
        return cls(
            sum(periods),
            statistics.median(periods),
            sum(waits),
            statistics.median(waits),
            faults / len(periods),
        )


class StepClock(L.Callback):
    """Records perf_counter() at the start and the end of every training batch and the minor page
    faults at its end, and leaves out the validation runs (after the sanity check) and the twin's
    steps: with `twin_every`, a `BareLoop` of a copy of the model (its initial weights, its own
    pass over the train DataLoader) runs `warmup` untimed steps at train start, then `twin_every`
    steps after each `twin_every` steps past `warmup`. Written to `path` as JSON at train end."""

    def __init__(self, path: str, warmup: int = 0, twin_every: int = 0) -> None:
        self.path = Path(path)
        self.warmup, self.twin_every = warmup, twin_every
        self.record: dict[str, Any] = {
            "batch_start": [],
            "batch_end": [],
            "faults": [],
            "left_out": [],  # [start, end] of each validation run and twin block
            "twin": {"periods": [], "waits": [], "faults": 0},
        }
        self.twin: BareLoop | None = None
        self.twin_batches: Iterator | None = None
        self._validation_start = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        if not self.twin_every:
            return
        copy = type(pl_module)(**pl_module.hparams)
        copy.load_state_dict(pl_module.state_dict())
        self.twin = BareLoop(copy, trainer.max_steps, trainer.gradient_clip_val)
        self.twin_batches = endless(trainer.datamodule.train_dataloader())
        bare_steps(self.twin, self.twin_batches, self.warmup)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.record["batch_start"].append(time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        past_warmup = trainer.global_step - self.warmup
        if self.twin is not None and past_warmup > 0 and past_warmup % self.twin_every == 0:
            self._twin_block()
        self.record["batch_end"].append(time.perf_counter())
        self.record["faults"].append(minor_faults() - self.record["twin"]["faults"])

    def _twin_block(self) -> None:
        twin, faults, start = self.record["twin"], minor_faults(), time.perf_counter()
        periods, waits = bare_steps(self.twin, self.twin_batches, self.twin_every)
        self.record["left_out"].append([start, time.perf_counter()])
        twin["periods"] += periods
        twin["waits"] += waits
        twin["faults"] += minor_faults() - faults

    def on_validation_start(self, trainer, pl_module) -> None:
        self._validation_start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.record["left_out"].append([self._validation_start, time.perf_counter()])

    def on_train_end(self, trainer, pl_module) -> None:
        self.path.write_text(json.dumps(self.record))


def template_timing(record: dict[str, Any], warmup: int, steps: int) -> RunTiming:
    """Steps warmup+1 .. warmup+steps of a `StepClock` record. A step's time runs from the end of
    the step before it to its own end, and its wait from that end to its start: the fetch of its
    batch plus what Lightning and the callbacks after the clock do there (such as LastCheckpoint's
    saves); both less what the clock left out (validation, twin steps)."""
    starts, ends, left_out = record["batch_start"], record["batch_end"], record["left_out"]

    def kept(begin: float, end: float) -> float:
        return end - begin - sum(b - a for a, b in left_out if begin <= a < end)

    window = range(warmup, warmup + steps)  # 0-based indices of the timed steps
    periods = [kept(ends[i - 1], ends[i]) for i in window]
    waits = [kept(ends[i - 1], starts[i]) for i in window]
    faults = record["faults"][window[-1]] - record["faults"][warmup - 1]
    return RunTiming.of(periods, waits, faults)


def twin_timing(record: dict[str, Any]) -> RunTiming:
    """The timed twin steps of a `StepClock` record."""
    twin = record["twin"]
    return RunTiming.of(twin["periods"], twin["waits"], twin["faults"])


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


def bare_run(train_cfg: dict, warmup: int, steps: int, fit_setup: bool = True) -> dict:
    """The bare loop alone, as train.py would train `train_cfg` (a resolved train config): the
    same seed, model, DataLoader, optimizer, schedule and clipping (`fit_setup`: see BareLoop).
    Meant for a fresh process; returns its `RunTiming` fields and its peak RSS (MiB)."""
    cfg = OmegaConf.create(train_cfg)
    quiet_lightning()
    datamodule = build_datamodule(cfg.data)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    clip = cfg.trainer.gradient_clip_val
    loop = BareLoop(instantiate(cfg.model), warmup + steps, clip, fit_setup)
    batches = endless(datamodule.train_dataloader())
    bare_steps(loop, batches, warmup)
    faults = minor_faults()
    periods, waits = bare_steps(loop, batches, steps)
    timing = RunTiming.of(periods, waits, minor_faults() - faults)
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


def median_interval(values: Sequence[float], confidence: float = 0.9) -> tuple[float, float, float]:
    """A distribution-free interval for the median that `values` are samples of: their k-th
    smallest and k-th largest, k as large as keeps P(Binomial(n, 1/2) < k) <= (1 - confidence) / 2
    (at least 1: the extremes); returned with the confidence it reaches, 1 - 2 P(... < k)."""
    n, ordered = len(values), sorted(values)

    def below(k: int) -> float:
        return sum(math.comb(n, i) for i in range(k)) / 2**n

    k = 1
    while k < n // 2 and below(k + 1) <= (1 - confidence) / 2:
        k += 1
    return ordered[k - 1], ordered[n - k], 1 - 2 * below(k)


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
