"""What `train.py`, `eval.py` and `generate.py` run: compose objects from the Hydra config."""

from __future__ import annotations

import ctypes
import functools
import logging
import math
import os
import secrets
import shlex
import signal
import sys
import tempfile
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException, InstantiationException, MissingConfigException
from hydra.utils import instantiate
from omegaconf import DictConfig, MissingMandatoryValue, OmegaConf
from rich.console import Console

from spannorm.callbacks import TrainingDiverged
from spannorm.global_batch import apply_global_batch
from spannorm.multirun import in_sweep, job_processes

console = Console(highlight=False, soft_wrap=True)

# One id per process: with `now`, it keeps two runs (or sweeps) started in the same second apart.
RUN_ID = f"{os.getpid()}-{secrets.token_hex(2)}"
# An error of these types raised while the input is checked (`checking_input`) is bad input.
INPUT_ERRORS = (
    ValueError,
    TypeError,
    KeyError,
    FileNotFoundError,
    InstantiationException,
    MissingMandatoryValue,
)


def data_vocab(data: DictConfig, size: int | None = None) -> int:
    """The model's vocab follows the data: see spannorm.data.data_vocab_size. (Configs saved
    before it pass (tokenizer kind, vocab_size) instead of the data config.)"""
    from spannorm.data import data_vocab_size
    from spannorm.data.tokenizer import ByteTokenizer

    if isinstance(data, str):
        return ByteTokenizer.vocab_size if data == "byte" else size
    return data_vocab_size(data)


def register_resolvers() -> None:
    """The config's own interpolations, `${run_id:}`, `${tokenizer_vocab:...}` and `${product:}`:
    call before composing a config (`launch` does)."""
    resolvers = {
        "run_id": lambda: RUN_ID,
        # the model's vocab follows the data: its tokenizer's, or its token files'
        "tokenizer_vocab": data_vocab,
        "product": lambda *factors: math.prod(int(f) for f in factors),  # devices x nodes
    }
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            # cached: a launcher's worker (submitit) resolves the sweep dir as its parent did
            OmegaConf.register_new_resolver(name, fn, use_cache=name == "run_id")


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit status 2."""


@contextmanager
def checking_input(*error_types: type[BaseException]) -> Iterator[None]:
    """Run a block that only reads and checks the user's input (the config, the data files, the
    checkpoint named): an error of `INPUT_ERRORS` or `error_types` raised in it is bad input and
    leaves as a one-line UsageError. The same error raised anywhere else is a bug."""
    try:
        yield
    except UsageError:
        raise
    except (*INPUT_ERRORS, *error_types) as error:
        while isinstance(error, InstantiationException) and error.__cause__ is not None:
            error = error.__cause__  # Hydra wraps the constructor's own error
        raise UsageError(_first_line(error)) from error


def _first_line(error: BaseException) -> str:
    message = str(error.args[0]) if error.args else repr(error)
    return message.strip().splitlines()[0] if message.strip() else type(error).__name__


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
            print(f"error: {_first_line(error)}", file=sys.stderr)  # omegaconf appends details
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


def _composition_error(error: CompactHydraException) -> str:
    if isinstance(error, MissingConfigException) and error.options and error.missing_cfg_file:
        group, _, name = error.missing_cfg_file.rpartition("/")
        article = "an" if group[0] in "aeiou" else "a"
        choices = ", ".join(error.options)
        return f"{group}={name!r} is not {article} {group} config; choose one of: {choices}"
    return " ".join(str(error).strip().split("\n\n")[0].split())  # its first paragraph


def output_dir(cfg: DictConfig) -> Path:
    """The run's directory: `run_dir` if set, else the directory Hydra made for this job."""
    if cfg.get("run_dir"):
        return Path(cfg.run_dir)
    return Path(HydraConfig.get().runtime.output_dir)


def run_dir_of(checkpoint: Path) -> Path:
    """The directory of the run that wrote `checkpoint`: the nearest one above with `.hydra/`."""
    for parent in checkpoint.resolve().parents:
        if (parent / ".hydra" / "config.yaml").is_file():
            return parent
    raise FileNotFoundError(
        f"no .hydra/config.yaml above {checkpoint}; is it inside a run directory?"
    )


def run_config_of(checkpoint: Path) -> DictConfig:
    """The config saved by Hydra with the run that wrote `checkpoint`."""
    return OmegaConf.load(run_dir_of(checkpoint) / ".hydra" / "config.yaml")


def build_datamodule(data_cfg: DictConfig):
    return prepare_data(instantiate(data_cfg))


def prepare_data(datamodule):
    """Build (or load from the cache) the datamodule's corpus, tokenizer and tokens; a source that
    cannot be reached (the corpus download, the hub) is reported as a one-line UsageError."""
    try:
        datamodule.prepare_data()
        datamodule.setup("fit")
    except ConnectionError as error:
        raise UsageError(_first_line(error)) from error
    return datamodule


def launched_rank() -> int:
    """This process's global rank as its launcher set it (torchrun, srun, Lightning's own launcher
    for its child processes), before any process group exists; 0 when started alone."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0)


def check_train_config(cfg: DictConfig) -> None:
    """Fail at once, in one line, on options that would otherwise fail only once the data or the
    model is built: the model and optimizer options (TransformerConfig's and OptimConfig's
    checks), data sizes, sequence length."""
    from spannorm.lm import TRAINING_OPTIONS, model_config
    from spannorm.optim import OptimConfig

    model_options = OmegaConf.to_container(cfg.model, resolve=True)
    OptimConfig.from_options(model_options.get("optim"))
    model_config(
        {k: v for k, v in model_options.items() if k not in ("_target_", *TRAINING_OPTIONS)}
    )
    for key in ("seq_len", "batch_size", "vocab_size"):
        if cfg.data[key] is not None and cfg.data[key] <= 0:
            raise UsageError(f"data.{key}={cfg.data[key]} must be a positive integer")
    if cfg.data.seq_len > cfg.model.max_seq_len:
        raise UsageError(
            f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}, "
            "the longest sequence the model takes; lower data.seq_len or raise model.max_seq_len"
        )


def check_accelerator(accelerator: str) -> None:
    """A GPU accelerator needs a CUDA GPU: say so, and what runs here, instead of Lightning's
    "No supported gpu backend found!"."""
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise UsageError(
            f"trainer.accelerator={accelerator!r} needs a CUDA GPU and none was found on this "
            "machine; trainer=cpu runs here"
        )


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse rather than give it back to the kernel.

    By default it maps every block over 32 MiB straight from the kernel and unmaps it when freed;
    on CPU the [tokens, vocab] logits, their log-softmax and both gradients are such blocks, so
    each step page-faults them in again (see docs/performance.md). With mmap off and the heap
    never trimmed they are reused from the heap: faster steps for a somewhat higher peak RSS.
    A setting of the whole process, so `train` applies it (on CPU). Returns whether it applied
    (False where the C library is not glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "gnu_get_libc_version"):
        return False
    mmap_max, trim_threshold = -4, -1  # M_MMAP_MAX, M_TRIM_THRESHOLD in <malloc.h>
    return bool(libc.mallopt(mmap_max, 0)) and bool(libc.mallopt(trim_threshold, 2**31 - 1))


def checkpoint_to_resume(resume: str | None, run_dir: Path) -> Path | None:
    """The verified checkpoint that `resume=` names: null starts fresh; `auto` takes the newest
    checkpoint of this run's directory (none yet: start fresh, with a notice); else a run directory
    or a checkpoint."""
    from spannorm.checkpointing import newest_checkpoint, resolve_checkpoint

    if resume is None:
        return None
    if resume == "auto":
        resume = newest_checkpoint(run_dir)
        if resume is None:
            console.print(f"resume=auto: no checkpoint in {run_dir} yet; starting fresh")
            return None
    return resolve_checkpoint(resume, "resume")


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

    from spannorm.checkpointing import LastCheckpoint
    from spannorm.loggers import instantiate_loggers

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
        resume = checkpoint_to_resume(cfg.resume, run_dir)
        # Rank 0 builds the data (or reads its caches) here, so that a data error is one line
        # before anything trains; the other ranks of a multi-process launch skip this and read
        # the caches in `fit` (Lightning's prepare_data hook, then a barrier, then setup), so
        # the data is built once. A file lock per split keeps nodes sharing a file system apart.
        builds_data = launched_rank() == 0
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


def load_model(ckpt_path: str):
    """The LanguageModel of a checkpoint, rebuilt from the hyperparameters saved in it."""
    from spannorm.checkpointing import resolve_checkpoint
    from spannorm.lm import LanguageModel

    checkpoint = resolve_checkpoint(ckpt_path)
    return checkpoint, LanguageModel.load_from_checkpoint(checkpoint, map_location="cpu")


def evaluate(cfg: DictConfig) -> float | dict[str, float]:
    """Validation loss and perplexity of a checkpoint on its run's validation data; with `tasks`,
    its downstream results with lm-evaluation-harness (`spannorm.evaluation`)."""
    import lightning as L

    if cfg.get("tasks"):
        from spannorm.evaluation import run_tasks

        return run_tasks(cfg)

    with checking_input():
        checkpoint, lm = load_model(cfg.ckpt_path)
        datamodule = build_datamodule(run_config_of(checkpoint).data)
    trainer = L.Trainer(
        accelerator=cfg.accelerator, devices=1, logger=False, enable_progress_bar=cfg.progress
    )
    metrics = trainer.validate(lm, datamodule=datamodule, verbose=False)[0]
    loss = metrics["val/loss"]
    console.print(f"checkpoint {checkpoint}")
    console.print(f"val/loss {loss:.4f}  val/ppl {metrics['val/ppl']:.2f}")
    return loss


def sample(cfg: DictConfig) -> list[str]:
    """Generate text from a checkpoint: prompt, max_new_tokens, temperature, top_k, kv_cache."""
    from spannorm.generate import generate

    with checking_input():
        checkpoint, lm = load_model(cfg.ckpt_path)
        tokenizer = instantiate(run_config_of(checkpoint).data).load_tokenizer()
    generator = torch.Generator().manual_seed(cfg.seed)
    prompt = torch.tensor([tokenizer.encode(cfg.prompt)] * cfg.num_samples, dtype=torch.long)
    if prompt.shape[1] == 0:
        raise UsageError("prompt='' encodes to no tokens; give a non-empty prompt")
    out = generate(
        lm.model,
        prompt,
        cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        kv_cache=cfg.kv_cache,
        generator=generator,
    )
    texts = [tokenizer.decode(row.tolist()) for row in out]
    for i, text in enumerate(texts):
        console.rule(f"sample {i}")
        console.print(text, markup=False)
    return texts
