"""The progress bar of step-based training: steps done out of `trainer.max_steps` (120/300)."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar


class StepProgressBar(RichProgressBar):
    """Lightning's rich bar, but when training is set by `max_steps` (every trainer config here)
    one training bar counts optimizer steps over the whole run, across epochs, instead of the
    batches of each epoch under "Epoch 0/-2". Epoch-based training keeps Lightning's bar."""

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
