"""The training step without Lightning: `BareLoop`, the baseline the template's step is timed
against, and the runs built on it.

It steps the same `LanguageModel`: its loss (and MoE auxiliary loss), its AdamW groups and
warmup + cosine schedule (its own `configure_optimizers`), and the trainer's norm clipping, so
that the two compare the same work (tests/test_benchmark.py checks that both reach the same
weights).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from spannorm.bench.memory import minor_faults
from spannorm.bench.timing import RunTiming
from spannorm.data.prepare import build_datamodule
from spannorm.memory import peak_rss_mib
from spannorm.training.memory import keep_freed_memory


def endless(loader: Iterable) -> Iterator:
    """The loader's batches, pass after pass."""
    while True:
        yield from loader


def quiet_lightning() -> None:
    """Lightning's info lines (one set per Trainer that BareLoop makes) off."""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)


def quiet_trainer(**options) -> L.Trainer:
    """A CPU Trainer that writes nothing (no logger, no checkpoints) and prints no bar or model
    summary; `options` add to or override these."""
    quiet = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return L.Trainer(**{**quiet, **options})


class BareLoop:
    """One optimizer step of `lm` per call, without Lightning: loss (+ the MoE auxiliary loss),
    backward, gradient-norm clipping at `clip` (none if falsy), AdamW step, schedule step.
    `lm` is prepared as `train` prepares a run: its malloc setting, `keep_freed_memory()` (unless
    `fit_setup` is False: that leaves glibc's malloc as it was), then `configure_optimizers()`."""

    def __init__(
        self, lm: L.LightningModule, max_steps: int, clip: float | None, fit_setup: bool = True
    ) -> None:
        # both hooks read the trainer (the device, the step count), so lend it one briefly
        lm.trainer = quiet_trainer(max_steps=max_steps)
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
    return {**vars(timing), "peak_rss_mib": peak_rss_mib()}
