"""Checkpoints that survive interruption: atomic writes, a `last.ckpt` kept ready to resume from
(every N steps, at the last step, and when SIGTERM or SIGINT stops the run), finding and
verifying the checkpoint to resume from or to load, and consolidating a sharded one into one file
(`python -m spannorm.training.checkpointing <folder>`)."""

from __future__ import annotations

import functools
import os
import shutil
import signal
import sys
import threading
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from spannorm.errors import UsageError, first_line
from spannorm.files import atomic_output

# A sharded checkpoint is a folder: one file per process beside this one of the trainer's state.
SHARDED_METADATA = "meta.pt"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file beside it, fsyncs it and renames it over the old
    one, so a run killed mid-write leaves the previous checkpoint intact (local paths)."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None
    ) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(path) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)
            _fsync(tmp)
        _fsync(path.parent)  # the rename itself survives a crash of the machine


class LastCheckpoint(L.Callback):
    """Keeps the run's `last.ckpt` (in its ModelCheckpoint's folder) ready to resume from: saved
    every `every_n_train_steps` steps, at the last step (and at the end of training, if it ends
    otherwise), and when SIGTERM or SIGINT stops the run. A stop signal ends the run after the
    current step, or after the validation in progress; Lightning then raises `SIGTERMException`.
    A second SIGINT interrupts at once, without saving.

    A checkpoint never claims steps whose logged values are not on disk: every logger is flushed
    before any checkpoint of the run is written (ModelCheckpoint's too), and a periodic checkpoint,
    which Lightning takes before it logs that step's metrics, is written to a hidden file first and
    renamed to `last.ckpt` only at the next hook, once those metrics are logged and flushed.

    `stop_signal` is the signal that stopped the run; `saved` and `saved_step` are the last
    checkpoint this callback wrote and its step. A validation cut short by a signal arriving just
    before it is not saved (resuming would skip it): the previous checkpoint stays the last.
    """

    def __init__(self, every_n_train_steps: int | None = None) -> None:
        if every_n_train_steps is not None and every_n_train_steps < 1:
            raise ValueError(
                f"checkpoint_every_n_steps={every_n_train_steps} must be a positive integer or null"
            )
        self.every_n_train_steps = every_n_train_steps
        self.stop_signal: signal.Signals | None = None
        self.saved: str | None = None
        self.saved_step: int | None = None
        self._pending: tuple[Path, Path, int] | None = None  # (written, to publish as, step)
        self._resumed = False
        self._stop_after_validation = False
        self._lightning_stop = None
        self._previous_handlers: dict[signal.Signals, Any] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._resumed = trainer.ckpt_path is not None
        # Lightning's SIGTERM handler, installed for `fit`, stops the loop after the current step
        lightning_stop = signal.getsignal(signal.SIGTERM)
        on_main_thread = threading.current_thread() is threading.main_thread()
        if not (callable(lightning_stop) and on_main_thread):
            return  # no handler to stop with (Windows), or no signals here (not the main thread)
        self._lightning_stop = lightning_stop
        handler = functools.partial(self._on_stop_signal, trainer)
        for signum in STOP_SIGNALS:
            self._previous_handlers[signum] = signal.signal(signum, handler)

    def _on_stop_signal(self, trainer: L.Trainer, signum: int, frame: Any) -> None:
        if self.stop_signal is not None:
            if signum == signal.SIGINT:
                flush_loggers(trainer)
                raise KeyboardInterrupt  # a second Ctrl+C: stop now, without a checkpoint
            return
        self.stop_signal = signal.Signals(signum)
        if trainer.validating:
            self._stop_after_validation = True
        else:
            self._lightning_stop(signal.SIGTERM, frame)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._stop_after_validation:
            self._stop_after_validation = False
            self._lightning_stop(signal.SIGTERM, None)

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        flush_loggers(trainer)  # called by Lightning before it writes any checkpoint

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        step = trainer.global_step
        periodic = self.every_n_train_steps and step % self.every_n_train_steps == 0
        # The last step is saved here too, not only in `on_train_end`: by then the loop has
        # finished (its step counter one further, its epoch closed), and a run extended from
        # such a checkpoint (a larger trainer.max_steps) would log every step one too high.
        last = 0 < trainer.max_steps <= step
        if periodic or last:
            self._save(trainer, publish=False)

    # the first hooks after Lightning has logged the metrics of the step a pending checkpoint holds
    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._publish(trainer)
        if self._resumed:
            self._resumed = False
            align_logged_step(trainer)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._publish(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._publish(trainer)
        self._save(trainer)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore_handlers()
        self._publish(trainer)
        stopped_between_steps = not (trainer.validating or trainer.sanity_checking)
        if isinstance(exception, SIGTERMException) and stopped_between_steps:
            self._save(trainer)
        flush_loggers(trainer)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore_handlers()

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers.clear()

    def _save(self, trainer: L.Trainer, publish: bool = True) -> None:
        checkpoint = trainer.checkpoint_callback
        if checkpoint is None or self.saved_step == trainer.global_step:
            return
        path = Path(checkpoint.format_checkpoint_name({}, checkpoint.CHECKPOINT_NAME_LAST))
        written = path if publish else path.with_name(f".{path.name}.pending")
        trainer.save_checkpoint(written, weights_only=False)
        self._pending = (written, path, trainer.global_step)
        if publish:
            self._publish(trainer)

    def _publish(self, trainer: L.Trainer) -> None:
        """Rename the pending checkpoint to its name, after flushing the logs it vouches for."""
        if self._pending is None:
            return
        written, path, step = self._pending
        self._pending = None
        flush_loggers(trainer)
        if written != path and trainer.is_global_zero:
            replace_path(written, path)  # every rank's shard is written: saving ends in a barrier
        # so that ModelCheckpoint replaces this file next, instead of writing a last-v1.ckpt
        trainer.checkpoint_callback.last_model_path = str(path)
        self.saved, self.saved_step = str(path), step


def align_logged_step(trainer: L.Trainer) -> None:
    """Before the first step of a resumed run, set the step its metrics are logged at (Lightning's
    count of optimizer steps taken, `_batches_that_stepped`) to the step it resumes from. The two
    are equal between steps of one optimizer, but a checkpoint written during the validation that
    ends a run at a step off the validation interval (`should_stop` at `trainer.max_steps`) holds
    the count of the step before, and Lightning's restore adds the missing one only at interval
    steps: a run extended from such a checkpoint logged every new step one too low, the first on
    top of the last step of the run it continues."""
    loop = trainer.fit_loop.epoch_loop
    if getattr(loop, "_batches_that_stepped", None) not in (None, trainer.global_step):
        loop._batches_that_stepped = trainer.global_step


def flush_loggers(trainer: L.Trainer) -> None:
    """Write what every logger of `trainer` holds in memory (TensorBoard's queue) to disk."""
    for logger in trainer.loggers:
        logger.save()


def replace_path(source: Path, target: Path) -> None:
    """Rename `source` over `target`: atomic for a file; for the folder of a sharded checkpoint
    the old folder is moved aside first and removed after."""
    if source.is_dir() and target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(source, target)
        shutil.rmtree(old)
    else:
        os.replace(source, target)
    _fsync(target.parent)


def is_checkpoint(path: Path) -> bool:
    """A checkpoint file, or the folder of a sharded checkpoint."""
    return path.is_file() or (path / SHARDED_METADATA).is_file()


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint in `run_dir/checkpoints` or `run_dir` that holds the run's latest state: the
    highest training step stored inside it (`global_step`), `last.ckpt` among those at that step.
    File times are not used: a copied or restored folder has times that say nothing of the steps.
    A candidate whose step cannot be read is an error, never skipped for an older one."""
    found = [
        path
        for folder in (run_dir / "checkpoints", run_dir)
        for path in folder.glob("*.ckpt")
        if is_checkpoint(path)
    ]
    return max(
        found,
        key=lambda path: (checkpoint_step(path), path.stem == "last", path.name),
        default=None,
    )


def checkpoint_step(path: Path) -> int:
    """The training step stored in a checkpoint (a sharded one's `meta.pt`), -1 for a file that
    stores none; its tensors are memory-mapped, not read. ValueError if it cannot be read."""
    archive = path / SHARDED_METADATA if path.is_dir() else path
    try:
        stored = torch.load(archive, map_location="cpu", mmap=True, weights_only=False)
    except Exception as error:  # torch reports a damaged archive as RuntimeError, pickle's own...
        raise ValueError(
            f"checkpoint {str(path)!r} is not readable ({first_line(error)}); it is truncated or "
            "was not written by torch.save: move it away to resume from the others"
        ) from None
    step = stored.get("global_step", -1) if isinstance(stored, dict) else -1
    return int(step)


def verify_checkpoint(path: Path, key: str) -> None:
    """Raise ValueError unless the checkpoint's zip archive (torch.save's format) is complete and
    every member matches its CRC: `torch.load` itself accepts flipped bits in tensor data."""
    archive = path / SHARDED_METADATA if path.is_dir() else path
    try:
        with zipfile.ZipFile(archive) as zip_file:
            damaged = zip_file.testzip()
    except (zipfile.BadZipFile, EOFError, OSError) as error:
        raise ValueError(
            f"{key}={str(path)!r} is not a readable checkpoint ({error}); it is truncated or "
            "was not written by torch.save"
        ) from None
    if damaged is not None:
        raise ValueError(f"{key}={str(path)!r} is corrupted: its {damaged!r} fails the CRC check")


def resolve_checkpoint(path: str | os.PathLike, key: str = "ckpt_path") -> Path:
    """The checkpoint at `path`, or the latest one (by stored step) of the run directory `path`, verified intact;
    `key` names the option in error messages."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{key}={str(path)!r} does not exist; pass a run directory or a .ckpt file"
        )
    if not is_checkpoint(path):
        newest = newest_checkpoint(path)
        if newest is None:
            raise FileNotFoundError(
                f"{key}={str(path)!r} is a directory without checkpoints (*.ckpt in it or in its "
                "checkpoints/); pass a run directory or a .ckpt file"
            )
        path = newest
    verify_checkpoint(path, key)
    return path


def check_weights_fit(checkpoint: Path, module: torch.nn.Module, key: str = "resume") -> None:
    """Raise UsageError when the weights stored in `checkpoint` do not fit `module` (another
    model shape than the run that wrote it), naming the model settings that differ between the
    checkpoint's saved hyperparameters and `module`'s, instead of torch's list of tensors.
    A sharded checkpoint (a folder) is left to the strategy's loader."""
    if checkpoint.is_dir():
        return
    stored = torch.load(checkpoint, map_location="cpu", mmap=True, weights_only=False)
    saved = {name: tuple(t.shape) for name, t in stored.get("state_dict", {}).items()}
    here = {name: tuple(t.shape) for name, t in module.state_dict().items()}
    if saved == here:
        return
    there = stored.get("hyper_parameters", {})
    ours = dict(getattr(module, "hparams", {}))
    differ = [
        f"model.{name}={there[name]!r} there, {ours[name]!r} here"
        for name in sorted(there)
        if name in ours and name != "optim" and there[name] != ours[name]
    ]
    shapes = [
        name for name in sorted(saved.keys() | here.keys()) if saved.get(name) != here.get(name)
    ]
    detail = "; ".join(differ) if differ else f"{len(shapes)} tensors differ, e.g. {shapes[0]}"
    raise UsageError(
        f"{key}={str(checkpoint)!r} holds another model shape than this run's ({detail}); "
        "resume with the settings of the run that wrote it (its .hydra/config.yaml)"
    )


def consolidate_checkpoint(folder: str | os.PathLike) -> Path:
    """Write the weights and training metadata of a sharded checkpoint folder (what
    `ModelParallelStrategy` saves) to `<name>.consolidated.ckpt` beside it: one file that
    `LanguageModel.load_from_checkpoint`, eval.py and generate.py read. Optimizer state is left
    out (it is keyed by parameter name there, by position in a plain checkpoint)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    folder = Path(folder)
    metadata = folder / SHARDED_METADATA  # Lightning's file of everything but the sharded tensors
    if not metadata.is_file():
        raise FileNotFoundError(f"{folder} is not a sharded Lightning checkpoint (no meta.pt)")
    output = folder.with_suffix(".consolidated.ckpt")
    dcp_to_torch_save(folder, output)
    weights = torch.load(output, map_location="cpu")["state_dict"]
    torch.save({**torch.load(metadata, map_location="cpu"), "state_dict": weights}, output)
    return output


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m spannorm.training.checkpointing <sharded checkpoint folder>")
    print(consolidate_checkpoint(sys.argv[1]))
