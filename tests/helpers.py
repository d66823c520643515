"""What the tests share: a tiny learnable corpus, tiny configs and models, the real config
composed as train.py composes it, and running the entry points as a user would."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from spannorm.model import TransformerConfig, TransformerLM
from spannorm.runs import register_resolvers

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
register_resolvers()  # the configs' ${run_id:} and ${tokenizer_vocab:...}, for compose()


def write_corpus(path: Path, n_paragraphs: int, seed: int) -> Path:
    """Paragraphs of a small, learnable pseudo-play: speaker lines and rhymes from a fixed lexicon."""
    rng = random.Random(seed)
    speakers = ["ROMEO", "JULIET", "NURSE", "FRIAR"]
    words = "love night light moon sword rose thee thou doth art fair sweet death life".split()
    paragraphs = []
    for _ in range(n_paragraphs):
        lines = [f"{rng.choice(speakers)}:"]
        for _ in range(rng.randint(1, 3)):
            lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(3, 7))) + ".")
        paragraphs.append("\n".join(lines))
    path.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    return path


def tiny_overrides(corpus: dict[str, Path], *replacements: str) -> list[str]:
    """A model and data small enough to train in seconds on one CPU core; each `key=value` in
    `replacements` replaces that key's default (or is appended)."""
    defaults = [
        "data=text",
        f"data.train_files={corpus['train']}",
        f"data.validation_files={corpus['validation']}",
        f"data.data_dir={corpus['data_dir']}",
        "data.tokenizer=byte",
        "data.seq_len=32",
        "data.batch_size=8",
        "model.d_model=32",
        "model.n_layers=2",
        "model.n_heads=2",
        "optim.lr=1e-2",
        "optim.warmup_steps=5",
        "trainer.max_steps=60",
        "trainer.val_check_interval=30",
        "trainer.log_every_n_steps=5",
        "trainer.enable_model_summary=false",
    ]
    chosen = dict(override.split("=", 1) for override in defaults)
    chosen.update(override.split("=", 1) for override in replacements)
    return [f"{key}={value}" for key, value in chosen.items()]


def optim_options(**changes) -> dict:
    """The options of conf/optim/adamw.yaml (the config is their one source), with `changes`."""
    return {**OmegaConf.to_container(OmegaConf.load(REPO / "conf/optim/adamw.yaml")), **changes}


def run_entry(
    script: str, *args: str, cwd: Path = REPO, check: bool = True
) -> subprocess.CompletedProcess:
    """Run `python <script> args...` from the repo root, as a user would."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(REPO / script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def compose_config(overrides: Sequence[str] = (), config: str = "train", **options) -> DictConfig:
    """The config `config` composes (conf/<config>.yaml) with `overrides`, as its entry point
    would; `options` go to Hydra's `compose` (e.g. return_hydra_config=True)."""
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose(config, overrides=list(overrides), **options)


def text_datamodule(root: Path, **options):
    """A TextDataModule over `root`/train.txt and `root`/validation.txt, byte tokens in windows
    of 16, caches in `root`/data; `options` replace any setting. Nothing is built yet."""
    from spannorm.data import TextDataModule

    settings = dict(
        source="text",
        train_files=str(root / "train.txt"),
        validation_files=str(root / "validation.txt"),
        tokenizer="byte",
        seq_len=16,
        batch_size=4,
        data_dir=str(root / "data"),
    )
    return TextDataModule(**{**settings, **options})


TINY_MODEL = dict(vocab_size=50, d_model=32, n_layers=2, n_heads=4, max_seq_len=64)


def tiny_model(seed: int | None = 0, **options) -> TransformerLM:
    """A TransformerLM of TINY_MODEL's size with `options` replacing any setting, its init drawn
    after `torch.manual_seed(seed)` (None: from the current generator)."""
    if seed is not None:
        torch.manual_seed(seed)
    return TransformerLM(TransformerConfig(**{**TINY_MODEL, **options}))


def tiny_lm(vocab_size: int, **options):
    """The LightningModule (train.py's) of a one-block model over `vocab_size` tokens, windows of
    8 tokens, the optimizer options of conf/optim/adamw.yaml."""
    from spannorm.training.lm import LanguageModel

    settings = dict(vocab_size=vocab_size, d_model=16, n_layers=1, n_heads=2, max_seq_len=8)
    return LanguageModel(optim=optim_options(), **{**settings, **options})


def tiny_trainer(tmp_path: Path, callbacks: list, **options):
    """A CPU Lightning Trainer in `tmp_path` without a logger, checkpoints, model summary or
    progress bar (unless `options` say otherwise)."""
    from spannorm.bench.bare import quiet_trainer

    return quiet_trainer(**{"default_root_dir": tmp_path, "callbacks": callbacks, **options})
