"""Divergence guard: stop on a non-finite loss with the last good weights saved; count spikes.

Checked in `on_before_backward`, i.e. before the step's gradients reach the weights:
- loss NaN or inf at step N (in any micro batch, on any process): save
  `checkpoints/last-good-step<N>.ckpt` (weights, optimizer and schedule after N updates, none from
  the bad batch), log `train/diverged` = 1 at step N and raise `TrainingDiverged`, which the CLI
  prints as one `error:` line (exit status 3);
- the loss of step N's global batch (all micro batches and processes) > spike_factor *
  median(the losses of the last `spike_window` steps): one more spike;
  the running count is logged as `train/loss_spikes` at the steps `train/loss` is logged at.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from pathlib import Path

import lightning as L

from spannorm.callbacks import StepLoss, log_scalars
from spannorm.errors import TrainingDiverged


class DivergenceGuard(L.Callback):
    """See the module docstring. The loss is read once per micro batch (one device sync) and
    averaged over the processes once per step."""

    def __init__(self, spike_factor: float = 1.5, spike_window: int = 50):
        if spike_factor <= 1 or spike_window < 1:
            raise ValueError(
                f"callbacks.divergence: spike_factor={spike_factor} must exceed 1 and "
                f"spike_window={spike_window} must be at least 1"
            )
        self.spike_factor = spike_factor
        self.recent_losses: deque[float] = deque(maxlen=spike_window)
        self.spikes = 0
        self.step_loss = StepLoss()

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        value = self.step_loss.add(loss)
        if trainer.strategy.reduce_boolean_decision(not math.isfinite(value), all=False):
            self._stop(trainer, value)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        value = self.step_loss.pop(trainer)
        window_full = len(self.recent_losses) == self.recent_losses.maxlen
        if window_full and value > self.spike_factor * statistics.median(self.recent_losses):
            self.spikes += 1
        self.recent_losses.append(value)
        every = trainer.log_every_n_steps  # log where train/loss is logged
        if every and (trainer.global_step + 1) % every == 0:
            log_scalars(trainer, {"train/loss_spikes": self.spikes}, trainer.global_step)

    def state_dict(self) -> dict:
        """Saved in checkpoints, so that a resumed run keeps counting."""
        return {"spikes": self.spikes, "recent_losses": list(self.recent_losses)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.spikes = state_dict["spikes"]
        self.recent_losses.extend(state_dict["recent_losses"])

    def _stop(self, trainer, value: float) -> None:
        step = trainer.global_step
        directory = (
            Path(trainer.checkpoint_callback.dirpath)
            if trainer.checkpoint_callback and trainer.checkpoint_callback.dirpath
            else Path(trainer.default_root_dir) / "checkpoints"
        )
        path = directory / f"last-good-step{step:06d}.ckpt"
        trainer.save_checkpoint(path, weights_only=False)
        log_scalars(trainer, {"train/diverged": 1.0}, step)
        raise TrainingDiverged(
            f"training diverged: loss is {value} at step {step}; last good checkpoint "
            f"(the weights before that step): {path}"
        )
