"""Data parallelism on CPU with gloo: 2 processes (ddp, fsdp) train like 1 process with the global
batch, sharded checkpoints resume exactly and consolidate into a plain one; activation
checkpointing keeps the gradients and compilation keeps the checkpoint keys."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from spannorm.training.checkpointing import consolidate_checkpoint
from spannorm.training.lm import LanguageModel

from distributed_driver import MAX_STEPS, MODEL, RESUME_CHECKPOINT
from helpers import write_corpus

DRIVER = Path(__file__).with_name("distributed_driver.py")
STRATEGIES = ("ddp", "fsdp")


def run_driver(launcher: list[str], out: Path, *scenarios: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, *launcher, str(DRIVER), str(out), *scenarios]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """A folder with the driver's results: reference.pt and one <scenario>.pt per 2-process run."""
    out = tmp_path_factory.mktemp("distributed")
    (out / "corpus").mkdir()
    write_corpus(out / "corpus" / "train.txt", 600, seed=0)
    write_corpus(out / "corpus" / "validation.txt", 60, seed=1)
    run_driver([], out, "reference")
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    scenarios = [f"{s}{variant}" for s in STRATEGIES for variant in ("", "_same_data")]
    run_driver(torchrun, out, *scenarios, "fsdp_resumed", "train_py")
    return out


def result(runs: Path, scenario: str) -> dict:
    return torch.load(runs / f"{scenario}.pt")


def assert_same_training(expected: dict, actual: dict) -> None:
    assert_close(actual["weights"], expected["weights"], rtol=1e-5, atol=1e-6)
    assert actual["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_two_processes_train_like_one_with_the_global_batch(runs, strategy):
    assert_same_training(result(runs, "reference"), result(runs, strategy))


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_the_comparison_fails_when_every_rank_reads_the_same_data(runs, strategy):
    with pytest.raises(AssertionError):
        assert_same_training(result(runs, "reference"), result(runs, f"{strategy}_same_data"))


@pytest.mark.slow
def test_fsdp_resumes_from_a_sharded_checkpoint_as_if_uninterrupted(runs):
    checkpoint = runs / "checkpoints" / RESUME_CHECKPOINT
    assert len(list(checkpoint.glob("*.distcp"))) == 2, "expected one shard per process"
    assert_same_training(result(runs, "fsdp"), result(runs, "fsdp_resumed"))


@pytest.mark.slow
def test_a_consolidated_fsdp_checkpoint_loads_into_a_plain_model(runs):
    final = runs / "checkpoints" / f"step={MAX_STEPS}.ckpt"
    lm = LanguageModel.load_from_checkpoint(consolidate_checkpoint(final))
    assert_close(lm.model.state_dict(), result(runs, "fsdp")["weights"])


def test_two_processes_on_an_empty_cache_build_it_once_and_both_train(runs):
    ranks = [result(runs, f"train_py-rank{rank}") for rank in (0, 1)]
    assert [rank["builds"] for rank in ranks] == [2, 0]  # train and validation, by rank 0 only
    assert all(math.isfinite(rank["val_loss"]) for rank in ranks)
    last = torch.load(runs / "train_py" / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 2


def test_activation_checkpointing_recomputes_blocks_and_keeps_gradients():
    tiny = {**MODEL, "dropout": 0.1}  # dropout: the recomputation must replay the same masks
    tokens = torch.randint(tiny["vocab_size"], (2, tiny["max_seq_len"] + 1))
    models, attention_calls = [], []
    for activation_checkpointing in (False, True):
        torch.manual_seed(0)
        lm = LanguageModel(activation_checkpointing=activation_checkpointing, **tiny)
        lm.configure_model()
        calls = []
        lm.model.blocks[0].attn.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        torch.manual_seed(1)
        lm.loss((tokens[:, :-1], tokens[:, 1:])).backward()
        models.append(lm)
        attention_calls.append(len(calls))
    assert attention_calls == [1, 2]  # checkpointed: once forward, once again in backward
    plain, checkpointed = models
    assert_close(
        {n: p.grad for n, p in checkpointed.named_parameters()},
        {n: p.grad for n, p in plain.named_parameters()},
    )


def test_activation_checkpointing_refuses_the_moe_balancing_bias():
    lm = LanguageModel(activation_checkpointing=True, ffn="moe", moe_bias_balance=True, **MODEL)
    with pytest.raises(ValueError, match="moe_bias_balance"):
        lm.configure_model()


def test_compiled_blocks_keep_state_dict_keys_so_checkpoints_load_without_compile():
    compiled = LanguageModel(compile=True, **MODEL)
    compiled.configure_model()
    assert all(block._compiled_call_impl is not None for block in compiled.model.blocks)
    plain = LanguageModel(**MODEL)
    assert list(compiled.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(compiled.state_dict())  # strict
