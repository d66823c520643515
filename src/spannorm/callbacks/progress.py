"""The progress bar of step-based training: steps done out of `trainer.max_steps` (120/300),
drawn between steps on CPU."""

from __future__ import annotations

import time
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
    run had 0.924 of the throughput it had without a bar). On a GPU Lightning's thread stays."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._draw_here = False
        self._last_draw = -float("inf")

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
