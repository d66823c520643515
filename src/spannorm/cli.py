"""What `train.py`, `eval.py` and `generate.py` run: compose objects from the Hydra config."""

from __future__ import annotations

import functools
import math
import os
import secrets
import shlex
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException, InstantiationException, MissingConfigException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, MissingMandatoryValue, OmegaConf
from rich.console import Console

from spannorm.callbacks import TrainingDiverged

console = Console(highlight=False, soft_wrap=True)

# One id per process: with `now`, it keeps two runs (or sweeps) started in the same second apart.
RUN_ID = f"{os.getpid()}-{secrets.token_hex(2)}"
TOKENIZER_VOCAB = {"byte": 257}


def register_resolvers() -> None:
    resolvers = {
        "run_id": lambda: RUN_ID,
        # the model's vocab follows the tokenizer: fixed for `byte`, configured for `bpe`
        "tokenizer_vocab": lambda kind, size: TOKENIZER_VOCAB.get(kind, size),
    }
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register_resolvers()


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit status 2."""


def friendly_errors(main):
    """Turn bad-input exceptions into `error: <message>` and exit 2 (a diverged run: exit 3;
    within a multirun, a diverged job is reported and the sweep goes on); `debug=true` re-raises."""

    @functools.wraps(main)
    def wrapper(cfg: DictConfig):
        try:
            return main(cfg)
        except (
            UsageError,
            ValueError,
            FileNotFoundError,
            KeyError,
            InstantiationException,
            MissingMandatoryValue,
            TrainingDiverged,
        ) as error:
            if cfg.get("debug", False):
                raise
            while isinstance(error, InstantiationException) and error.__cause__ is not None:
                error = error.__cause__  # Hydra wraps the constructor's own error
            message = str(error.args[0]) if error.args else repr(error)
            print(f"error: {message.splitlines()[0]}", file=sys.stderr)  # omegaconf appends details
            if not isinstance(error, TrainingDiverged):
                sys.exit(2)
            if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
                return math.nan  # a diverged run is a result of the sweep, not a reason to stop it
            sys.exit(3)

    return wrapper


def launch(hydra_main: Callable[[], Any]) -> None:
    """Run a `@hydra.main` entry point. A config Hydra cannot compose (an unknown group option
    such as `data=nope`, a malformed override) fails with one `error:` line and exit status 2;
    `debug=true` or HYDRA_FULL_ERROR=1 shows Hydra's full report instead."""
    debug = any(arg.lower() == "debug=true" for arg in sys.argv[1:])
    full_report = debug or os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra then raises what it cannot compose
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
    except (RuntimeError, ConnectionError) as error:
        raise UsageError(error.args[0] if error.args else repr(error)) from error
    return datamodule


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
        if cfg.data[key] <= 0:
            raise UsageError(f"data.{key}={cfg.data[key]} must be a positive integer")
    if cfg.data.seq_len > cfg.model.max_seq_len:
        raise UsageError(
            f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}, "
            "the longest sequence the model takes; lower data.seq_len or raise model.max_seq_len"
        )


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
    """Report a run stopped by a signal and how to continue it; exit with 128 + the signal."""
    stop_signal = stopper.stop_signal or signal.SIGTERM
    kept = f"{stopper.saved} holds step {stopper.saved_step}" if stopper.saved else "no checkpoint"
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
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from spannorm.checkpointing import LastCheckpoint
    from spannorm.loggers import instantiate_loggers

    check_train_config(cfg)
    datamodule = instantiate(cfg.data)  # checks the data options; builds nothing yet
    L.seed_everything(cfg.seed, workers=True)
    stopper = LastCheckpoint(cfg.checkpoint_every_n_steps)
    callbacks = [instantiate(c) for c in cfg.get("callbacks", {}).values() if c is not None]
    loggers = instantiate_loggers(cfg.get("logger"))
    trainer = instantiate(cfg.trainer, callbacks=[*callbacks, stopper], logger=loggers or False)
    run_dir = output_dir(cfg)
    resume = checkpoint_to_resume(cfg.resume, run_dir)
    prepare_data(datamodule)
    if datamodule.vocab_size > cfg.model.vocab_size:
        raise UsageError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
            f"{datamodule.vocab_size} ids; raise model.vocab_size"
        )
    lm = instantiate(cfg.model)
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    try:
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

    checkpoint, lm = load_model(cfg.ckpt_path)
    run_cfg = run_config_of(checkpoint)
    datamodule = build_datamodule(run_cfg.data)
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
