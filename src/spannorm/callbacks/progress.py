"""The progress bar of step-based training: steps done out of `trainer.max_steps` (120/300),
drawn between steps on CPU; where standard output is not a terminal (a SLURM job, nohup), plain
progress lines a log file can hold."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar

from spannorm.callbacks import draw_between_steps


class StepProgressBar(RichProgressBar):
    """Lightning's rich bar, but when training is set by `max_steps` (every trainer config here)
    one training bar counts optimizer steps over the whole run, across epochs, instead of the
    batches of each epoch under "Epoch 0/-2". Epoch-based training keeps Lightning's bar.

    On CPU (`draw_between_steps`) it draws in the training thread, between steps, at most
    `refresh_rate` times a second, instead of on rich's own thread (with the thread, the default
    run had 0.924 of the throughput it had without a bar). On a GPU Lightning's thread stays.

    A bar drawn where standard output is not a terminal shows nothing until the run ends, so
    there (`text_lines=null`), or always with `text_lines=true`, the bar also prints a plain line
    (`TextProgress`) every `text_every_n_seconds` seconds and/or `text_every_n_steps` steps, at
    the first and the last step, and after each validation."""

    def __init__(
        self,
        *args: Any,
        text_lines: bool | None = None,
        text_every_n_seconds: float | None = 30.0,
        text_every_n_steps: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._draw_here = False
        self._last_draw = -float("inf")
        if text_lines is None:
            text_lines = not sys.stdout.isatty()
        self.text = TextProgress(text_every_n_seconds, text_every_n_steps) if text_lines else None
        self._text_step = -1

    def _init_progress(self, trainer: L.Trainer) -> None:
        super()._init_progress(trainer)
        live = getattr(self.progress, "live", None)
        if draw_between_steps(trainer) and live is not None:
            thread, live._refresh_thread = live._refresh_thread, None
            if thread is not None:  # Lightning started it: stop it before it draws
                thread.stop()
                thread.join()
            live.auto_refresh = False
            self._draw_here = True

    def refresh(self, hard: bool = False) -> None:
        if not self._draw_here:
            return super().refresh(hard)
        now = time.monotonic()
        if self.progress is not None and (hard or now - self._last_draw >= 1 / self.refresh_rate):
            self._last_draw = now
            self.progress.refresh()

    def _by_steps(self) -> bool:
        return self.trainer.max_steps > 0 and self.trainer.max_epochs in (None, -1)

    @property
    def total_train_batches(self) -> int | float:
        return self.trainer.max_steps if self._by_steps() else super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        if not self._by_steps():
            return super()._get_train_description(current_epoch)
        return f"{'Steps':{len(self.validation_description)}}"  # as wide: no flicker

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not (self._by_steps() and self.train_progress_bar_id is not None):
            super().on_train_epoch_start(trainer, pl_module)  # a new epoch keeps the steps bar

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        # the bar shows `idx + 1` done: the step count, when counting steps
        done = trainer.global_step - 1 if self._by_steps() else idx
        super().on_train_batch_end(trainer, pl_module, outputs, batch, done)
        if self.text is None or not trainer.is_global_zero:
            return
        tokens = batch[0].numel() if isinstance(batch, list | tuple) else 0
        self.text.add_tokens(tokens * trainer.world_size)
        if trainer.global_step != self._text_step:  # an optimizer step ended (not a micro batch)
            self._text_step = trainer.global_step
            loss = trainer.callback_metrics.get("train/loss")
            total = (
                trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches
            )
            self.text.step_done(
                trainer.global_step, int(total), None if loss is None else float(loss)
            )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self.text is not None:
            self._text_step = trainer.global_step
            self.text.start(trainer.global_step)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        loss = trainer.callback_metrics.get("val/loss")
        if self.text is not None and trainer.is_global_zero and not trainer.sanity_checking:
            if loss is not None:
                self.text.write(
                    f"validation at step {trainer.global_step}: val/loss {float(loss):.4f}"
                )


class TextProgress:
    """Plain progress lines for a log without a terminal, e.g.
    `step 120/300 (40%) | train/loss 4.1234 | 5,230 tokens/s | 1:02 elapsed | 1:33 left`:
    printed at the first and the last step and when `every_n_seconds` have passed or the step is
    a multiple of `every_n_steps` (either may be null). Tokens/s are those since the last line;
    the time left is extrapolated from the steps of this start."""

    def __init__(
        self,
        every_n_seconds: float | None = 30.0,
        every_n_steps: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        write: Callable[[str], None] | None = None,
    ) -> None:
        if every_n_seconds is not None and not every_n_seconds > 0:
            raise ValueError(
                f"callbacks.progress.text_every_n_seconds={every_n_seconds!r} must be a positive "
                "number of seconds, or null"
            )
        if every_n_steps is not None and (not isinstance(every_n_steps, int) or every_n_steps < 1):
            raise ValueError(
                f"callbacks.progress.text_every_n_steps={every_n_steps!r} must be a positive "
                "integer, or null"
            )
        self.every_n_seconds, self.every_n_steps = every_n_seconds, every_n_steps
        self.clock = clock
        self.write = write or (lambda line: print(line, flush=True))
        self.start(0)

    def start(self, step: int) -> None:
        self._start_time = self._line_time = self.clock()
        self._start_step = step
        self._tokens = 0

    def add_tokens(self, tokens: int) -> None:
        self._tokens += tokens

    def step_done(self, step: int, total: int, loss: float | None) -> None:
        now = self.clock()
        due = (
            step == self._start_step + 1
            or step >= total
            or (self.every_n_steps is not None and step % self.every_n_steps == 0)
            or (self.every_n_seconds is not None and now - self._line_time >= self.every_n_seconds)
        )
        if not due:
            return
        parts = [f"step {step}/{total} ({100 * step // max(total, 1)}%)"]
        if loss is not None:
            parts.append(f"train/loss {loss:.4f}")
        window = now - self._line_time
        if window > 0 and self._tokens:
            parts.append(f"{self._tokens / window:,.0f} tokens/s")
        elapsed = now - self._start_time
        parts.append(f"{_clock_time(elapsed)} elapsed")
        done = step - self._start_step
        if done > 0 and step < total:
            parts.append(f"{_clock_time(elapsed / done * (total - step))} left")
        self.write(" | ".join(parts))
        self._line_time, self._tokens = now, 0


def _clock_time(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
