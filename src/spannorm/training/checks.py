"""Checks of a training config that fail at once, in one line, before anything is built."""

from __future__ import annotations

import torch
from omegaconf import DictConfig, OmegaConf

from spannorm.errors import UsageError
from spannorm.training.lm import TRAINING_OPTIONS, model_config
from spannorm.training.optim import OptimConfig


def check_train_config(cfg: DictConfig) -> None:
    """Fail at once, in one line, on options that would otherwise fail only once the data or the
    model is built: the model and optimizer options (TransformerConfig's and OptimConfig's
    checks), data sizes, sequence length."""
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


def check_accelerator(accelerator: str, key: str = "trainer.accelerator") -> None:
    """A GPU accelerator needs a CUDA GPU: say so, and what runs here, instead of Lightning's
    "No supported gpu backend found!" (or torch's error at the first tensor moved); `key` names
    the option."""
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        here = "trainer=cpu" if key.startswith("trainer.") else f"{key}=cpu"
        raise UsageError(
            f"{key}={accelerator!r} needs a CUDA GPU and none was found on this machine; "
            f"{here} runs here"
        )
