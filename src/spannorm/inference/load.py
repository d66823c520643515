"""One loader for every form of trained checkpoint: a `.ckpt` file, a sharded checkpoint folder
(FSDP2; consolidated into one file beside it first) or a run directory (its newest checkpoint)."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from spannorm.runs import run_config_of
from spannorm.training.checkpointing import consolidate_checkpoint, resolve_checkpoint


@dataclass
class Trained:
    """A trained model as eval.py, generate.py and export.py use it."""

    checkpoint: Path  # the checkpoint file read (a sharded folder's consolidated file)
    step: int
    lm: Any  # spannorm.training.lm.LanguageModel, in eval mode, on the CPU
    config: DictConfig  # the config saved with the run that wrote the checkpoint

    @property
    def model(self):
        """The `spannorm.model.TransformerLM` itself."""
        return self.lm.model

    @functools.cached_property
    def tokenizer(self):
        """The `spannorm.data.tokenizer.Tokenizer` of the run (read from its data caches)."""
        return instantiate(self.config.data).load_tokenizer()


def load_trained(ckpt_path: str | os.PathLike, key: str = "ckpt_path") -> Trained:
    """The model, step and run config of a checkpoint, a sharded checkpoint folder or a run
    directory; `key` names the option in error messages."""
    from spannorm.training.lm import LanguageModel

    checkpoint = resolve_checkpoint(ckpt_path, key)
    if checkpoint.is_dir():
        checkpoint = consolidate_checkpoint(checkpoint)
    step = torch.load(checkpoint, map_location="cpu", mmap=True, weights_only=False)["global_step"]
    lm = LanguageModel.load_from_checkpoint(checkpoint, map_location="cpu").eval()
    return Trained(checkpoint, int(step), lm, run_config_of(checkpoint))
