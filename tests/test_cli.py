"""The entry points as a user runs them: compose, train, evaluate, generate, multirun, bad input."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from torch.utils.data import DataLoader

from spannorm.analysis.scalars import read_scalars
from spannorm.callbacks.progress import StepProgressBar
from spannorm.data import PackedBlocks
from spannorm.errors import UsageError
from spannorm.training.checks import check_accelerator

from helpers import (
    CONF,
    compose_config,
    run_entry,
    tiny_lm,
    tiny_overrides,
    tiny_trainer,
)


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_every_config_group_composes_and_instantiates(tiny_corpus, tmp_path):
    files = [
        f"data.train_files={tiny_corpus['train']}",
        f"data.validation_files={tiny_corpus['validation']}",
    ]
    base = [f"run_dir={tmp_path}"]
    for data in group_options("data"):
        extra = files if data in ("text", "json", "parquet", "tokens") else []
        extra += ["data.hub_name=some/dataset"] if data == "hub" else []
        cfg = compose_config([*base, f"data={data}", *extra])
        assert instantiate(cfg.data).__class__.__name__ == "TextDataModule"
    cfg = compose_config(base)
    assert type(instantiate(cfg.model)).__name__ == "LanguageModel"
    assert instantiate(cfg.logger.tensorboard).log_dir
    loggers = group_options("logger")
    cfg = compose_config([*base, f"logger=[{','.join(loggers)}]"])
    assert sorted(cfg.logger) == loggers
    assert all(instantiate(conf).save_dir == str(tmp_path) for conf in cfg.logger.values())
    assert all(instantiate(c) for c in cfg.callbacks.values() if c is not None)
    for experiment in group_options("experiment"):
        assert compose_config([*base, f"experiment={experiment}"]).model.n_layers > 0


@pytest.mark.parametrize("trainer", group_options("trainer"))
def test_every_trainer_config_instantiates_on_cpu(trainer, tmp_path):
    """Each trainer config builds a Trainer here; those asking for a GPU on a machine without one
    fail first with a one-line UsageError saying so."""
    cfg = compose_config([f"run_dir={tmp_path}", f"trainer={trainer}"])
    if cfg.trainer.accelerator != "cpu" and not torch.cuda.is_available():
        with pytest.raises(UsageError, match="needs a CUDA GPU and none was found.*trainer=cpu"):
            check_accelerator(cfg.trainer.accelerator)
        cfg = compose_config(
            [f"run_dir={tmp_path}", f"trainer={trainer}", "trainer.accelerator=cpu"]
        )
        cfg.trainer.precision = "32-true"  # bf16-mixed is a GPU setting
    check_accelerator(cfg.trainer.accelerator)
    built = instantiate(cfg.trainer, logger=False, enable_progress_bar=False)
    assert built.max_steps == cfg.trainer.max_steps and built.num_devices == cfg.trainer.devices
    assert type(built.strategy).__name__ == {
        "ddp": "DDPStrategy",
        "fsdp": "ModelParallelStrategy",
    }.get(trainer, "SingleDeviceStrategy")


@pytest.fixture(scope="module")
def short_run(tiny_corpus, tmp_path_factory) -> tuple[Path, str]:
    """A run shorter than its validation interval: it still ends with a validation."""
    run_dir = tmp_path_factory.mktemp("run")
    overrides = tiny_overrides(
        tiny_corpus, "trainer.max_steps=40", "trainer.val_check_interval=100"
    )
    result = run_entry("train.py", *overrides, f"hydra.run.dir={run_dir}")
    return run_dir, result.stdout


@pytest.mark.slow
def test_train_logs_scalars_learns_and_reports(short_run):
    run_dir, stdout = short_run
    scalars = read_scalars(run_dir)
    for tag in ("train/loss", "val/loss", "val/ppl", "train/lr", "train/grad_norm"):
        assert scalars.get(tag), f"{tag} missing from the event file: {sorted(scalars)}"
    assert [step for step, _ in scalars["val/loss"]] == [scalars["train/loss"][-1][0]]  # the last
    losses = [v for _, v in scalars["train/loss"]]
    assert losses[-1] < losses[0] - 0.5, losses
    assert "unigram baseline" in stdout and "learned beyond unigram" in stdout
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert str(run_dir) in stdout


@pytest.mark.slow
def test_eval_rebuilds_the_run_and_matches_logged_val_loss(short_run, tmp_path):
    run_dir, _ = short_run
    logged = read_scalars(run_dir)["val/loss"][-1][1]
    # conf/'s defaults differ from the run's (n_layers=4 vs 2): eval must use the saved config
    result = run_entry(
        "eval.py", f"ckpt_path={run_dir}", "progress=false", f"hydra.run.dir={tmp_path}"
    )
    reported = float(re.search(r"val/loss (\d+\.\d+)", result.stdout).group(1))
    assert reported == pytest.approx(logged, abs=1e-3)


@pytest.mark.slow
def test_generate_samples_text_with_and_without_cache(short_run, tmp_path):
    run_dir, _ = short_run
    result = run_entry(  # one process, a job for each setting
        "generate.py",
        "-m",
        f"ckpt_path={run_dir}",
        "prompt=ROMEO:",
        "max_new_tokens=30",
        "temperature=0",
        "kv_cache=true,false",
        f"hydra.sweep.dir={tmp_path}",
    )
    texts = re.split(r"\[[^]\n]*\]\[HYDRA\] \t#\d+ : [^\n]*\n", result.stdout)[1:]
    assert len(texts) == 2 and "ROMEO:" in texts[0]
    assert texts[0] == texts[1]  # greedy decoding: the cache must not change the result


@pytest.mark.slow
@pytest.mark.parametrize("launcher", [[], ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]])
def test_multirun_writes_separate_run_dirs(tiny_corpus, tmp_path, launcher):
    """Jobs one after another (Hydra's basic launcher) or in parallel processes (joblib)."""
    overrides = tiny_overrides(tiny_corpus, "trainer.max_steps=4", "trainer.val_check_interval=4")
    run_entry(
        "train.py",
        "-m",
        *overrides,
        *launcher,
        "model.n_layers=1,2",
        f"hydra.sweep.dir={tmp_path}",
    )
    job_dirs = sorted(p for p in tmp_path.iterdir() if p.is_dir() and p.name[0].isdigit())
    assert [p.name for p in job_dirs] == ["0", "1"]
    for job in job_dirs:
        assert (job / "checkpoints" / "last.ckpt").is_file()
        assert read_scalars(job)["val/loss"]


@pytest.mark.slow
def test_a_diverged_job_does_not_end_its_sweep(tiny_corpus, tmp_path):
    """lr 1e30 without clipping turns the loss NaN at the second step: that job reports it, the
    next job still runs, and the sweep exits 0."""
    overrides = tiny_overrides(
        tiny_corpus,
        "trainer.max_steps=4",
        "trainer.val_check_interval=4",
        "optim.warmup_steps=0",
        "trainer.gradient_clip_val=null",
    )
    result = run_entry(
        "train.py", "-m", *overrides, "optim.lr=1e30,1e-2", f"hydra.sweep.dir={tmp_path}"
    )
    assert "error: training diverged: loss is nan at step 1" in result.stderr
    assert read_scalars(tmp_path / "0")["train/diverged"] == [(1, 1.0)]
    assert read_scalars(tmp_path / "1")["val/loss"]


@pytest.mark.slow
def test_unknown_norm_is_one_line_error(tiny_corpus, tmp_path):
    result = run_entry(
        "train.py",
        *tiny_overrides(tiny_corpus),
        "model.norm=nonorm",
        f"hydra.run.dir={tmp_path}",
        check=False,
    )
    assert result.returncode == 2
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "spannorm" in lines[0] and "prenorm" in lines[0], result.stderr


class CountValidations(L.Callback):
    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.steps.append(trainer.global_step)


def train_tiny(tmp_path, callbacks: list, **trainer_options):
    """Train a one-block model on 8 batches of 8 tokens (an epoch) with these callbacks and
    Trainer options, no logger or checkpoints; returns the trainer."""
    tokens = torch.arange(8 * 8 * 8 + 1) % 50
    blocks = PackedBlocks(tokens.numpy().astype("uint16"), seq_len=8)  # 64 blocks: 8 batches
    trainer = tiny_trainer(tmp_path, callbacks, enable_progress_bar=True, **trainer_options)
    loader = DataLoader(blocks, batch_size=8)
    trainer.fit(tiny_lm(vocab_size=50), train_dataloaders=loader, val_dataloaders=loader)
    return trainer


@pytest.mark.parametrize(("max_steps", "validated_at"), [(12, [5, 10, 12]), (10, [5, 10])])
def test_runs_end_with_one_validation_at_their_last_step_and_the_bar_counts_steps(
    max_steps, validated_at, tmp_path
):
    """Validation every 5 steps; the last step validates too, once even where it is a multiple
    of 5. The progress bar counts steps over the whole run (8 batches an epoch), not per epoch."""
    counter, bar = CountValidations(), StepProgressBar()
    trainer = train_tiny(
        tmp_path,
        [counter, bar],
        max_steps=max_steps,
        val_check_interval=5,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        limit_val_batches=1,
    )
    assert counter.steps == validated_at
    assert trainer.callback_metrics["val/loss"] > 0
    task = bar.train_progress_bar
    assert (task.completed, task.total) == (max_steps, max_steps)
    assert "Epoch" not in task.description and "-2" not in task.description


class ThreadsDuringTraining(L.Callback):
    def __init__(self) -> None:
        self.threads: set[str] = set()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.threads |= {type(thread).__name__ for thread in threading.enumerate()}


def test_on_cpu_the_bar_draws_between_steps_in_the_training_thread(tmp_path, monkeypatch):
    """No drawing thread competes with the step's OpenMP workers for the cores (a thread that
    takes a core stalls every worker at the next barrier: docs/performance.md)."""
    from rich.live import Live

    draws = []
    live_refresh = Live.refresh

    def counted_refresh(live) -> None:
        draws.append(threading.current_thread() is threading.main_thread())
        live_refresh(live)

    monkeypatch.setattr(Live, "refresh", counted_refresh)
    threads, bar = ThreadsDuringTraining(), StepProgressBar(refresh_rate=1000)
    train_tiny(tmp_path, [threads, bar], max_steps=6, limit_val_batches=0)
    assert "_RefreshThread" not in threads.threads  # Lightning's (and rich's) drawing thread
    assert len(draws) >= 6 and all(draws)  # every step drawn (1000/s allows it), here
    task = bar.train_progress_bar
    assert (task.completed, task.total) == (6, 6)
