"""The command line's shared launcher: every entry point (train.py, eval.py, generate.py,
export.py, study.py, the scripts) runs its `@hydra.main` through `launch` and `friendly_errors`,
which turn what a command raises into one `error:` line and an exit status:
2 bad input, 3 a diverged run, 1 a bug (its traceback in the run's log file)."""

from __future__ import annotations

import functools
import logging
import math
import os
import sys
import tempfile
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from hydra.errors import CompactHydraException, MissingConfigException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, MissingMandatoryValue

from spannorm.errors import TrainingDiverged, UsageError, first_line
from spannorm.runs import check_run_dir_free, launched_as_extra_rank, register_resolvers
from spannorm.training.multirun import in_sweep


def friendly_errors(main):
    """Report what a run raises without a traceback on screen (`debug=true` re-raises):
    - bad input (`UsageError`, a missing mandatory option, a damaged token shard met while
      training): `error: <message>`, exit status 2;
    - a diverged run: its `error:` line, exit 3 (within a multirun the sweep goes on);
    - anything else is unexpected: `error: <type>: <message>` and the file holding its full
      traceback (the run's log), exit status 1."""

    @functools.wraps(main)
    def wrapper(cfg: DictConfig):
        try:
            return main(cfg)
        except Exception as error:
            if cfg.get("debug", False):
                raise
            expected = (UsageError, MissingMandatoryValue, TrainingDiverged)
            if not isinstance(error, expected) and not _damaged_data(error):
                _report_unexpected(error)  # exits
            print(f"error: {first_line(error)}", file=sys.stderr)  # omegaconf appends details
            if not isinstance(error, TrainingDiverged):
                sys.exit(2)
            if in_sweep():
                return math.nan  # a diverged run is a result of the sweep, not a reason to stop it
            sys.exit(3)

    return wrapper


def _damaged_data(error: BaseException) -> bool:
    """Whether `error` is a token shard found damaged while training: bad input, not a bug."""
    # imported here: importing the data package imports Lightning, whose loggers must be created
    # after Hydra configures logging (or the run's log file misses their lines)
    from spannorm.data.shards import ShardError

    return isinstance(error, ShardError)


def _report_unexpected(error: BaseException) -> NoReturn:
    written = write_traceback(error)
    message = (str(error).strip() or "(no message)").splitlines()[0]
    print(f"error: {type(error).__name__}: {message}", file=sys.stderr)
    print(
        f"unexpected error (not a checked input): full traceback in {written}; "
        "debug=true shows it here",
        file=sys.stderr,
    )
    sys.exit(1)


def write_traceback(error: BaseException) -> Path:
    """Append `error`'s traceback to the run's log file (the file handler Hydra sets up in the run
    directory); without one, to a new temporary file. Returns the file."""
    record = logging.LogRecord(
        __name__,
        logging.ERROR,
        __file__,
        0,
        "unexpected error",
        None,
        exc_info=(type(error), error, error.__traceback__),
    )
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and handler.baseFilename != os.devnull:
            handler.handle(record)
            handler.flush()
            return Path(handler.baseFilename)
    descriptor, path = tempfile.mkstemp(prefix="spannorm-traceback-", suffix=".log")
    with os.fdopen(descriptor, "w") as f:
        f.write("".join(traceback.format_exception(error)))
    return Path(path)


def launch(hydra_main: Callable[[], Any]) -> None:
    """Run a `@hydra.main` entry point. A config Hydra cannot compose (an unknown group option
    such as `data=nope`, a malformed override) fails with one `error:` line and exit status 2;
    `debug=true` or HYDRA_FULL_ERROR=1 shows Hydra's full report instead."""
    register_resolvers()
    sys.argv[1:] = [null_group_as_deletion(arg) for arg in sys.argv[1:]]
    debug = any(arg.lower() == "debug=true" for arg in sys.argv[1:])
    full_report = debug or os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra then raises what it cannot compose
    # conf/hydra/launcher/submitit_*.yaml extend, on purpose, the plugin's schemas of those names
    warnings.filterwarnings("ignore", r"\s*'hydra/launcher/submitit_\w+' is validated against")
    try:
        hydra_main()
    except CompactHydraException as error:
        if full_report:
            raise
        print(f"error: {_composition_error(error)}", file=sys.stderr)
        sys.exit(2)


def config_dir() -> Path:
    """The folder of config groups of the running entry script (every one sits beside `conf/`)."""
    return Path(sys.argv[0]).resolve().parent / "conf"


def null_group_as_deletion(arg: str) -> str:
    """`logger=null` (any config group set to null) as Hydra spells it, `~logger`: Hydra takes a
    group's value only as a name or a list of names."""
    key, sep, value = arg.partition("=")
    if sep and value == "null" and key.isidentifier() and (config_dir() / key).is_dir():
        return f"~{key}"
    return arg


def _composition_error(error: CompactHydraException) -> str:
    if isinstance(error, MissingConfigException) and error.missing_cfg_file:
        group, _, name = error.missing_cfg_file.rpartition("/")
        options = error.options or sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))
        if group and options:  # an option of a list (logger=[a,b]) comes without its choices
            article = "an" if group[0] in "aeiou" else "a"
            choices = ", ".join(options)
            return f"{group}={name!r} is not {article} {group} config; choose one of: {choices}"
    return " ".join(str(error).strip().split("\n\n")[0].split())  # its first paragraph


class StartCheck(Callback):
    """A Hydra callback (each entry point's `hydra.callbacks.start_check`) that checks, before
    Hydra creates a directory or writes `.hydra/` into it, so that a refused start changes nothing
    on disk: the sweeper's trial count (`hydra.sweeper.n_trials`, at least 1) and the run (or
    sweep) directory. That must not be a file and, with `refuse_held_runs` (train.py), must not
    hold another run unless the command continues it (`resume=auto`) or replaces it
    (`overwrite=true`); see `spannorm.runs.check_run_dir_free`. The ranks a launcher starts in
    the directory rank 0 checked (Lightning's DDP children) are not checked again.

    Hydra turns an exception raised in a callback into a warning, so a refusal exits here."""

    def __init__(self, refuse_held_runs: bool = False) -> None:
        self.refuse_held_runs = refuse_held_runs

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if launched_as_extra_rank():
            return
        self._check(config, Path(str(config.hydra.run.dir)), "hydra.run.dir", self.refuse_held_runs)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # each job's own directory is checked by train.py: its `resume=` may be swept
        self._check(config, Path(str(config.hydra.sweep.dir)), "hydra.sweep.dir", False)
        n_trials = config.hydra.sweeper.get("n_trials")  # Optuna's sweeper (hparams_search=...)
        if n_trials is not None and (
            isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1
        ):
            print(
                f"error: hydra.sweeper.n_trials={n_trials!r} must be a positive integer "
                "(the number of runs the study makes)",
                file=sys.stderr,
            )
            sys.exit(2)

    @staticmethod
    def _check(config: DictConfig, run_dir: Path, key: str, refuse_held_runs: bool) -> None:
        try:
            if refuse_held_runs:
                resume, overwrite = config.get("resume"), bool(config.get("overwrite", False))
                check_run_dir_free(run_dir, resume, overwrite, key)
            elif run_dir.exists() and not run_dir.is_dir():
                raise UsageError(f"{key}={str(run_dir)!r} is a file; it must be a folder")
        except UsageError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)
