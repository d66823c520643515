"""One loader for every form of trained checkpoint: a `.ckpt` file, a sharded checkpoint folder
(FSDP2; consolidated into one file beside it first) or a run directory (its latest checkpoint by stored step)."""

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
    tokenizer_file: str | None = None  # for a run trained on token ids without a tokenizer

    @property
    def model(self):
        """The `spannorm.model.TransformerLM` itself."""
        return self.lm.model

    @functools.cached_property
    def tokenizer(self):
        """The `spannorm.data.tokenizer.Tokenizer` of the run (read from its data caches), or, for
        a run trained on token ids without one (`data=tokens`), the file `tokenizer_file` names.
        ValueError / FileNotFoundError (bad input) when neither gives one."""
        from spannorm.data.tokenizer import load_hf_tokenizer

        data = self.config.data
        has_own = data.get("source") != "tokens" or data.get("tokenizer") == "hf"
        if self.tokenizer_file is None:
            if not has_own:
                raise ValueError(
                    f"the run of {self.checkpoint} was trained on token ids (data=tokens) without "
                    "a tokenizer; give the one the ids were made with: "
                    "tokenizer_file=<tokenizer.json>"
                )
            return instantiate(data).load_tokenizer()
        if has_own:
            raise ValueError(
                f"tokenizer_file= is for runs trained on token ids without a tokenizer; the run "
                f"of {self.checkpoint} has its own (data.tokenizer={data.get('tokenizer')}): "
                "leave tokenizer_file out"
            )
        if not Path(self.tokenizer_file).is_file():
            raise FileNotFoundError(f"tokenizer_file={self.tokenizer_file!r} does not exist")
        try:
            tokenizer = load_hf_tokenizer(self.tokenizer_file)
        except ValueError as error:
            raise ValueError(str(error).replace("data.tokenizer_file", "tokenizer_file")) from None
        if tokenizer.vocab_size > self.model.cfg.vocab_size:
            raise ValueError(
                f"tokenizer_file={self.tokenizer_file!r} has {tokenizer.vocab_size} tokens, more "
                f"than the model's vocabulary ({self.model.cfg.vocab_size}); give the tokenizer "
                "the run's token ids were made with"
            )
        return tokenizer


def load_trained(
    ckpt_path: str | os.PathLike, key: str = "ckpt_path", tokenizer_file: str | None = None
) -> Trained:
    """The model, step and run config of a checkpoint, a sharded checkpoint folder or a run
    directory; `key` names the option in error messages; `tokenizer_file` gives the tokenizer of a
    run trained on token ids without one."""
    from spannorm.training.lm import LanguageModel

    checkpoint = resolve_checkpoint(ckpt_path, key)
    config = run_config_of(checkpoint)  # before the weights: a checkpoint outside a run fails here
    if checkpoint.is_dir():
        checkpoint = consolidate_checkpoint(checkpoint)
    step = torch.load(checkpoint, map_location="cpu", mmap=True, weights_only=False)["global_step"]
    lm = LanguageModel.load_from_checkpoint(checkpoint, map_location="cpu").eval()
    return Trained(checkpoint, int(step), lm, config, tokenizer_file)
