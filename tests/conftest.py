"""Shared fixtures: a tiny learnable corpus and one short training run (helpers.py has the rest)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import run_entry, tiny_overrides, write_corpus

# The tests' own computations run on one torch thread, like the train.py processes they start
# (run_entry sets OMP_NUM_THREADS=1): on a 2-core machine that also runs something else, torch's
# second worker thread waits at every barrier for a core it lost (docs/performance.md). Measured
# on the shared 2-core machine under load: seven test files took 330-335 s with torch's default
# two threads, 124 s with one.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("corpus")
    return {
        "train": write_corpus(root / "train.txt", 600, seed=0),
        "validation": write_corpus(root / "validation.txt", 60, seed=1),
        "data_dir": root / "cache",
    }


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
