"""Hydra multirun with a multi-process strategy (`trainer=ddp`, `trainer=fsdp`): one job, once.

Lightning starts the other processes of a job by running the command line again
(`_SubprocessScriptLauncher`, adding `hydra.run.dir=<HydraConfig run.dir>`). Within a multirun
that command line is the whole sweep (`-m seed=1,2`) and `run.dir` is not the job's directory, so
every extra process would start a sweep of its own in other directories (lightning-hydra-template
#393, Lightning #11300). `job_processes` makes the command line that of this job alone: its
overrides, `hydra.mode=RUN`, and its own directory as `run.dir`, so that all ranks of a job train
in the job's directory; after the fit it waits for those processes, and clears what Lightning
left in the environment and the process group, so that the next job starts afresh.

With a cluster launcher (`hydra/launcher=submitit_slurm`) SLURM starts every rank itself and
Lightning starts nothing: this changes nothing there.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import read_write

# Set in a multirun job for the processes Lightning starts: they run as single runs (RunMode.RUN)
# yet are part of a sweep job (a diverged run is then a result, not a failure: spannorm.cli).
SWEEP_JOB_ENV = "SPANNORM_SWEEP_JOB"
# hydra overrides that belong to the sweep, not to one of its jobs
SWEEP_ONLY = (
    "hydra.mode",
    "hydra.sweep",
    "hydra/sweeper",
    "hydra.sweeper",
    "hydra/launcher",
    "hydra.launcher",
    "hydra.run.dir",
)


def in_sweep() -> bool:
    """Whether this process runs a job of a multirun (or is a rank that such a job started)."""
    if os.environ.get(SWEEP_JOB_ENV):
        return True
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def job_command_line() -> list[str]:
    """This multirun job's command line as a single run: script, overrides, `hydra.mode=RUN`."""
    overrides = HydraConfig.get().overrides
    own = [o for o in overrides.hydra if not o.lstrip("+~").startswith(SWEEP_ONLY)]
    return [sys.argv[0], *overrides.task, *own, "hydra.mode=RUN"]


def check_can_start_ranks(trainer) -> None:
    """Refuse a job that would start ranks by re-running a command line that is not this
    script's: a launcher's worker (`hydra/launcher=submitit_local`, `python -m ...`)."""
    strategy = trainer.strategy
    starts_ranks = getattr(strategy.launcher, "num_processes", 1) > 1 and not (
        strategy.cluster_environment.creates_processes_externally
    )
    if starts_ranks and getattr(sys.modules["__main__"], "__spec__", None) is not None:
        raise ValueError(
            f"this sweep job runs in a launcher's worker ({sys.modules['__main__'].__spec__.name}), "
            f"which cannot start the other {strategy.launcher.num_processes - 1} rank(s) of "
            "trainer.devices; run the sweep with the default launcher, or on SLURM with "
            "hydra/launcher=submitit_slurm (one task per device)"
        )


@contextmanager
def job_processes(trainer, run_dir: Path) -> Iterator[None]:
    """Around `trainer.fit` in a multirun job: see the module docstring. Outside one, nothing."""
    if not (HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN):
        yield
        return
    check_can_start_ranks(trainer)
    argv, environ = list(sys.argv), dict(os.environ)
    hydra = HydraConfig.get()
    run_dir_before = hydra.run.dir
    sys.argv = job_command_line()
    with read_write(hydra.run):
        hydra.run.dir = str(run_dir)  # Lightning appends hydra.run.dir=<this> for the other ranks
    os.environ[SWEEP_JOB_ENV] = "1"
    try:
        yield
    finally:
        for process in getattr(trainer.strategy.launcher, "procs", []):
            try:
                process.wait(timeout=120)
            except subprocess.TimeoutExpired:  # a rank stuck after the job failed
                process.kill()
        sys.argv = argv
        with read_write(hydra.run):
            hydra.run.dir = run_dir_before
        os.environ.clear()
        os.environ.update(environ)  # Lightning's LOCAL_RANK would make the next job wait for ranks
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
