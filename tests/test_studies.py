"""Studies (study.py, spannorm.studies): a toy study run to the end after being killed, its
transfer stage, its report's numbers recomputed from its summaries, the same jobs through
submitit's local launcher, the paired test against scipy, and bad study configs refused in one
line before any job starts."""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import yaml

from spannorm.analysis.compare import mean_spread
from spannorm.studies.stats import bootstrap_interval, paired_summary, wilcoxon

from helpers import REPO, tiny_overrides

TOY = """
name: toy
variants:
  pre: {model.norm: prenorm}
  span: {model.norm: spannorm}
grid: {optim.lr: [3.0e-3, 1.0e-2]}
seeds: [1, 2]
stages:
  - {name: tune}
  - {name: deeper, cells: best, set: {model.n_layers: [3]}, seeds: [1]}
dir: DIR
"""
GRID_JOBS = {
    f"{v}_lr{lr}_s{seed}"
    for v, lr, seed in itertools.product(("pre", "span"), ("3e-3", "1e-2"), (1, 2))
}


def toy_overrides(corpus) -> list[str]:
    """The tiny model with the default monitors, fast: no matmul probe for MFU, no progress bar."""
    return tiny_overrides(
        corpus,
        "trainer.max_steps=12",
        "trainer.val_check_interval=6",
        "trainer.log_every_n_steps=3",
        "callbacks.layer_stats.every_n_steps=6",
        "callbacks.throughput.peak_flops=1e12",
        "callbacks.progress=null",
    )


def study_command(config: Path, corpus, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(REPO / "study.py"),
        f"study={config}",
        *toy_overrides(corpus),
        *extra,
    ]


def environment() -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def summaries(directory: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))}


@pytest.fixture(scope="module")
def toy(tiny_corpus, tmp_path_factory):
    """The toy study (2 variants x 2 lrs x 2 seeds, then each variant's best lr at 3 blocks),
    killed (SIGKILL, with its running job) once two jobs have finished, then run again to the end.
    Returns (config, study dir, the summaries written before the kill, the second run's output)."""
    root = tmp_path_factory.mktemp("toy")
    config = root / "toy.yaml"
    config.write_text(TOY.replace("DIR", str(root / "study")))
    runs = root / "study" / "runs"
    first = subprocess.Popen(
        study_command(config, tiny_corpus),
        env=environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    try:
        while len(list(runs.glob("*/summary.json"))) < 2:
            assert first.poll() is None, "the study ended before its second job finished"
            assert time.monotonic() < deadline, "no two jobs finished in 300 s"
            time.sleep(0.2)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    before = {p.parent.name: p.read_bytes() for p in runs.glob("*/summary.json")}
    second = subprocess.run(
        study_command(config, tiny_corpus),
        env=environment(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    return config, root / "study", before, second.stdout


def load_study_script():
    spec = importlib.util.spec_from_file_location("study_script", REPO / "study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def best_lr(found: dict[str, dict], variant: str) -> str:
    """The test's own best cell: the lr whose two seeds' mean final val loss is lowest."""
    means = {
        lr: statistics.mean(found[f"{variant}_lr{lr}_s{seed}"]["final_val_loss"] for seed in (1, 2))
        for lr in ("3e-3", "1e-2")
    }
    return min(means, key=means.get)


@pytest.mark.slow
def test_a_killed_study_skips_its_finished_jobs_and_runs_to_the_end(toy):
    _, directory, before, output = toy
    found = summaries(directory / "summaries")
    assert len(before) >= 2
    deeper = {f"{v}_L3_lr{best_lr(found, v)}_s1" for v in ("pre", "span")}
    assert set(found) == GRID_JOBS | deeper
    for name, text in before.items():  # finished before the kill: never run again
        assert (directory / "summaries" / f"{name}.json").read_bytes() == text
        assert f"+study_job={name} " not in output and f"+study_job={name}\n" not in output
    assert f"stage tune (cells): {8 - len(before)} jobs to run ({len(before)} of " in output
    for name, summary in found.items():
        assert summary["complete"] and summary["last_step"] == 11, name
        assert math.isfinite(summary["final_val_loss"]), name
    # the run's own summary has every field of the committed grid summaries
    committed = json.loads(
        (REPO / "docs/results/grid/runs/spannorm_lr6e-3_w300_s1.json").read_text()
    )
    summary = found["span_lr1e-2_s2"]
    assert set(committed) <= set(summary)
    assert set(committed["settings"]) <= set(summary["settings"])
    assert summary["settings"]["model.norm"] == "spannorm" and summary["settings"]["seed"] == 2
    assert summary["settings"]["optim.lr"] == pytest.approx(1e-2)


@pytest.mark.slow
def test_the_transfer_stage_carries_the_best_cell_the_test_computes(toy):
    _, directory, _, _ = toy
    found = summaries(directory / "summaries")
    for variant, norm in (("pre", "prenorm"), ("span", "spannorm")):
        lr = best_lr(found, variant)
        carried = found[f"{variant}_L3_lr{lr}_s1"]["settings"]
        assert carried["model.n_layers"] == 3 and carried["model.norm"] == norm
        assert carried["optim.lr"] == pytest.approx(float(lr))


@pytest.mark.slow
def test_status_and_report_numbers_are_recomputed_from_the_summaries(toy, tiny_corpus, capsys):
    config, directory, _, _ = toy
    study = load_study_script()
    common = [f"study={config}", *toy_overrides(tiny_corpus)]
    assert study.main([*common, "status"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("10 done")
    assert study.main([*common, "verb=report"]) == 0
    text = (directory / "report" / "report.md").read_text()
    found = summaries(directory / "summaries")
    loss = {name: s["final_val_loss"] for name, s in found.items()}
    for variant in ("pre", "span"):
        cells = {
            lr: [loss[f"{variant}_lr{lr}_s{seed}"] for seed in (1, 2)] for lr in ("3e-3", "1e-2")
        }
        # the grid table: mean ± sample std (runs) per lr
        row = " | ".join(f"{mean_spread(cells[lr])} (2)" for lr in ("3e-3", "1e-2"))
        assert f"| {variant} | {row} |" in text
        best = best_lr(found, variant)
        band = sorted(
            (
                lr
                for lr in cells
                if statistics.mean(cells[lr]) <= statistics.mean(cells[best]) + 0.05
            ),
            key=float,
        )
        assert f"| {variant} | lr {best} | {mean_spread(cells[best])} (2) |" in text
        assert f"{len(band)} of 2: {', '.join(band)} |" in text
    # paired by seed: every (setting, lr, seed) both ran; span - pre
    pairs = [
        (a, f"span{a[3:]}")
        for a in sorted(found)
        if a.startswith("pre_") and f"span{a[3:]}" in found
    ]
    differences = [loss[b] - loss[a] for a, b in pairs]
    assert len(pairs) in (4, 5)  # the grid's, and the transfer stage's if both carried one lr
    lower = sum(d < 0 for d in differences)
    p_value = scipy.stats.wilcoxon(differences).pvalue
    assert (
        f"span ends lower in {lower} of {len(differences)} pairs (median difference "
        f"{statistics.median(differences):.4f} nats;"
    ) in text
    assert f"p = {p_value:.3g} (" in text
    assert f"Mean difference {statistics.mean(differences):.4f} nats" in text


@pytest.mark.slow
def test_the_same_jobs_through_submitit_local_give_the_same_summaries(toy, tiny_corpus, tmp_path):
    """Two jobs of the finished toy study removed and run again, each in a process of submitit's
    local launcher: they come back with the summaries the default launcher's jobs had."""
    config, directory, _, _ = toy
    copy = tmp_path / "study"
    subprocess.run(["cp", "-r", str(directory), str(copy)], check=True)
    (tmp_path / "toy.yaml").write_text(config.read_text().replace(str(directory), str(copy)))
    again = ["pre_lr1e-2_s2", "span_lr3e-3_s1"]
    for name in again:
        (copy / "summaries" / f"{name}.json").unlink()
        subprocess.run(["rm", "-r", str(copy / "runs" / name)], check=True)
    run = subprocess.run(
        study_command(tmp_path / "toy.yaml", tiny_corpus, "hydra/launcher=submitit_local"),
        env=environment(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Submitit 'local' sweep output dir" in run.stdout
    assert "stage tune (cells): 2 jobs to run (" in run.stdout
    before, after = summaries(directory / "summaries"), summaries(copy / "summaries")
    assert set(after) == set(before)
    for name in again:
        assert after[name]["final_val_loss"] == pytest.approx(before[name]["final_val_loss"])
        assert after[name]["plateau_escape_step"] == before[name]["plateau_escape_step"]


def test_wilcoxon_p_value_is_scipys_and_known_where_the_answer_is():
    # every one of 10 differences positive: the exact two-sided p is 2 / 2**10
    assert wilcoxon([0.1 * i for i in range(1, 11)]).p_value == pytest.approx(2 / 2**10)
    assert wilcoxon([0.1, -0.2]).p_value == pytest.approx(1.0)  # as balanced as 2 pairs can be
    rng = np.random.default_rng(0)
    for n, decimals in itertools.product((4, 9, 13, 20, 34, 60), (2, 6)):  # ties at 2 decimals
        d = list(rng.normal(0.03, 0.1, n).round(decimals))
        ours = wilcoxon(d)
        assert ours.p_value == pytest.approx(scipy.stats.wilcoxon(d).pvalue, rel=1e-9), (n, d)
    assert wilcoxon([0.0, 0.0]).n == 0 and math.isnan(wilcoxon([]).p_value)


def test_bootstrap_interval_matches_scipys_percentile_interval():
    d = list(np.random.default_rng(1).normal(-0.1, 0.05, 30))
    low, high = bootstrap_interval(d)
    theirs = scipy.stats.bootstrap((d,), np.mean, method="percentile", random_state=0)
    spread = max(d) - min(d)
    assert low == pytest.approx(theirs.confidence_interval.low, abs=0.02 * spread)
    assert high == pytest.approx(theirs.confidence_interval.high, abs=0.02 * spread)
    summary = paired_summary([*d, float("nan")])  # a diverged pair is left out
    assert summary.n == 30 and summary.lower == sum(x < 0 for x in d)
    assert summary.median == pytest.approx(statistics.median(d))


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("seedz", "[1, 2]", "unknown key 'seedz' in study"),
        ("grid", "{}", "the grid is empty"),
        ("grid", "{optim.lr: []}", "grid key optim.lr is an empty list"),
        (
            "stages",
            "[{name: tune}, {name: deep, cells: best, set: {model.n_layer: [3]}}]",
            "stage 'deep' sets model.n_layer, which is not a key of the training config; "
            "did you mean model.n_layers?",
        ),
        (
            "variants",
            "{a: {model.norm: prenorm}, b: {model.nrm: spannorm}}",
            "variant 'b' sets model.nrm, which is not a key",
        ),
    ],
)
def test_a_bad_study_fails_in_one_line_before_any_job(
    tiny_corpus, tmp_path, capsys, key, value, message
):
    directory = tmp_path / "study"
    study = yaml.safe_load(TOY.replace("DIR", str(directory)))
    study[key] = yaml.safe_load(value)
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(study))
    status = load_study_script().main([f"study={config}", *toy_overrides(tiny_corpus)])
    errors = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert len(errors) == 1 and errors[0].startswith("error: ") and message in errors[0], errors
    assert not directory.exists()  # nothing started


@pytest.mark.slow
def test_a_diverged_run_writes_its_summary_too(tiny_corpus, tmp_path):
    """The divergence guard stops the run at step 7 (exit 3); its summary says so, so that a
    study counts it as a result (a NaN cell) instead of running it again."""
    run_dir = tmp_path / "run"
    env = {
        **environment(),
        "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "train.py"),
            *toy_overrides(tiny_corpus),
            "+callbacks.poison._target_=test_monitoring.PoisonLogits",
            "+callbacks.poison.step=7",
            f"hydra.run.dir={run_dir}",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 3, result.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["diverged_at"] == 7 and summary["complete"]
    assert summary["final_val_loss"] is not None  # the validation at step 5, before it diverged
    assert [step for step, _ in summary["train_loss"]][:2] == [2, 5]
