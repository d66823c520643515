"""`TwinClock`: a `StepClock` for a timed `train.py` run that interleaves a bare-loop twin.

The twin is a `BareLoop` of a copy of the run's model (its initial weights, its own pass over the
run's train DataLoader). Its steps run inside the `train.py` process, between the run's steps, so
both arms share the process and the moment: on a shared machine the load drifts by more than the
difference sought, and a ratio taken this way cancels it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from spannorm.bench.bare import BareLoop, bare_steps, endless
from spannorm.bench.memory import minor_faults
from spannorm.bench.timing import RunTiming, StepClock


class TwinClock(StepClock):
    """A `StepClock` that also records the minor page faults at the end of every step and, with
    `twin_every`, runs the twin: `warmup` untimed steps at train start, then `twin_every` steps
    after each `twin_every` steps past `warmup`, left out of the run's steps. Written to `path` as
    JSON at train end."""

    def __init__(self, path: str, warmup: int = 0, twin_every: int = 0) -> None:
        super().__init__()
        self.path = Path(path)
        self.warmup, self.twin_every = warmup, twin_every
        self.faults: list[int] = []
        self.twin_record: dict[str, Any] = {"periods": [], "waits": [], "faults": 0}
        self.twin: BareLoop | None = None
        self.twin_batches: Iterator | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        if not self.twin_every:
            return
        copy = type(pl_module)(**pl_module.hparams)
        copy.load_state_dict(pl_module.state_dict())
        self.twin = BareLoop(copy, trainer.max_steps, trainer.gradient_clip_val)
        self.twin_batches = endless(trainer.datamodule.train_dataloader())
        bare_steps(self.twin, self.twin_batches, self.warmup)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        past_warmup = trainer.global_step - self.warmup
        if self.twin is not None and past_warmup > 0 and past_warmup % self.twin_every == 0:
            self.leave_out(self._twin_block)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self.faults.append(minor_faults() - self.twin_record["faults"])

    def _twin_block(self) -> None:
        faults = minor_faults()
        periods, waits = bare_steps(self.twin, self.twin_batches, self.twin_every)
        self.twin_record["periods"] += periods
        self.twin_record["waits"] += waits
        self.twin_record["faults"] += minor_faults() - faults

    def on_train_end(self, trainer, pl_module) -> None:
        record = {**self.state(), "faults": self.faults, "twin": self.twin_record}
        self.path.write_text(json.dumps(record))


def template_timing(record: dict[str, Any], warmup: int, steps: int) -> RunTiming:
    """Steps warmup+1 .. warmup+steps of a `TwinClock` record (`StepClock.step_times`, wall
    clock: the twin's and validation's time left out)."""
    periods, waits = StepClock.from_state(record).step_times(warmup, steps)
    faults = record["faults"][warmup + steps - 1] - record["faults"][warmup - 1]
    return RunTiming.of(periods, waits, faults)


def twin_timing(record: dict[str, Any]) -> RunTiming:
    """The timed twin steps of a `TwinClock` record."""
    twin = record["twin"]
    return RunTiming.of(twin["periods"], twin["waits"], twin["faults"])
