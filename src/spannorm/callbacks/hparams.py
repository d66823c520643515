"""The run's key config in TensorBoard's HPARAMS tab, scored by its final validation loss."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger


class HParamsSummary(L.Callback):
    """At the end of training, `params` (flat {name: value}; conf/callbacks/default.yaml picks
    the config keys) with the metric `hp/final_val_loss` = the last logged `val/loss` (NaN if
    none), written by `TensorBoardLogger.log_hyperparams`; other loggers get the metric alone."""

    def __init__(self, params: dict[str, Any]):
        self.params = dict(params)

    def on_train_end(self, trainer, pl_module) -> None:
        val_loss = trainer.callback_metrics.get("val/loss")
        metrics = {"hp/final_val_loss": float("nan") if val_loss is None else float(val_loss)}
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.log_hyperparams(self.params, metrics=metrics)
            else:  # the other loggers have the whole config already; they get the metric
                logger.log_metrics(metrics, step=trainer.global_step)
