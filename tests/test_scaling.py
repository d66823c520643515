"""One experiment on 1 or 2 processes, through `train.py` with the default callbacks (CPU, gloo).

Two sweeps, each started once per module, of a tiny MoE model trained 4 steps on a global batch
of 16 sequences (`data.global_batch_size=16` in every run):
- `hydra/launcher=submitit_local` over the micro batch: job 0 = 1 process x batch 16, job 1 =
  1 process x micro batch 8 x accumulation 2;
- the default launcher over the strategy, 2 processes x micro batch 4 x accumulation 2 each:
  job 0 = `trainer=ddp`, job 1 = `trainer=fsdp`.
All four must log the same per-layer statistics, MoE loads, training losses and throughput
(tokens of the global batch) and end with the same weights; every multirun job must have run
once, with both ranks in its own directory.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from spannorm.analysis.scalars import read_scalars
from spannorm.tags import LAYER_METRICS
from spannorm.training.checkpointing import consolidate_checkpoint

from helpers import REPO, compose_config, tiny_overrides

GLOBAL_BATCH, SEQ_LEN, STEPS = 16, 32, 4
RUN = [
    "seed=1",
    f"data.global_batch_size={GLOBAL_BATCH}",
    f"data.seq_len={SEQ_LEN}",
    f"trainer.max_steps={STEPS}",
    "trainer.log_every_n_steps=1",
    "model.ffn=moe",
    "model.n_experts=4",
    "model.top_k=2",
    # the load-balancing loss is a per-forward product (load x mean router probability), so it
    # differs between one batch of 16 and micro batches of 8 or 4, by definition (docs/scaling.md)
    "model.moe_aux_loss_coef=0",
    "callbacks.layer_stats.every_n_steps=2",
    "callbacks.experts.every_n_steps=2",
    "callbacks.throughput.every_n_steps=2",
    "callbacks.throughput.warmup_steps=1",
    "callbacks.progress=null",
]
TWO_PROCESSES = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"]


def start_sweep(tmp: Path, corpus, *overrides: str) -> subprocess.Popen:
    """`train.py -m` from `tmp`, into Hydra's default sweep directory (named by the time and the
    process, so that a process which started a sweep of its own would make a second one)."""
    command = [
        sys.executable,
        str(REPO / "train.py"),
        "-m",
        *tiny_overrides(corpus, *RUN, *overrides),
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    with open(tmp / "stdout", "w") as stdout, open(tmp / "stderr", "w") as stderr:
        return subprocess.Popen(command, cwd=tmp, env=env, stdout=stdout, stderr=stderr)


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory, tiny_corpus) -> dict[str, tuple[Path, str]]:
    """Both sweeps, run side by side: {name: (sweep dir, stdout + stderr)}.
    one_process: job 0 batch 16, job 1 micro batch 8 x accumulation 2 (submitit's local launcher);
    two_processes: job 0 ddp, job 1 fsdp, each 2 processes x micro batch 4 x accumulation 2."""
    options = {
        "one_process": ["hydra/launcher=submitit_local", "data.batch_size=16,8"],
        "two_processes": ["trainer=ddp,fsdp", *TWO_PROCESSES, "data.batch_size=4"],
    }
    tmp = {name: tmp_path_factory.mktemp(name) for name in options}
    started = {name: start_sweep(tmp[name], tiny_corpus, *o) for name, o in options.items()}
    results = {}
    for name, process in started.items():
        code = process.wait(timeout=900)
        output = (tmp[name] / "stdout").read_text() + (tmp[name] / "stderr").read_text()
        assert code == 0, f"the {name} sweep failed:\n{output}"
        (sweep_dir,) = (tmp[name] / "outputs" / "multirun").iterdir()
        results[name] = (sweep_dir, output)
    return results


@pytest.fixture(scope="module")
def runs(sweeps) -> dict[str, Path]:
    one, two = sweeps["one_process"][0], sweeps["two_processes"][0]
    return {"batch16": one / "0", "micro8x2": one / "1", "ddp": two / "0", "fsdp": two / "1"}


def weights(run: Path) -> dict[str, torch.Tensor]:
    last = run / "checkpoints" / "last.ckpt"
    if last.is_dir():  # fsdp: sharded
        last = consolidate_checkpoint(last)
    return torch.load(last, map_location="cpu", weights_only=False)["state_dict"]


def monitored(run: Path) -> dict[str, list[tuple[int, float]]]:
    wanted = ("layers/", "moe/", "train/loss", "train/grad_norm")
    return {tag: v for tag, v in read_scalars(run).items() if tag.startswith(wanted)}


@pytest.mark.parametrize("run", ["micro8x2", "ddp", "fsdp"])
def test_the_global_batch_trains_the_same_whatever_the_processes_and_micro_batch(runs, run):
    """Same weights up to summation order. Splitting the batch changes the order in which fp32
    gradients are summed (~1e-7 relative), and Adam divides each update by the gradient's own
    size, so an element whose gradient is near zero carries that noise into a full-size step:
    a clean CI run on an Intel Xeon (AVX-512 kernels) saw one element of 11264 off by 1.6e-6
    (relative 3e-4, the same on a rerun) after 4 steps, where atol was 1e-6. A real fault (a
    dropped or doubled micro batch, a wrong lr schedule) moves weights by the size of the
    updates, ~lr = 1e-2 per step here, three orders above atol."""
    assert_close(weights(runs[run]), weights(runs["batch16"]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("run", ["micro8x2", "ddp", "fsdp"])
def test_monitors_log_the_global_batch_like_one_process(runs, run):
    expected, actual = monitored(runs["batch16"]), monitored(runs[run])
    assert {t.split("/")[0] for t in expected} == {"layers", "moe", "train"}
    layer_tags = [t for t in expected if t.startswith("layers/")]
    assert len(layer_tags) == len(LAYER_METRICS) * 2  # every per-block metric of the 2 blocks
    assert sorted(actual) == sorted(expected)
    for tag, series in expected.items():
        steps = [step for step, _ in series]
        assert [step for step, _ in actual[tag]] == steps, tag
        values = torch.tensor([v for _, v in actual[tag]])
        assert_close(values, torch.tensor([v for _, v in series]), rtol=1e-4, atol=1e-7, msg=tag)
    assert [step for step, _ in expected["layers/rms/block_00"]] == [0, 2]


@pytest.mark.parametrize("run", ["batch16", "micro8x2", "ddp", "fsdp"])
def test_throughput_counts_the_tokens_of_every_process(runs, run):
    scalars = read_scalars(runs[run])
    rates = [v for _, v in scalars["throughput/tokens_per_sec"]]
    step_ms = [v for _, v in scalars["throughput/step_time_ms"]]
    assert len(rates) == 2
    for rate, ms in zip(rates, step_ms, strict=True):
        assert rate * ms / 1e3 == pytest.approx(GLOBAL_BATCH * SEQ_LEN, rel=1e-4)
    devices = 2 if run in ("ddp", "fsdp") else 1
    per_device = [v for _, v in scalars["throughput/tokens_per_sec_per_device"]]
    assert per_device == pytest.approx([rate / devices for rate in rates])


def test_each_multirun_job_trains_once_with_both_ranks_in_its_directory(sweeps):
    sweep_dir, output = sweeps["two_processes"]
    assert sorted(p.name for p in sweep_dir.iterdir()) == ["0", "1", "multirun.yaml"]
    assert output.count("Launching 2 jobs") == 1  # no rank started a sweep of its own
    assert output.count("run dir:") == 2
    for job, strategy in (("0", "ddp"), ("1", "fsdp")):
        run = sweep_dir / job
        assert f"trainer={strategy}" in (run / ".hydra" / "overrides.yaml").read_text()
        # every process of a run logs one "Seed set to" when it starts training
        starts = {log.name: log.read_text().count("Seed set to") for log in run.glob("*.log")}
        assert starts == {"train.log": 1, "train_ddp_process_1.log": 1}
        assert re.search(
            r"\[rank: 1\] Seed set to 1", (run / "train_ddp_process_1.log").read_text()
        )
        assert (run / "checkpoints" / "last.ckpt").exists()


def test_submitit_local_runs_a_sweep_to_completion(sweeps):
    sweep_dir, output = sweeps["one_process"]
    assert "Submitit 'local' sweep output dir" in output
    for job in ("0", "1"):
        assert (sweep_dir / job / "checkpoints" / "last.ckpt").exists()
        assert (sweep_dir / job / ".hydra" / "config.yaml").exists()
    assert len(list((sweep_dir / ".submitit").glob("*/*_result.pkl"))) == 2


def test_submitit_slurm_config_asks_slurm_for_one_task_per_gpu_and_requeues(tmp_path, monkeypatch):
    """The plugin's own launcher on conf/hydra/launcher/submitit_slurm.yaml, stopped where it
    would call sbatch: the script it would submit."""
    import submitit
    from hydra.utils import instantiate

    overrides = ["hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu", "trainer=fsdp"]
    overrides += ["trainer.num_nodes=4", "trainer.devices=8", f"hydra.sweep.dir={tmp_path}/sweep"]
    cfg = compose_config(overrides, return_hydra_config=True)
    scripts = []

    def submit(executor, *args):
        scripts.append(executor._executor._make_submission_file_text("python job.py", "0"))
        return []

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", submit)
    fake_srun = tmp_path / "bin" / "srun"  # submitit looks for srun to know it is on SLURM
    fake_srun.parent.mkdir()
    fake_srun.write_text("#!/bin/sh\nexit 1\n")
    fake_srun.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_srun.parent}:{os.environ['PATH']}")
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=None, config=cfg)
    launcher.launch([["seed=1"]], initial_job_idx=0)
    lines = set(scripts[0].splitlines())
    for flag in ("nodes=4", "ntasks-per-node=8", "gpus-per-node=8", "partition=gpu", "requeue"):
        assert f"#SBATCH --{flag}" in lines, flag
    assert "#SBATCH --signal=USR2@120" in lines and "#SBATCH --time=240" in lines


def test_a_rank_started_for_a_sweep_job_ends_a_divergence_as_a_result(monkeypatch, capsys):
    """The ranks Lightning starts for a multirun job run as single runs: a divergence there must
    not exit non-zero, or Lightning would kill rank 0 and with it the sweep."""
    from omegaconf import OmegaConf

    from spannorm.cli import friendly_errors
    from spannorm.errors import TrainingDiverged
    from spannorm.training.multirun import SWEEP_JOB_ENV

    def diverge(cfg):
        raise TrainingDiverged("training diverged: loss is nan at step 3")

    monkeypatch.setenv(SWEEP_JOB_ENV, "1")
    assert math.isnan(friendly_errors(diverge)(OmegaConf.create({})))
    assert capsys.readouterr().err == "error: training diverged: loss is nan at step 3\n"
    monkeypatch.delenv(SWEEP_JOB_ENV)
    with pytest.raises(SystemExit) as exit_info:
        friendly_errors(diverge)(OmegaConf.create({}))
    assert exit_info.value.code == 3
