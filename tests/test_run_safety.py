"""Run directories that hold a run are never overwritten by accident, `resume=auto` takes the
run's latest stored step, checked input to every command is one line with exit status 2, and a
log without a terminal gets plain progress lines (issue 30, docs/reliability.md)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from spannorm.analysis.local_tasks import write_local_tasks
from spannorm.analysis.scalars import read_scalars
from spannorm.callbacks.progress import TextProgress
from spannorm.cli import friendly_errors
from spannorm.cli.evaluate import evaluate
from spannorm.cli.export import run_export
from spannorm.cli.generate import sample
from spannorm.cli.launcher import StartCheck, null_group_as_deletion
from spannorm.data.tokenizer import BPETokenizer
from spannorm.runs import RUN_MARKER, check_run_dir_free
from spannorm.training.checkpointing import newest_checkpoint

from helpers import REPO, compose_config, run_entry, tiny_overrides

# a run validated (and checkpointed: every best is kept) at steps 5 and 10, every step logged
FIRST_RUN = (
    "trainer.max_steps=10",
    "trainer.val_check_interval=5",
    "trainer.log_every_n_steps=1",
    "callbacks.checkpoint.save_top_k=-1",
    "callbacks.progress.text_every_n_steps=5",
    "callbacks.progress.text_every_n_seconds=null",  # lines by step only: the same on any machine
)


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` and the sha256 of its bytes."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def copy_file_by_file(source: Path, target: Path, last: str) -> None:
    """Copy a run directory one file at a time with fresh modification times (as `cp -r` without
    `-p`, or a sync tool, does), the file named `last` written last, so it is the newest file."""
    files = sorted(p for p in source.rglob("*") if p.is_file())
    files.sort(key=lambda p: p.name == last)
    for path in files:
        destination = target / path.relative_to(source)
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, destination)
    newest = max(p.stat().st_mtime_ns for p in target.rglob("*") if p.is_file())
    stamp = newest + 10**9
    os.utime(next(target.rglob(last)), ns=(stamp, stamp))  # newest by a clear margin


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def one_line_error(main, config: str, overrides: list[str], capsys) -> str:
    """Run an entry point's `main` on the composed `config` as the command line does; return its
    one `error:` line (exit status 2)."""
    cfg = compose_config(overrides, config=config)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        friendly_errors(main)(cfg)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exit_info.value.code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.fixture(scope="module")
def first_run(tiny_corpus, tmp_path_factory) -> dict:
    run_dir = tmp_path_factory.mktemp("safety") / "run"
    overrides = tiny_overrides(tiny_corpus, *FIRST_RUN)
    result = run_entry("train.py", *overrides, f"hydra.run.dir={run_dir}")
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt"))
    assert checkpoints == ["last.ckpt", "step000005.ckpt", "step000010.ckpt"], checkpoints
    return {"dir": run_dir, "overrides": overrides, "stdout": result.stdout}


# ---- 1. a run directory that holds a run


@pytest.mark.slow
def test_a_second_start_in_a_run_dir_is_refused_and_changes_nothing(first_run):
    run_dir = first_run["dir"]
    before = snapshot(run_dir)
    result = run_entry(
        "train.py",
        *first_run["overrides"],
        "model.n_layers=3",
        f"hydra.run.dir={run_dir}",
        check=False,
    )
    assert result.returncode == 2, result.stderr
    (line,) = error_lines(result)
    assert f"hydra.run.dir='{run_dir}' already holds a run" in line
    assert "resume=auto" in line and "overwrite=true" in line and "new directory" in line
    assert snapshot(run_dir) == before  # not even .hydra/ or the log was written


@pytest.mark.slow
def test_overwrite_true_replaces_the_run_so_nothing_mixes(first_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(first_run["dir"], run_dir)
    result = run_entry(
        "train.py",
        *first_run["overrides"],
        "trainer.max_steps=3",
        "overwrite=true",
        f"hydra.run.dir={run_dir}",
    )
    assert "overwrite" not in result.stderr
    assert len(list((run_dir / "tb").rglob("events.out.tfevents.*"))) == 1
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "last.ckpt",
        "step000003.ckpt",
    ]
    assert max(step for step, _ in read_scalars(run_dir)["train/loss"]) == 2
    assert OmegaConf.load(run_dir / ".hydra/config.yaml").trainer.max_steps == 3
    assert (run_dir / RUN_MARKER / "config.yaml").read_text() == (
        run_dir / ".hydra/config.yaml"
    ).read_text()


@pytest.mark.slow
def test_a_multirun_job_into_a_held_run_is_refused_and_its_config_put_back(first_run, tmp_path):
    sweep = tmp_path / "sweep"
    shutil.copytree(first_run["dir"], sweep / "0")
    before = snapshot(sweep / "0")
    result = run_entry(
        "train.py",
        "-m",
        *first_run["overrides"],
        "seed=7",
        f"hydra.sweep.dir={sweep}",
        check=False,
    )
    assert result.returncode == 2, result.stderr
    (line,) = error_lines(result)
    assert "already holds a run" in line and "resume=auto" in line
    after = snapshot(sweep / "0")
    assert {k: v for k, v in after.items() if k != "train.log"} == {
        k: v for k, v in before.items() if k != "train.log"
    }


@pytest.fixture
def held_run(tmp_path) -> Path:
    """A directory holding a run, as far as a start can tell: a checkpoint."""
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "last.ckpt").write_bytes(b"weights")
    return tmp_path / "run"


@pytest.mark.slow
def test_ddp_ranks_started_in_the_checked_directory_train_and_resume(tiny_corpus, tmp_path):
    # Lightning starts rank 1 by running the command line again with hydra.run.dir=<this dir>,
    # which by then holds rank 0's run: it must train there, not be refused
    run_dir = tmp_path / "ddp"
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]
    for steps in (4, 6):
        overrides = tiny_overrides(
            tiny_corpus, *ddp, f"trainer.max_steps={steps}", "trainer.log_every_n_steps=1"
        )
        result = run_entry("train.py", *overrides, f"hydra.run.dir={run_dir}", "resume=auto")
        assert "MEMBER: 2/2" in result.stdout + result.stderr
    assert [step for step, _ in read_scalars(run_dir)["train/loss"]] == list(range(6))


def test_ranks_a_launcher_starts_are_not_refused(held_run, monkeypatch, capsys):
    # Lightning's DDP children re-run the command line with hydra.run.dir=<the same directory>
    config = OmegaConf.create({"hydra": {"run": {"dir": str(held_run)}}, "resume": None})
    for name in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit) as exit_info:
        StartCheck(refuse_held_runs=True).on_run_start(config)
    assert exit_info.value.code == 2 and "already holds a run" in capsys.readouterr().err
    monkeypatch.setenv("LOCAL_RANK", "1")
    StartCheck(refuse_held_runs=True).on_run_start(config)  # no exit


def test_what_continues_or_replaces_a_held_run_is_allowed(held_run):
    run_dir = held_run
    check_run_dir_free(run_dir, "auto", False)
    check_run_dir_free(run_dir, str(run_dir / "checkpoints" / "last.ckpt"), False)
    check_run_dir_free(run_dir, None, True)
    with pytest.raises(Exception, match="overwrite=true clears"):
        check_run_dir_free(run_dir, "auto", True)
    check_run_dir_free(run_dir.parent / "elsewhere", None, False)  # a new directory


@pytest.mark.slow
def test_a_file_as_run_dir_is_one_line(tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine\n")
    for script, args in (("train.py", []), ("eval.py", ["ckpt_path=x"])):
        result = run_entry(script, *args, f"hydra.run.dir={a_file}", check=False)
        assert result.returncode == 2, result.stderr
        (line,) = error_lines(result)
        assert f"hydra.run.dir='{a_file}' is a file" in line
    assert a_file.read_text() == "mine\n"


# ---- 2. resume=auto: the latest stored step, never file times


@pytest.mark.slow
def test_resume_auto_takes_the_latest_stored_step_whatever_the_file_times(first_run, tmp_path):
    run_dir = tmp_path / "copied"
    copy_file_by_file(first_run["dir"], run_dir, last="step000005.ckpt")
    checkpoints = run_dir / "checkpoints"
    newest_file = max(checkpoints.glob("*.ckpt"), key=lambda p: p.stat().st_mtime_ns)
    assert newest_file.name == "step000005.ckpt"  # the file times lie
    assert newest_checkpoint(run_dir) == checkpoints / "last.ckpt"
    result = run_entry(
        "train.py",
        *first_run["overrides"],
        "trainer.max_steps=15",
        f"hydra.run.dir={run_dir}",
        "resume=auto",
    )
    assert f"Restoring states from the checkpoint path at {checkpoints / 'last.ckpt'}" in (
        result.stdout + result.stderr
    )
    steps = [step for step, _ in read_scalars(run_dir)["train/loss"]]
    # every step once (from step000005.ckpt, steps 5 to 9 would be logged twice), none skipped
    assert steps == list(range(15)), steps


def test_on_a_tie_last_ckpt_wins_and_a_plain_file_without_step_sorts_first(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    torch.save({"global_step": 20}, checkpoints / "step000020.ckpt")
    torch.save({"global_step": 20}, checkpoints / "last.ckpt")
    torch.save({"weights": torch.zeros(2)}, checkpoints / "zzz.ckpt")
    os.utime(checkpoints / "last.ckpt", ns=(0, 0))
    assert newest_checkpoint(tmp_path) == checkpoints / "last.ckpt"
    torch.save({"global_step": 30}, checkpoints / "step000030.ckpt")
    os.utime(checkpoints / "step000030.ckpt", ns=(0, 0))
    assert newest_checkpoint(tmp_path) == checkpoints / "step000030.ckpt"


def test_an_unreadable_candidate_is_named_not_skipped(tmp_path):
    torch.save({"global_step": 5}, tmp_path / "a.ckpt")
    (tmp_path / "b.ckpt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match="b.ckpt' is not readable"):
        newest_checkpoint(tmp_path)


# ---- 4, 5. eval.py, generate.py, export.py: checked input is one line, exit status 2


@pytest.mark.slow
@pytest.mark.parametrize(
    ("main", "config", "overrides", "expected"),
    [
        (sample, "generate", ["max_new_tokens=-1"], "max_new_tokens=-1 must be a positive"),
        (sample, "generate", ["temperature=-1"], "temperature=-1 must be a number >= 0"),
        (sample, "generate", ["top_k=0"], "top_k=0 must be a positive integer"),
        (sample, "generate", ["num_samples=0"], "num_samples=0 must be a positive integer"),
        (sample, "generate", ["max_new_tokens=5000"], "exceeds model.max_seq_len=1024"),
        (evaluate, "eval", ["limit=0", "tasks=[x]"], "limit=0 must be a positive number"),
        (evaluate, "eval", ["limit=-3", "tasks=[x]"], "limit=-3 must be a positive number"),
        (evaluate, "eval", ["batch_size=0"], "batch_size=0 must be a positive integer"),
        (evaluate, "eval", ["tasks=[x]", "include_path=/no/such/folder"], "include_path="),
        (evaluate, "eval", ["tasks=[no_such_task_anywhere]"], "are not lm-eval tasks"),
        (run_export, "export", ["out=OUT_UNDER_FILE"], "which is a file"),
    ],
)
def test_checked_input_of_eval_generate_export_is_one_line(
    main, config, overrides, expected, first_run, tmp_path, capsys
):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    overrides = [o.replace("OUT_UNDER_FILE", str(a_file / "export")) for o in overrides]
    line = one_line_error(main, config, [f"ckpt_path={first_run['dir']}", *overrides], capsys)
    assert expected in line, line


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")
def test_eval_on_gpu_without_one_is_one_line(capsys):
    line = one_line_error(evaluate, "eval", ["ckpt_path=x", "accelerator=gpu"], capsys)
    assert "accelerator='gpu' needs a CUDA GPU" in line and "accelerator=cpu" in line


@pytest.mark.slow
def test_a_checkpoint_outside_a_run_is_one_line(first_run, tmp_path, capsys):
    shutil.copyfile(first_run["dir"] / "checkpoints" / "last.ckpt", tmp_path / "last.ckpt")
    for main, config, extra in [
        (sample, "generate", []),
        (evaluate, "eval", []),
        (run_export, "export", [f"out={tmp_path / 'out'}"]),
    ]:
        line = one_line_error(main, config, [f"ckpt_path={tmp_path}", *extra], capsys)
        assert "no .hydra/config.yaml above" in line


@pytest.mark.slow
def test_task_options_without_tasks_are_refused(first_run):
    result = run_entry("eval.py", f"ckpt_path={first_run['dir']}", "limit=5", check=False)
    assert result.returncode == 2, result.stderr
    (line,) = error_lines(result)
    assert "limit applies only to downstream tasks (tasks=[...])" in line


# ---- 6. tracebacks at start


@pytest.mark.slow
@pytest.mark.parametrize("n_trials", ["0", "-1"])
def test_an_empty_optuna_study_is_one_line(n_trials, tmp_path):
    result = run_entry(
        "train.py",
        "hparams_search=lr_warmup",
        f"hydra.sweeper.n_trials={n_trials}",
        f"hydra.sweep.dir={tmp_path}",
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert error_lines(result) == [
        f"error: hydra.sweeper.n_trials={n_trials} must be a positive integer "
        "(the number of runs the study makes)"
    ]


def test_a_group_set_to_null_is_deleted_as_hydra_spells_it(monkeypatch):
    monkeypatch.setattr(sys, "argv", [str(REPO / "train.py")])
    assert null_group_as_deletion("logger=null") == "~logger"
    assert null_group_as_deletion("callbacks=null") == "~callbacks"
    assert null_group_as_deletion("resume=null") == "resume=null"  # a plain key, not a group
    assert null_group_as_deletion("logger.tensorboard=null") == "logger.tensorboard=null"


@pytest.mark.slow
def test_logger_null_trains_without_loggers(tiny_corpus, tmp_path):
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(tiny_corpus, "trainer.max_steps=2", "logger=null")
    run_entry("train.py", *overrides, f"hydra.run.dir={run_dir}")
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and not (run_dir / "tb").exists()


@pytest.mark.slow
def test_a_wrong_name_in_a_logger_list_lists_the_choices(tmp_path):
    result = run_entry(
        "train.py", "logger=[tensorboard,nosuchlogger]", f"hydra.run.dir={tmp_path}", check=False
    )
    assert result.returncode == 2
    assert error_lines(result) == [
        "error: logger='nosuchlogger' is not a logger config; choose one of: csv, tensorboard, wandb"
    ]


# ---- 7. a run trained on token ids, used with a tokenizer file


@pytest.fixture(scope="module")
def tokens_run(tiny_corpus, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tokens")
    tokenizer = BPETokenizer.train([tiny_corpus["train"].read_text()], vocab_size=300)
    tokenizer.save(root / "tokenizer.json")
    for split in ("train", "validation"):
        ids = tokenizer.encode(tiny_corpus[split].read_text())
        np.asarray(ids, dtype=np.uint16).tofile(root / f"{split}.bin")
    run_dir = root / "run"
    overrides = [
        o
        for o in tiny_overrides(tiny_corpus, "trainer.max_steps=5", "trainer.val_check_interval=5")
        if not o.startswith(("data.", "data="))
    ]
    run_entry(
        "train.py",
        "data=tokens",
        f"data.train_files={root / 'train.bin'}",
        f"data.validation_files={root / 'validation.bin'}",
        f"data.vocab_size={tokenizer.vocab_size}",
        f"data.data_dir={root / 'cache'}",
        "data.seq_len=32",
        "data.batch_size=8",
        *overrides,
        f"hydra.run.dir={run_dir}",
    )
    return {"dir": run_dir, "tokenizer": root / "tokenizer.json"}


@pytest.mark.slow
def test_a_tokens_run_generates_and_exports_with_a_tokenizer_file(tokens_run, tmp_path, capsys):
    run, tokenizer = tokens_run["dir"], tokens_run["tokenizer"]
    line = one_line_error(sample, "generate", [f"ckpt_path={run}"], capsys)
    assert "trained on token ids (data=tokens) without a tokenizer" in line
    assert "tokenizer_file=<tokenizer.json>" in line
    result = run_entry(
        "generate.py",
        f"ckpt_path={run}",
        f"tokenizer_file={tokenizer}",
        "max_new_tokens=5",
        "prompt=ROMEO:",
        f"hydra.run.dir={tmp_path / 'gen'}",
    )
    assert "ROMEO:" in result.stdout
    out = tmp_path / "exported"
    run_entry(
        "export.py",
        f"ckpt_path={run}",
        f"tokenizer_file={tokenizer}",
        f"out={out}",
        f"hydra.run.dir={tmp_path / 'exp'}",
    )
    assert (out / "tokenizer.json").is_file()


# ---- 8. clear messages


@pytest.mark.slow
def test_a_damaged_saved_config_is_named_with_its_copy(first_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(first_run["dir"], run_dir)
    (run_dir / ".hydra" / "config.yaml").write_text("model: {norm: prenorm\n  bad: [\n")
    line = one_line_error(sample, "generate", [f"ckpt_path={run_dir}"], capsys)
    assert f"{run_dir / '.hydra' / 'config.yaml'} is damaged: not YAML" in line
    assert f"copy {run_dir / RUN_MARKER / 'config.yaml'} over it" in line


@pytest.mark.slow
def test_resuming_with_another_model_shape_names_the_settings(first_run, tmp_path):
    result = run_entry(
        "train.py",
        *first_run["overrides"],
        "model.n_layers=3",
        "model.d_model=64",
        f"resume={first_run['dir']}",
        f"hydra.run.dir={tmp_path / 'run'}",
        check=False,
    )
    assert result.returncode == 2, result.stderr
    (line,) = error_lines(result)
    assert "holds another model shape than this run's" in line
    assert "model.d_model=32 there, 64 here; model.n_layers=2 there, 3 here" in line
    assert not (tmp_path / "run" / RUN_MARKER).exists()  # the directory holds no run


# ---- 9. local task files


def test_local_tasks_do_not_overwrite_files_of_the_same_name(tmp_path):
    text = "\n\n".join(f"A{i}:\nline one {i}.\nline two {i}.\nline three {i}." for i in range(9))
    mine = tmp_path / "play_ppl.yaml"
    mine.write_text("my own task\n")
    with pytest.raises(FileExistsError, match="play_ppl.yaml exists already"):
        write_local_tasks(text, tmp_path, "play", n=4)
    assert mine.read_text() == "my own task\n" and not (tmp_path / "play_next_line.yaml").exists()
    script = [sys.executable, str(REPO / "scripts/make_local_tasks.py")]
    source = tmp_path / "held_out.txt"
    source.write_text(text)
    result = subprocess.run(
        [*script, str(source), str(tmp_path), "--name", "play"], capture_output=True, text=True
    )
    assert result.returncode == 2 and result.stderr.startswith("error: "), result.stderr
    assert mine.read_text() == "my own task\n"
    result = subprocess.run(
        [*script, str(source), str(tmp_path), "--name", "play", "--overwrite", "-n", "4"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert mine.read_text() != "my own task\n"


# ---- logs without a terminal


def test_text_progress_prints_first_last_and_every_interval():
    now = [0.0]
    lines: list[str] = []
    text = TextProgress(every_n_seconds=10, clock=lambda: now[0], write=lines.append)
    text.start(0)
    for step in range(1, 31):
        now[0] += 1.0  # one second a step
        text.add_tokens(100)
        text.step_done(step, 30, loss=5.0 - step / 10)
    assert [line.split(" | ")[0] for line in lines] == [
        "step 1/30 (3%)",
        "step 11/30 (36%)",
        "step 21/30 (70%)",
        "step 30/30 (100%)",
    ]
    assert lines[1] == (
        "step 11/30 (36%) | train/loss 3.9000 | 100 tokens/s | 0:11 elapsed | 0:19 left"
    )
    with pytest.raises(ValueError, match="text_every_n_steps=0"):
        TextProgress(every_n_steps=0)


@pytest.mark.slow
def test_a_run_without_a_terminal_prints_plain_progress_lines(first_run):
    lines = [line for line in first_run["stdout"].splitlines() if line.startswith("step ")]
    assert [line.split(" | ")[0] for line in lines] == [
        "step 1/10 (10%)",
        "step 5/10 (50%)",
        "step 10/10 (100%)",
    ], first_run["stdout"]
    assert "train/loss" in lines[-1] and "tokens/s" in lines[-1]
    assert "validation at step 5: val/loss" in first_run["stdout"]
