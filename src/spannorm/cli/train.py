"""`train.py`: fit the model the config composes on its data, resumable, reporting how it went.

Lightning and the package's training modules are imported inside `train`, after Hydra has set up
logging (their loggers, made at import, must find the run's log file handler)."""

from __future__ import annotations

import math
import shlex
import signal
import sys
from pathlib import Path
from typing import NoReturn

from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from spannorm.console import console
from spannorm.errors import UsageError, checking_input
from spannorm.runs import (
    check_run_dir_free,
    clear_run,
    mark_run_started,
    output_dir,
    restore_hydra_files,
)


def launched_rank() -> int:
    """This process's global rank as its launcher set it (torchrun, srun, Lightning's own launcher
    for its child processes), before any process group exists; 0 when started alone."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0)


def checkpoint_to_resume(resume: str | None, run_dir: Path) -> Path | None:
    """The verified checkpoint that `resume=` names: null starts fresh; `auto` takes the checkpoint
    of this run's directory with the highest stored step (none yet: start fresh, with a notice);
    else a run directory (the same choice there) or a checkpoint."""
    from spannorm.training.checkpointing import newest_checkpoint, resolve_checkpoint

    if resume is None:
        return None
    if resume == "auto":
        resume = newest_checkpoint(run_dir)
        if resume is None:
            console.print(f"resume=auto: no checkpoint in {run_dir} yet; starting fresh")
            return None
    return resolve_checkpoint(resume, "resume")


def check_run_dir(cfg: DictConfig, run_dir: Path) -> None:
    """Refuse a run directory that holds another run (see `spannorm.runs.check_run_dir_free`).
    A single run was checked before Hydra wrote into the directory (`launcher.StartCheck`); a
    multirun job only here, after Hydra rewrote its `.hydra/`, so a refusal puts the old run's
    files back."""
    try:
        check_run_dir_free(run_dir, cfg.resume, cfg.get("overwrite", False), "the run directory")
    except UsageError:
        restore_hydra_files(run_dir)
        raise


def exit_after_stop(stopper, step: int, run_dir: Path) -> NoReturn:
    """Report a run stopped by a signal and how to continue it; exit with 128 + the signal.
    `stopper` is the run's LastCheckpoint (None if `callbacks.last_checkpoint=null`)."""
    stop_signal = (stopper and stopper.stop_signal) or signal.SIGTERM
    saved = stopper and stopper.saved
    kept = f"{saved} holds step {stopper.saved_step}" if saved else "no checkpoint"
    overrides = [
        override
        for override in HydraConfig.get().overrides.task
        if not override.startswith(("resume=", "hydra.run.dir="))
    ]
    command = ["python", sys.argv[0], *overrides, f"hydra.run.dir={run_dir}", "resume=auto"]
    console.print(f"\nstopped by {stop_signal.name} at step {step}; {kept}")
    console.print(f"continue with: {shlex.join(command)}")
    sys.exit(128 + stop_signal)


def train(cfg: DictConfig) -> float:
    """Fit the model on the data; return the final validation loss."""
    import lightning as L
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.accelerators import CPUAccelerator
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from spannorm.data.prepare import prepare_data
    from spannorm.training.checkpointing import LastCheckpoint, check_weights_fit
    from spannorm.training.checks import check_accelerator, check_train_config
    from spannorm.training.global_batch import apply_global_batch
    from spannorm.training.loggers import instantiate_loggers
    from spannorm.training.memory import keep_freed_memory
    from spannorm.training.multirun import job_processes

    with checking_input(MisconfigurationException):  # Lightning's word for a bad Trainer option
        check_train_config(cfg)
        check_accelerator(cfg.trainer.accelerator)
        apply_global_batch(cfg)
        datamodule = instantiate(cfg.data)  # checks the data options; builds nothing yet
        L.seed_everything(cfg.seed, workers=True)
        callbacks = [instantiate(c) for c in cfg.get("callbacks", {}).values() if c is not None]
        loggers = instantiate_loggers(cfg.get("logger"))
        trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
        run_dir = output_dir(cfg)
        builds_data = launched_rank() == 0
        if builds_data:  # the other ranks run in the directory rank 0 checked
            check_run_dir(cfg, run_dir)
        resume = checkpoint_to_resume(cfg.resume, run_dir)
        # Rank 0 builds the data (or reads its caches) here, so that a data error is one line
        # before anything trains; the other ranks of a multi-process launch skip this and read
        # the caches in `fit` (Lightning's prepare_data hook, then a barrier, then setup), so
        # the data is built once. A file lock per split keeps nodes sharing a file system apart.
        if builds_data:
            prepare_data(datamodule)
    if builds_data and datamodule.vocab_size > cfg.model.vocab_size:
        raise UsageError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the data's "
            f"{datamodule.vocab_size} token ids; raise model.vocab_size"
        )
    stopper = next((c for c in callbacks if isinstance(c, LastCheckpoint)), None)
    if isinstance(trainer.accelerator, CPUAccelerator):
        keep_freed_memory()
    lm = instantiate(cfg.model)
    if resume is not None:
        check_weights_fit(resume, lm)
    if builds_data:  # from here on this directory holds this run
        if cfg.get("overwrite", False):
            clear_run(run_dir)
        mark_run_started(run_dir)
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    try:
        with job_processes(trainer, run_dir):
            trainer.fit(lm, datamodule=datamodule, ckpt_path=resume)
    except SIGTERMException:
        exit_after_stop(stopper, trainer.global_step, run_dir)
    val_loss = float(trainer.callback_metrics.get("val/loss", float("nan")))
    if trainer.is_global_zero:
        report_run(val_loss, datamodule.unigram_baseline(), run_dir)
    return val_loss


def report_run(val_loss: float, baseline: float, run_dir: Path) -> None:
    """The closing lines of a run: what it reached against a unigram model, and where it went."""
    if math.isnan(val_loss):
        console.print(f"\nno validation ran | unigram baseline {baseline:.4f} nats")
    else:
        verdict = (
            "learned beyond unigram" if val_loss < baseline else "NOT below the unigram baseline"
        )
        console.print(
            f"\nval/loss {val_loss:.4f} nats (ppl {math.exp(val_loss):.1f}) | "
            f"unigram baseline {baseline:.4f} nats | {verdict}"
        )
    checkpoints = run_dir / "checkpoints"
    last = checkpoints / "last.ckpt"
    console.print(f"run dir:     {run_dir}")
    console.print(f"tensorboard: tensorboard --logdir {run_dir}")
    console.print(
        f"checkpoint:  {last if last.exists() else checkpoints if checkpoints.exists() else '(none)'}"
    )
