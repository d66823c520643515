"""Timing: two clocks, a timed call, interleaved rounds of several arms, and `StepClock`, which
times the training steps of a Lightning run.

Wall time is what a user waits for; the process's CPU time (all its threads) leaves out the time
spent waiting for a core, so on a loaded machine it is the steadier measure of the work at one
thread (at more threads it also counts their spinning). Both are read everywhere, and each
result says which it reports.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import lightning as L

from spannorm.bench.machine import load_average

CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}

Readings = dict[str, float]  # clock name -> seconds


def read_clocks() -> Readings:
    return {clock: read() for clock, read in CLOCKS.items()}


def timed(call: Callable[[], Any]) -> Readings:
    """Seconds of `call()` on each clock."""
    before = read_clocks()
    call()
    after = read_clocks()
    return {clock: after[clock] - before[clock] for clock in CLOCKS}


def interleaved_rounds(
    arms: Mapping[str, Callable[[], Any]],
    rounds: int,
    steps: int,
    on_round: Callable[[int, dict], None] | None = None,
) -> list[dict]:
    """Per round, each arm's median step on each clock: `{"load": 1-minute load average,
    "wall": {arm: s}, "cpu": {arm: s}}`. A round runs `steps` calls of every arm in turn,
    starting one arm later each round, so that a drift of the machine's speed reaches every arm
    alike and no arm always follows the same one. `on_round(index, round)` after each round."""
    names, results = list(arms), []
    for index in range(rounds):
        shift = index % len(names)
        medians: dict[str, dict[str, float]] = {clock: {} for clock in CLOCKS}
        for name in [*names[shift:], *names[:shift]]:
            times = [timed(arms[name]) for _ in range(steps)]
            for clock in CLOCKS:
                medians[clock][name] = statistics.median(t[clock] for t in times)
        results.append({"load": load_average(), **medians})
        if on_round is not None:
            on_round(index, results[-1])
    return results


class StepClock(L.Callback):
    """Reads every clock at the start and at the end of every training batch, and leaves out of
    the steps' times what `leave_out` runs and the validation runs after the sanity check (their
    start and end readings in `left_out`). `step_times` then gives each step's time and its wait.

    Its state is plain lists of numbers (`state`), so a run in another process can hand it over
    as JSON."""

    def __init__(self) -> None:
        self.starts: list[Readings] = []
        self.ends: list[Readings] = []
        self.left_out: list[tuple[Readings, Readings]] = []
        self._validation_start: Readings = {}

    def leave_out(self, call: Callable[[], Any]) -> Any:
        """`call()`, its time left out of the step it falls in."""
        start = read_clocks()
        result = call()
        self.left_out.append((start, read_clocks()))
        return result

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.starts.append(read_clocks())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.ends.append(read_clocks())

    def on_validation_start(self, trainer, pl_module) -> None:
        self._validation_start = read_clocks()

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.left_out.append((self._validation_start, read_clocks()))

    def state(self) -> dict:
        return {"starts": self.starts, "ends": self.ends, "left_out": self.left_out}

    @classmethod
    def from_state(cls, state: dict) -> StepClock:
        clock = cls()
        clock.starts, clock.ends = state["starts"], state["ends"]
        clock.left_out = [tuple(pair) for pair in state["left_out"]]
        return clock

    def step_times(
        self, first: int, count: int, clock: str = "wall"
    ) -> tuple[list[float], list[float]]:
        """Of steps first .. first + count - 1 (0-based; `first` >= 1): each step's time, from
        the end of the step before it to its own end, and its wait, from that end to its own
        start (the fetch of its batch, and what Lightning and the callbacks before it do there),
        both less what was left out."""

        def kept(begin: float, end: float) -> float:
            inside = (b[clock] - a[clock] for a, b in self.left_out if begin <= a[clock] < end)
            return end - begin - sum(inside)

        window = range(first, first + count)
        ends = [reading[clock] for reading in self.ends]
        starts = [reading[clock] for reading in self.starts]
        periods = [kept(ends[i - 1], ends[i]) for i in window]
        waits = [kept(ends[i - 1], starts[i]) for i in window]
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
