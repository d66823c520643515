"""Shared fixtures: a tiny learnable corpus and a helper to run the entry points as a user would."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from spannorm.runs import register_resolvers

REPO = Path(__file__).resolve().parents[1]
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


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("corpus")
    return {
        "train": write_corpus(root / "train.txt", 600, seed=0),
        "validation": write_corpus(root / "validation.txt", 60, seed=1),
        "data_dir": root / "cache",
    }


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


@pytest.fixture(scope="session")
def trained_run(tiny_corpus, tmp_path_factory) -> Path:
    """One short training run shared by the evaluation, export and logger tests: the tiny model,
    validated twice, per-block statistics every 10 steps, logged to tensorboard, csv and wandb
    (offline) at once."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    run_entry(
        "train.py",
        *tiny_overrides(
            tiny_corpus,
            "trainer.max_steps=20",
            "trainer.val_check_interval=10",
            "callbacks.layer_stats.every_n_steps=10",
            "logger=[tensorboard,csv,wandb]",
            f"hydra.run.dir={run_dir}",
        ),
    )
    return run_dir
