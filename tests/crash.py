"""A callback that kills its own process with SIGKILL the moment a new `last.ckpt` appears: the
worst time for a crash, since nothing after the checkpoint write runs. The resume test loads it
into a real `train.py` run with `+callbacks.crash._target_=crash.KillAfterCheckpoint`."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning as L


def identity(path: Path) -> tuple[int, int] | None:
    return (path.stat().st_ino, path.stat().st_mtime_ns) if path.exists() else None


class KillAfterCheckpoint(L.Callback):
    """Checks at every hook where a checkpoint can have just been written (it runs after the
    callbacks before it in the list) whether `last.ckpt` changed since the run started."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        checkpoint = trainer.checkpoint_callback
        self.last = Path(checkpoint.format_checkpoint_name({}, checkpoint.CHECKPOINT_NAME_LAST))
        self.at_start = identity(self.last)

    def _kill_if_written(self, *args) -> None:
        if identity(self.last) != self.at_start:
            os.kill(os.getpid(), signal.SIGKILL)

    on_train_batch_start = on_train_batch_end = _kill_if_written
    on_validation_start = on_validation_end = _kill_if_written


class FailAtTrainStart(L.Callback):
    """Raises a ValueError where a bug in Lightning or torch would: inside `fit`."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        raise ValueError("a bug deep inside training")
