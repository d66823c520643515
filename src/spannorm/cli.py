"""What `train.py`, `eval.py` and `generate.py` run: compose objects from the Hydra config."""

from __future__ import annotations

import functools
import os
import secrets
import sys
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

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
    """Turn bad-input exceptions into `error: <message>` and exit 2; `debug=true` re-raises."""

    @functools.wraps(main)
    def wrapper(cfg: DictConfig):
        try:
            return main(cfg)
        except (UsageError, ValueError, FileNotFoundError, KeyError, InstantiationException) as error:
            if cfg.get("debug", False):
                raise
            while isinstance(error, InstantiationException) and error.__cause__ is not None:
                error = error.__cause__  # Hydra wraps the constructor's own error
            message = error.args[0] if error.args else repr(error)
            print(f"error: {message}", file=sys.stderr)
            sys.exit(2)

    return wrapper


def output_dir(cfg: DictConfig) -> Path:
    """The run's directory: `run_dir` if set, else the directory Hydra made for this job."""
    if cfg.get("run_dir"):
        return Path(cfg.run_dir)
    return Path(HydraConfig.get().runtime.output_dir)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file, or the newest `last.ckpt` of a run directory."""
    path = Path(path)
    if path.is_dir():
        for candidate in (path / "checkpoints" / "last.ckpt", path / "last.ckpt"):
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(
            f"ckpt_path={str(path)!r} is a directory without checkpoints/last.ckpt; "
            "pass a run directory or a .ckpt file"
        )
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={str(path)!r} does not exist; pass a run directory or a .ckpt file")
    return path


def run_config_of(checkpoint: Path) -> DictConfig:
    """The config saved by Hydra with the run that wrote `checkpoint`."""
    for parent in checkpoint.resolve().parents:
        saved = parent / ".hydra" / "config.yaml"
        if saved.is_file():
            return OmegaConf.load(saved)
    raise FileNotFoundError(f"no .hydra/config.yaml above {checkpoint}; is it inside a run directory?")


def build_datamodule(data_cfg: DictConfig):
    datamodule = instantiate(data_cfg)
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


def train(cfg: DictConfig) -> float:
    """Fit the model on the data; return the final validation loss."""
    import lightning as L

    from spannorm.lm import model_config

    model_options = OmegaConf.to_container(cfg.model, resolve=True)
    model_config({k: v for k, v in model_options.items() if k not in ("_target_", "optim")})
    L.seed_everything(cfg.seed, workers=True)
    run_dir = output_dir(cfg)
    datamodule = build_datamodule(cfg.data)
    if datamodule.vocab_size > cfg.model.vocab_size:
        raise UsageError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
            f"{datamodule.vocab_size} ids; raise model.vocab_size"
        )
    lm = instantiate(cfg.model)
    callbacks = [instantiate(c) for c in cfg.get("callbacks", {}).values() if c is not None]
    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger)
    if logger:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    trainer.fit(lm, datamodule=datamodule, ckpt_path=cfg.get("resume"))
    val_loss = float(trainer.callback_metrics.get("val/loss", float("nan")))
    baseline = datamodule.unigram_baseline()
    if trainer.is_global_zero:
        console.print(
            f"\nval/loss {val_loss:.4f} nats (ppl {torch.exp(torch.tensor(val_loss)):.1f}) | "
            f"unigram baseline {baseline:.4f} nats | "
            f"{'learned beyond unigram' if val_loss < baseline else 'NOT below the unigram baseline'}"
        )
        console.print(f"run dir:     {run_dir}")
        console.print(f"tensorboard: tensorboard --logdir {run_dir}")
        ckpt = trainer.checkpoint_callback.last_model_path if trainer.checkpoint_callback else ""
        console.print(f"checkpoint:  {ckpt or '(none)'}")
    return val_loss


def load_model(ckpt_path: str):
    """The LanguageModel of a checkpoint, rebuilt from the hyperparameters saved in it."""
    from spannorm.lm import LanguageModel

    checkpoint = resolve_checkpoint(ckpt_path)
    return checkpoint, LanguageModel.load_from_checkpoint(checkpoint, map_location="cpu")


def evaluate(cfg: DictConfig) -> float:
    """Validation loss and perplexity of a checkpoint on its run's validation data."""
    import lightning as L

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
