"""The study planner on summaries written by the test (no training): where a variant's best cell
sits at the edge of the grid, the study's `extend` values are tried next, one at a time, until the
best is inside what was tried; the best seeds then go to the extended best. And the runner's
launch of a phase whose multirun dies."""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import pytest

from spannorm.errors import UsageError
from spannorm.studies.plan import plan
from spannorm.studies.results import Results, load_summaries
from spannorm.studies.runner import StudyLog, launch, load_study

from helpers import REPO

STUDY = """
experiment: placement_sweep
variants:
  pre: {model.norm: prenorm}
  span: {model.norm: spannorm}
grid: {optim.lr: [3.0e-3, 6.0e-3, 1.0e-2]}
extend: {optim.lr: [4.0e-2, 1.0e-3, 2.0e-2]}
seeds: [1, 2]
best_seeds: [3]
min_seeds: 1
stages:
  - {name: tune}
  - {name: deep, cells: best, set: {model.n_layers: [64]}, seeds: [1],
     neighbours: {optim.lr: both}, neighbour_seeds: [1]}
summaries: runs
"""
NORMS = {"pre": "prenorm", "span": "spannorm"}


def write_runs(directory, losses):
    """One summary per (variant, lr, seed) -> loss, as a finished 32-block run writes it."""
    directory.mkdir(exist_ok=True)
    for (variant, lr, seed), loss in losses.items():
        name = f"{variant}_lr{lr:g}_s{seed}"
        run = {
            "name": name,
            "settings": {"model.norm": NORMS[variant], "optim.lr": lr, "seed": seed},
            "final_val_loss": loss,
            "diverged_at": None,
        }
        (directory / f"{name}.json").write_text(json.dumps(run))


def phases_of(tmp_path, text=STUDY):
    (tmp_path / "study.yaml").write_text(text)
    study = load_study(str(tmp_path / "study.yaml"), REPO / "conf")
    study.summaries = tmp_path / "runs"
    return {
        (p.stage, p.phase): p.jobs
        for p in plan(study, Results(study, load_summaries(study.summaries)))
    }


def names(jobs):
    return sorted(j.name for j in jobs)


def test_a_best_cell_at_the_top_edge_tries_the_next_extension_value_until_inside(tmp_path):
    grid = {(v, lr, s): 5.0 for v in NORMS for lr in (3e-3, 6e-3, 1e-2) for s in (1, 2)}
    grid[("pre", 1e-2, 1)] = grid[("pre", 1e-2, 2)] = 4.8  # pre: best at the top edge
    grid[("span", 6e-3, 1)] = grid[("span", 6e-3, 2)] = 4.7  # span: best inside the grid
    write_runs(tmp_path / "runs", grid)
    phases = phases_of(tmp_path)
    assert names(phases[("tune", "edge")]) == ["pre_lr2e-2_s1", "pre_lr2e-2_s2"]
    assert {j.role for j in phases[("tune", "edge")]} == {"edge"}
    assert names(phases[("tune", "best")]) == ["pre_lr1e-2_s3", "span_lr6e-3_s3"]

    # 2e-2 wins: the next value up, 4e-2, is tried (1e-3 is below the grid, far from the best)
    write_runs(tmp_path / "runs", {("pre", 2e-2, 1): 4.6, ("pre", 2e-2, 2): 4.6})
    phases = phases_of(tmp_path)
    edge = names(phases[("tune", "edge")])
    assert edge == ["pre_lr2e-2_s1", "pre_lr2e-2_s2", "pre_lr4e-2_s1", "pre_lr4e-2_s2"]
    assert names(phases[("tune", "best")]) == ["pre_lr2e-2_s3", "span_lr6e-3_s3"]

    # 4e-2 is worse: the best (2e-2) is inside what was tried, nothing more; the transfer stage
    # carries the extended best and takes its neighbours from the extended axis
    write_runs(tmp_path / "runs", {("pre", 4e-2, 1): 6.0, ("pre", 4e-2, 2): 6.1})
    phases = phases_of(tmp_path)
    assert len(phases[("tune", "edge")]) == 4
    deep = names(phases[("deep", "best")])
    assert deep == [
        "pre_L64_lr1e-2_s1",
        "pre_L64_lr2e-2_s1",
        "pre_L64_lr4e-2_s1",
        "span_L64_lr1e-2_s1",
        "span_L64_lr3e-3_s1",
        "span_L64_lr6e-3_s1",
    ]


def test_a_best_cell_at_the_bottom_edge_tries_below_and_no_extension_runs_without_one(tmp_path):
    grid = {(v, lr, s): 5.0 for v in NORMS for lr in (3e-3, 6e-3, 1e-2) for s in (1, 2)}
    grid[("span", 3e-3, 1)] = 4.7  # mean 4.85: best at the bottom edge
    grid[("pre", 6e-3, 2)] = 4.9  # best inside the grid
    write_runs(tmp_path / "runs", grid)
    phases = phases_of(tmp_path)
    assert names(phases[("tune", "edge")]) == ["span_lr1e-3_s1", "span_lr1e-3_s2"]
    without = phases_of(
        tmp_path, STUDY.replace("extend: {optim.lr: [4.0e-2, 1.0e-3, 2.0e-2]}\n", "")
    )
    assert without[("tune", "edge")] == []
    assert names(without[("tune", "best")]) == ["pre_lr6e-3_s3", "span_lr3e-3_s3"]


@pytest.mark.parametrize(
    ("extend", "message"),
    [
        ("{optim.warmup_steps: [600]}", "optim.warmup_steps is not a grid key (optim.lr)"),
        ("{optim.lr: [5.0e-3]}", "[0.005] lie within the grid's range [0.003, 0.01]"),
        ("{optim.lr: [big]}", "the grid and its extension must be numbers"),
    ],
)
def test_a_bad_extension_is_one_line_before_any_job(tmp_path, extend, message):
    text = STUDY.replace("{optim.lr: [4.0e-2, 1.0e-3, 2.0e-2]}", extend)
    with pytest.raises(UsageError) as error:
        phases_of(tmp_path, text)
    assert message in str(error.value) and "\n" not in str(error.value), error.value


def test_the_study_goes_on_when_the_multirun_exits_but_its_workers_hold_its_output(tmp_path):
    """A multirun that died leaves a parallel launcher's workers behind, holding its output open:
    the study takes the multirun's exit status and goes on instead of waiting for them."""
    pid_file = tmp_path / "worker.pid"
    worker = (
        f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    )
    multirun = (
        "import subprocess, sys, time\n"
        f"subprocess.Popen([sys.executable, '-c', {worker!r}])\n"
        "print('multirun output', flush=True)\n"
        "time.sleep(1)\n"
        "sys.exit(3)\n"
    )
    log = StudyLog(tmp_path / "study.log")
    started = time.monotonic()
    try:
        status = launch([sys.executable, "-c", multirun], log, linger_s=1.0)
        took = time.monotonic() - started
    finally:
        if pid_file.exists():
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
    assert status == 3
    assert took < 30, took  # the worker sleeps for 60 s
    text = (tmp_path / "study.log").read_text()
    assert "multirun output" in text
    assert "still hold its output after 1 s; going on without them" in text
