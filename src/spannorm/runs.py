"""Runs on disk: this process's run id, the config's resolvers, a run's directory and its saved
config (with the `_target_` paths of runs saved before the package took its current layout)."""

from __future__ import annotations

import math
import os
import secrets
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

# One id per process: with `now`, it keeps two runs (or sweeps) started in the same second apart.
RUN_ID = f"{os.getpid()}-{secrets.token_hex(2)}"

# `_target_` paths of the package's flat layout, which runs saved with it name, and where those
# objects live: a run's config is read through `run_config_of`, which rewrites them, so such runs
# still resume, evaluate and export.
MOVED_TARGETS = {
    "spannorm.lm.LanguageModel": "spannorm.training.lm.LanguageModel",
    "spannorm.checkpointing.LastCheckpoint": "spannorm.training.checkpointing.LastCheckpoint",
    "spannorm.checkpointing.AtomicCheckpointIO": "spannorm.training.checkpointing.AtomicCheckpointIO",
    "spannorm.sweeps.ScoreDivergedAs": "spannorm.training.sweeps.ScoreDivergedAs",
    "spannorm.loggers.wandb_logger": "spannorm.training.loggers.wandb_logger",
}


def data_vocab(data: DictConfig, size: int | None = None) -> int:
    """The model's vocab follows the data: see spannorm.data.data_vocab_size. (Configs saved
    with an older resolver pass (tokenizer kind, vocab_size) instead of the data config.)"""
    from spannorm.data import data_vocab_size
    from spannorm.data.tokenizer import ByteTokenizer

    if isinstance(data, str):
        return ByteTokenizer.vocab_size if data == "byte" else size
    return data_vocab_size(data)


def register_resolvers() -> None:
    """The config's own interpolations, `${run_id:}`, `${tokenizer_vocab:...}` and `${product:}`:
    call before composing a config (the command line's `launch` does)."""
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


def output_dir(cfg: DictConfig) -> Path:
    """The run's directory: `run_dir` if set, else the directory Hydra made for this job."""
    if cfg.get("run_dir"):
        return Path(cfg.run_dir)
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def run_dir_of(checkpoint: Path) -> Path:
    """The directory of the run that wrote `checkpoint`: the nearest one above with `.hydra/`."""
    for parent in Path(checkpoint).resolve().parents:
        if (parent / ".hydra" / "config.yaml").is_file():
            return parent
    raise FileNotFoundError(
        f"no .hydra/config.yaml above {checkpoint}; is it inside a run directory?"
    )


def run_config_of(checkpoint: Path) -> DictConfig:
    """The config saved by Hydra with the run that wrote `checkpoint`, its `_target_` paths of
    the flat layout rewritten (MOVED_TARGETS)."""
    saved = OmegaConf.load(run_dir_of(checkpoint) / ".hydra" / "config.yaml")
    return OmegaConf.create(with_moved_targets(OmegaConf.to_container(saved, resolve=False)))


def with_moved_targets(node):
    """A plain config container (dicts, lists) with every moved `_target_` rewritten."""
    if isinstance(node, dict):
        return {
            key: MOVED_TARGETS.get(value, value) if key == "_target_" else with_moved_targets(value)
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [with_moved_targets(value) for value in node]
    return node
