"""Fail fast on bad input, stop cleanly on signals, resume exactly, survive damaged files."""

from __future__ import annotations

import logging
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from spannorm.analysis.scalars import read_scalars
from spannorm.cli import friendly_errors
from spannorm.cli.evaluate import evaluate
from spannorm.cli.train import train
from spannorm.data import PackedBlocks
from spannorm.data.sampling import EpochShuffle, ResumableLoader
from spannorm.training.checkpointing import (
    AtomicCheckpointIO,
    LastCheckpoint,
    replace_path,
    resolve_checkpoint,
    verify_checkpoint,
)

from helpers import (
    REPO,
    compose_config,
    run_entry,
    tiny_lm,
    tiny_overrides,
    tiny_trainer,
)

# ---- validation: one line, exit status 2, before any data or model is built


def fail_fast(overrides: list[str], capsys, config: str = "train", main=train) -> str:
    """Run `main` on the composed `config` as the CLI does; return its one `error:` line."""
    cfg = compose_config(overrides, config)
    with pytest.raises(SystemExit) as exit_info:
        friendly_errors(main)(cfg)
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        (["model.norm=nonorm"], ["model.norm='nonorm'", "spannorm"]),
        (["model.norm_type=batchnorm"], ["model.norm_type='batchnorm'", "rmsnorm"]),
        (["data.tokenizer=words"], ["data.tokenizer='words'", "bpe, byte"]),
        (["model.d_model=30", "model.n_heads=4"], ["model.d_model=30", "model.n_heads=4"]),
        (["model.ffn=moe", "model.top_k=9"], ["model.top_k=9", "model.n_experts=8"]),
        (["model.n_layers=0"], ["model.n_layers=0", "positive"]),
        (["data.batch_size=0"], ["data.batch_size=0", "positive"]),
        (["model.max_seq_len=16"], ["data.seq_len=32", "model.max_seq_len=16"]),
        (["checkpoint_every_n_steps=0"], ["checkpoint_every_n_steps=0"]),
        (["data.global_batch_size=20"], ["data.global_batch_size=20", "multiple of 8"]),
        (
            ["trainer=ddp", "trainer.accelerator=cpu", "data.global_batch_size=24"],
            ["data.global_batch_size=24", "2 process(es) = 16"],
        ),
        (
            ["data.global_batch_size=16", "+trainer.accumulate_grad_batches=4"],
            ["drop trainer.accumulate_grad_batches=4"],
        ),
        (["data.train_files=/nonexistent/train.txt"], ["data.train_files", "does not exist"]),
        (["data.validation_files={empty}"], ["data.validation_files", "is empty"]),
        (["resume=/nonexistent/run"], ["resume='/nonexistent/run'", "does not exist"]),
        (["resume={empty}"], ["resume=", "not a readable checkpoint"]),
        pytest.param(
            ["trainer=gpu"],
            ["trainer.accelerator='gpu' needs a CUDA GPU and none was found", "trainer=cpu"],
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is here"),
        ),
    ],
)
def test_bad_options_fail_fast_in_one_line(bad, expected, tiny_corpus, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.touch()
    data_dir = tmp_path / "data"
    overrides = tiny_overrides(tiny_corpus, f"data.data_dir={data_dir}")
    bad = [o.format(empty=empty) for o in bad]
    line = fail_fast([*overrides, f"run_dir={tmp_path}", *bad], capsys)
    assert all(fragment in line for fragment in expected), line
    assert not data_dir.exists()  # failed before building any data


@pytest.mark.slow
@pytest.mark.parametrize("group", ["data", "trainer"])
def test_unknown_config_group_option_is_one_line(group, tmp_path):
    result = run_entry("train.py", f"{group}=nope", f"hydra.run.dir={tmp_path}", check=False)
    assert result.returncode == 2
    options = ", ".join(sorted(p.stem for p in (REPO / "conf" / group).glob("*.yaml")))
    expected = f"error: {group}='nope' is not a {group} config; choose one of: {options}"
    assert result.stderr.strip() == expected


def test_missing_mandatory_option_is_one_line(capsys):
    line = fail_fast([], capsys, config="eval", main=evaluate)
    assert line == "error: Missing mandatory value: ckpt_path"


def buggy_main(cfg):
    return {}["key"]  # a KeyError outside any input check: a bug, not bad input


def test_an_unexpected_error_is_one_line_plus_the_file_with_its_traceback(tmp_path, capsys):
    log = tmp_path / "train.log"  # what Hydra's file handler writes in a run dir
    handler = logging.FileHandler(log)
    logging.getLogger().addHandler(handler)
    try:
        with pytest.raises(SystemExit) as exit_info:
            friendly_errors(buggy_main)(OmegaConf.create({"debug": False}))
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.splitlines() == [
        "error: KeyError: 'key'",
        f"unexpected error (not a checked input): full traceback in {log}; "
        "debug=true shows it here",
    ]
    assert "Traceback" in log.read_text() and "in buggy_main" in log.read_text()
    with pytest.raises(KeyError):  # debug=true: the traceback on screen
        friendly_errors(buggy_main)(OmegaConf.create({"debug": True}))


def test_without_a_log_file_the_traceback_goes_to_a_temporary_file(capsys):
    with pytest.raises(SystemExit):
        friendly_errors(buggy_main)(OmegaConf.create({"debug": False}))
    written = Path(re.search(r"full traceback in (.+); ", capsys.readouterr().err).group(1))
    assert "in buggy_main" in written.read_text()
    written.unlink()


@pytest.mark.slow
def test_a_bug_inside_training_is_not_reported_as_bad_input(tiny_corpus, tmp_path):
    path = os.pathsep.join(filter(None, [str(REPO / "tests"), os.environ.get("PYTHONPATH")]))
    os.environ["PYTHONPATH"], saved = path, os.environ.get("PYTHONPATH")
    try:
        result = run_entry(
            "train.py",
            *tiny_overrides(tiny_corpus),
            "+callbacks.crash._target_=crash.FailAtTrainStart",
            f"hydra.run.dir={tmp_path}",
            check=False,
        )
    finally:
        os.environ.pop("PYTHONPATH") if saved is None else os.environ.update(PYTHONPATH=saved)
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines()[-2:] == [
        "error: ValueError: a bug deep inside training",
        f"unexpected error (not a checked input): full traceback in {tmp_path / 'train.log'}; "
        "debug=true shows it here",
    ]
    log = (tmp_path / "train.log").read_text()
    assert "Traceback" in log and "crash.py" in log and "a bug deep inside training" in log


def test_damaged_checkpoints_are_rejected(tmp_path):
    path = tmp_path / "last.ckpt"
    torch.save({"weights": torch.arange(1000.0)}, path)
    verify_checkpoint(path, "resume")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # torch.load would read this back without complaint
    path.write_bytes(data)
    with pytest.raises(ValueError, match="fails the CRC check"):
        resolve_checkpoint(tmp_path)
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        resolve_checkpoint(path, "resume")


def test_run_dir_resolves_to_its_latest_stored_step(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    torch.save({"global_step": 10}, checkpoints / "step000010.ckpt")
    (checkpoints / "last.ckpt").symlink_to("gone.ckpt")  # a dangling save_last="link"
    assert resolve_checkpoint(tmp_path) == checkpoints / "step000010.ckpt"
    torch.save({"global_step": 20}, checkpoints / "step000020.ckpt")
    os.utime(checkpoints / "step000020.ckpt", ns=(0, 0))  # older by its file time
    assert resolve_checkpoint(tmp_path) == checkpoints / "step000020.ckpt"


def test_atomic_save_keeps_the_previous_checkpoint_on_failure(tmp_path):
    path = tmp_path / "checkpoints" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1}, path)
    with pytest.raises((pickle.PicklingError, AttributeError)):
        io.save_checkpoint({"step": 2, "unpicklable": lambda: None}, path)
    assert torch.load(path)["step"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


def test_a_published_sharded_checkpoint_folder_replaces_the_old_one(tmp_path):
    old, new = tmp_path / "last.ckpt", tmp_path / ".last.ckpt.pending"
    old.mkdir()
    (old / "__0_0.distcp").write_text("step 10")
    new.mkdir()
    (new / "__0_0.distcp").write_text("step 20")
    replace_path(new, old)
    assert (old / "__0_0.distcp").read_text() == "step 20"
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


# ---- the training order resumes in mid-epoch


def test_loader_order_is_fixed_by_seed_and_epoch_and_resumes_mid_epoch():
    blocks = PackedBlocks(np.arange(900, dtype=np.uint16), seq_len=8)  # 100 blocks

    def loader(seed: int) -> ResumableLoader:
        return ResumableLoader(blocks, batch_size=10, sampler=EpochShuffle(blocks, seed))

    def epoch(dl: ResumableLoader, number: int) -> list[torch.Tensor]:
        dl.sampler.set_epoch(number)
        return [x for x, _ in dl]

    first, other_seed = loader(0), loader(1)
    epoch0, epoch1 = epoch(first, 0), epoch(first, 1)
    assert not torch.equal(epoch0[0], epoch1[0]) and not torch.equal(
        epoch0[0], epoch(other_seed, 0)[0]
    )
    interrupted = loader(0)
    interrupted.sampler.set_epoch(1)
    batches = iter(interrupted)
    seen = [next(batches)[0] for _ in range(3)]
    resumed = loader(0)
    resumed.load_state_dict(interrupted.state_dict())
    rest = epoch(resumed, 1)
    assert all(torch.equal(a, b) for a, b in zip(seen + rest, epoch1, strict=True))
    finished = loader(0)
    finished.load_state_dict({"served": len(finished)})  # an epoch that had ended: start afresh
    assert len(epoch(finished, 2)) == len(finished)


# ---- stop signals in a training process


class SendSignal(L.Callback):
    """Sends `signum` `times` times to this process in the first validation batch after `step`;
    counts the batches of that validation."""

    def __init__(self, signum: int, step: int, times: int = 1) -> None:
        self.signum, self.step, self.times = signum, step, times
        self.validated_batches = 0

    def on_validation_batch_start(self, trainer, *args) -> None:
        if trainer.global_step == self.step and self.validated_batches == 0:
            for _ in range(self.times):
                signal.raise_signal(self.signum)

    def on_validation_batch_end(self, trainer, *args) -> None:
        self.validated_batches += trainer.global_step == self.step


def fit_tiny(tmp_path: Path, stopper: LastCheckpoint, sender: SendSignal) -> None:
    tokens = np.arange(5000, dtype=np.uint16) % 60
    blocks = PackedBlocks(tokens, seq_len=8)
    train_loader = ResumableLoader(blocks, batch_size=8, sampler=EpochShuffle(blocks, 0))
    val_loader = DataLoader(PackedBlocks(tokens[:500], seq_len=8), batch_size=8)
    trainer = tiny_trainer(
        tmp_path,
        # save_top_k=0: the last.ckpt of validations is not written, only LastCheckpoint's
        [ModelCheckpoint(tmp_path, save_top_k=0, save_last=True), stopper, sender],
        max_steps=20,
        val_check_interval=5,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        enable_checkpointing=True,
        plugins=[AtomicCheckpointIO()],
    )
    try:
        trainer.fit(
            tiny_lm(vocab_size=60), train_dataloaders=train_loader, val_dataloaders=val_loader
        )
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def test_sigint_during_validation_stops_after_it_with_a_checkpoint(tmp_path):
    stopper, sender = LastCheckpoint(), SendSignal(signal.SIGINT, step=5)
    with pytest.raises(SIGTERMException):
        fit_tiny(tmp_path, stopper, sender)
    assert sender.validated_batches == 7  # the validation ran to its end: 55 blocks of 8
    assert stopper.stop_signal == signal.SIGINT and stopper.saved_step == 5
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["global_step"] == 5
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_second_sigint_aborts_without_saving(tmp_path):
    with pytest.raises(SystemExit) as exit_info:  # Lightning's answer to KeyboardInterrupt
        fit_tiny(tmp_path, LastCheckpoint(), SendSignal(signal.SIGINT, step=5, times=2))
    assert exit_info.value.code == 1
    assert not (tmp_path / "last.ckpt").exists()


# ---- a real run stopped by SIGTERM, killed by SIGKILL, resumed: the same curves


CRASH = "+callbacks.crash._target_=crash.KillAfterCheckpoint"


def wait_until(condition, process: subprocess.Popen) -> None:
    """Poll `condition` while `process` runs (at most 5 minutes)."""
    deadline = time.monotonic() + 300
    while not condition():
        if process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"the run ended or stalled:\n{process.stdout.read()}")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def interrupted_and_reference(tiny_corpus, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("resume")
    data_dir = root / "data"
    overrides = [
        *tiny_overrides(
            tiny_corpus,
            f"data.data_dir={data_dir}",
            "data.batch_size=32",  # 34 batches per epoch: the runs cross an epoch boundary
            "trainer.max_steps=60",
            "trainer.val_check_interval=25",
            "trainer.log_every_n_steps=1",
        ),
        "callbacks=minimal",
        "callbacks.progress=null",
        "checkpoint_every_n_steps=10",
    ]
    # tests/ on the path: the killed run loads `crash.KillAfterCheckpoint` as a callback
    path = os.pathsep.join(filter(None, [str(REPO / "tests"), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": path}

    def start(*args: str) -> subprocess.Popen:
        command = [sys.executable, str(REPO / "train.py"), *overrides, *args]
        return subprocess.Popen(
            command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )

    # two runs started together, without hydra.run.dir: each must get its own directory
    reference, stopped = start(), start("resume=auto")
    runs = root / "outputs" / "runs"
    wait_until(lambda: len(list(runs.glob("*"))) == 2, stopped)
    run_dirs = sorted(runs.glob("*"))
    run_dir = next(d for d in run_dirs if f"_{stopped.pid}-" in d.name)
    last = run_dir / "checkpoints" / "last.ckpt"
    wait_until(last.exists, stopped)
    stopped.send_signal(signal.SIGTERM)
    sigterm_out = stopped.communicate(timeout=300)[0]
    reference_out = reference.communicate(timeout=300)[0]
    assert reference.returncode == 0, reference_out
    # a token cache whose index is lost (as by a build killed before it finished) is rebuilt;
    # a damaged shard is an error naming it (tests/test_shards.py)
    next((data_dir / "cache").glob("tokens-*-train/index.json")).unlink()

    # SIGKILLed by itself the moment its first checkpoint is on disk: the worst time to crash
    killed = start(f"hydra.run.dir={run_dir}", "resume=auto", CRASH)
    killed_out = killed.communicate(timeout=300)[0]
    assert killed.returncode == -signal.SIGKILL, killed_out
    finished = start(f"hydra.run.dir={run_dir}", f"resume={run_dir}")
    finished_out = finished.communicate(timeout=300)[0]
    assert finished.returncode == 0, finished_out
    return {
        "run_dirs": run_dirs,
        "reference": next(d for d in run_dirs if d != run_dir),
        "resumed": run_dir,
        "sigterm": (stopped.returncode, sigterm_out),
        "killed_out": killed_out,
    }


@pytest.mark.slow
def test_runs_started_together_get_their_own_directories(interrupted_and_reference):
    first, second = interrupted_and_reference["run_dirs"]
    name = re.compile(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_(\d+-[0-9a-f]{4})")  # <now>_<pid>-<random>
    assert name.fullmatch(first.name).group(1) != name.fullmatch(second.name).group(1)
    assert (first / ".hydra" / "config.yaml").is_file()
    assert (second / ".hydra" / "config.yaml").is_file()


@pytest.mark.slow
def test_sigterm_saves_and_reports_how_to_continue(interrupted_and_reference):
    returncode, output = interrupted_and_reference["sigterm"]
    assert returncode == 128 + signal.SIGTERM, output
    assert "resume=auto: no checkpoint" in output and "starting fresh" in output
    assert "stopped by SIGTERM at step" in output and "last.ckpt holds step" in output
    assert f"hydra.run.dir={interrupted_and_reference['resumed']} resume=auto" in output


@pytest.mark.slow
def test_resumed_runs_match_the_uninterrupted_one(interrupted_and_reference):
    reference = read_scalars(interrupted_and_reference["reference"])
    resumed = read_scalars(interrupted_and_reference["resumed"])
    for tag in ("train/loss", "train/lr", "val/loss"):
        expected = dict(reference[tag])
        logged: dict[int, list[float]] = {}
        for step, value in resumed[tag]:  # steps redone after SIGKILL appear twice
            logged.setdefault(step, []).append(value)
        assert sorted(logged) == sorted(expected), tag
        for step, values in logged.items():
            assert values == pytest.approx([expected[step]] * len(values), rel=1e-5), (tag, step)
    # at steps 25 and 50 (val_check_interval), and 60, the last
    assert [step for step, _ in reference["val/loss"]] == [24, 49, 59]


@pytest.mark.slow
def test_token_cache_without_its_index_is_rebuilt_by_the_cli(interrupted_and_reference):
    assert "tokenized the train split" in interrupted_and_reference["killed_out"]


@pytest.mark.slow
def test_truncated_checkpoint_is_a_one_line_error(interrupted_and_reference, tmp_path, capsys):
    damaged = tmp_path / "last.ckpt"
    intact = interrupted_and_reference["resumed"] / "checkpoints" / "last.ckpt"
    damaged.write_bytes(intact.read_bytes()[:-100])
    line = fail_fast([f"ckpt_path={damaged}"], capsys, config="eval", main=evaluate)
    assert line.startswith(f"error: ckpt_path='{damaged}' is not a readable checkpoint")
