"""Plateau escape: the first step whose training loss is `margin` nats below the unigram baseline.

Deep models often sit on the unigram plateau (loss ~ the entropy of token frequencies) for a
while before they learn anything more; when a run leaves it decides much of its final loss
(docs/results.md). This callback logs `train/plateau_escape_step` once, at the step the loss of a
training batch (the step's whole global batch: every micro batch and process) first falls
`margin` nats below the data's unigram baseline, and
`train/plateau_escaped` (0 until then, 1 after) where `train/loss` is logged, so that a run that
never escapes says so.
"""

from __future__ import annotations

import lightning as L

from spannorm.callbacks import StepLoss, log_scalars


class PlateauEscape(L.Callback):
    """See the module docstring. The baseline comes from the datamodule's `unigram_baseline()`."""

    def __init__(self, margin: float = 0.3):
        if margin <= 0:
            raise ValueError(f"callbacks.plateau: margin={margin} must be positive (nats)")
        self.margin = margin
        self.threshold: float | None = None
        self.escape_step: int | None = None
        self.step_loss = StepLoss()

    def on_fit_start(self, trainer, pl_module) -> None:
        baseline = getattr(trainer.datamodule, "unigram_baseline", None)
        self.threshold = baseline() - self.margin if callable(baseline) else None

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if self.threshold is not None and self.escape_step is None:
            self.step_loss.add(loss)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.threshold is None:
            return
        step = trainer.global_step  # the step whose loss this is, as `train/loss` logs it
        if self.escape_step is None and self.step_loss.pop(trainer) < self.threshold:
            self.escape_step = step
            log_scalars(trainer, {"train/plateau_escape_step": float(step)}, step)
        every = trainer.log_every_n_steps
        if every and (step + 1) % every == 0:
            escaped = float(self.escape_step is not None)
            log_scalars(trainer, {"train/plateau_escaped": escaped}, step)

    def state_dict(self) -> dict:
        return {"escape_step": self.escape_step}

    def load_state_dict(self, state_dict: dict) -> None:
        self.escape_step = state_dict["escape_step"]
