"""The study report (spannorm.studies.report) on summaries written by the test: best cell, band,
plateau escapes, depth table, pairs by seed; and the placement grid's committed summaries, which
must give the best cells, means and counts of the committed grid tables."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from spannorm.studies.report import (
    Report,
    escape_correlation,
    escape_correlation_text,
    heatmap_range,
    report,
)
from spannorm.studies.results import load_summaries
from spannorm.studies.runner import load_study
from spannorm.studies.stats import average_ranks as ranks

from helpers import REPO

STUDY = """
experiment: placement_sweep
variants:
  prenorm: {model.norm: prenorm}
  spannorm: {model.norm: spannorm}
grid:
  optim.lr: [1.0e-3, 3.0e-3, 6.0e-3, 1.0e-2]
  optim.warmup_steps: [60, 150, 300]
stages:
  - {name: tune}
  - {name: depth, cells: best, set: {model.n_layers: [64]}}
summaries: runs
report: out/grid.md
"""


def summary(norm, lr, warmup, seed, loss, escape=100, layers=32, diverged=None):
    name = f"{norm}_L{layers}_lr{lr}_w{warmup}_s{seed}"
    return {
        "name": name,
        "settings": {
            "model.norm": norm,
            "model.n_layers": layers,
            "optim.lr": lr,
            "optim.warmup_steps": warmup,
            "seed": seed,
        },
        "final_val_loss": loss,
        "best_val_loss": loss,
        "diverged_at": diverged,
        "plateau_escape_step": escape,
        "median_tokens_per_sec": 1000.0,
        "stream_grad_norm_history": [[0, [1.0] * layers], [399, [0.5] * layers]],
    }


RUNS = [
    summary("prenorm", 3e-3, 150, 1, 4.90),
    summary("prenorm", 3e-3, 150, 2, 4.80),
    summary("prenorm", 6e-3, 150, 1, 4.84),
    summary("prenorm", 6e-3, 150, 2, 4.88),
    summary("prenorm", 1e-2, 150, 1, 5.30),  # one seed: lower mean would not count as best
    summary("spannorm", 3e-3, 150, 1, 4.78),
    summary("spannorm", 3e-3, 150, 2, 4.79),
    summary("spannorm", 6e-3, 150, 1, 4.78),
    summary("spannorm", 6e-3, 150, 2, 6.30, escape=None),
    summary("spannorm", 1e-3, 150, 1, 4.00),
    summary("spannorm", 3e-3, 150, 1, 4.90, layers=64),
    summary("spannorm", 1e-2, 60, 1, float("nan"), diverged=50),
]


def write(tmp_path, runs=RUNS):
    """The summaries and a study over them; the Report of that study."""
    directory = tmp_path / "runs"
    directory.mkdir()
    for run in runs:
        (directory / f"{run['name']}.json").write_text(json.dumps(run).replace("NaN", "null"))
    (tmp_path / "study.yaml").write_text(STUDY)
    study = load_study(str(tmp_path / "study.yaml"), REPO / "conf")
    study.summaries, study.report_dir = directory, tmp_path / "out" / "grid.md"
    return study, Report(study, load_summaries(directory))


AT32 = (("model.n_layers", 32),)


def cell(lr, warmup):
    return (("optim.lr", lr), ("optim.warmup_steps", warmup))


def test_best_cell_needs_two_seeds_and_the_band_is_measured_from_it(tmp_path):
    _, r = write(tmp_path)
    best = r.results.best_cell("spannorm", AT32)
    assert best == cell(3e-3, 150)  # 4.785 over two seeds beats 1e-3's one run
    assert r.results.best_cell("prenorm", AT32) == cell(3e-3, 150)  # 4.85 against 4.86 at 6e-3
    band = r.results.band("spannorm", AT32, best, 0.05)
    assert sorted(dict(c)["optim.lr"] for c in band) == [1e-3, 3e-3]  # 1e-3: one seed, 4.0


def test_report_writes_tables_with_escapes_and_depth(tmp_path):
    study, _ = write(tmp_path)
    written = report(study)
    names = [p.name for p in written]
    assert names == [
        "grid.md",
        "grid_heatmap.png",
        "loss_vs_depth.png",
        "grid_curves.png",
        "escape_vs_loss.png",
        "gradient_profiles.png",
    ]
    text = (tmp_path / "out" / "grid.md").read_text()
    assert "| spannorm | lr 3e-3, warm-up 150 | 4.7850 ± 0.0071 (2) |" in text
    assert "| 150 | 4.0000 (1) | 4.7850 ± 0.0071 (2) | 5.5400 ± 1.0748 (2) |" in text
    assert "100, never" in text  # the seed of spannorm at 6e-3 that stayed on the plateau
    # side by side: a row per warm-up and variant that ran there, a cell not run left empty
    assert "| 60, prenorm |" not in text and "| 60, spannorm |  |  |  | – (1) [100] |" in text
    assert "| 150, prenorm |  | 4.8500 ± 0.0707 (2) [100, 100] |" in text
    assert "| 150, spannorm | 4.0000 (1) [100] | 4.7850 ± 0.0071 (2) [100, 100] |" in text
    # the depth table: a row per variant and cell run at two or more depths
    assert "| setting \\ blocks | 32 | 64 |" in text
    assert (
        "| spannorm, lr 3e-3, warm-up 150 | 4.7850 ± 0.0071 (2) [100, 100] | 4.9000 (1) [100] |"
        in text
    )
    assert "at step 50" in text


def test_training_curves_follow_each_variants_best_cell_and_the_gap_between_them(tmp_path):
    def curve(run, values):
        return {**run, "val_loss": [[99 + 100 * i, v] for i, v in enumerate(values)]}

    runs = [
        curve(summary("prenorm", 3e-3, 150, 1, 4.90), [6.0, 5.4, 5.1, 4.90]),
        curve(summary("prenorm", 3e-3, 150, 2, 4.80), [6.2, 5.2, 5.0, 4.80]),
        curve(summary("prenorm", 6e-3, 150, 1, 5.00), [5.0, 5.0, 5.0, 5.00]),
        curve(summary("prenorm", 6e-3, 150, 2, 5.10), [5.0, 5.0, 5.0, 5.10]),
        # a run whose last validation is missing: the mean is over the steps every run logged
        curve(summary("spannorm", 1e-2, 300, 1, 4.70), [6.1, 5.0, 4.8, 4.70]),
        curve(summary("spannorm", 1e-2, 300, 2, 4.70), [6.1, 5.2, 4.8]),
    ]
    study, r = write(tmp_path, runs)
    curves = r.best_curves(AT32)
    assert list(curves) == ["prenorm", "spannorm"]
    assert curves["prenorm"][0] == cell(3e-3, 150) and curves["spannorm"][0] == cell(1e-2, 300)
    assert curves["spannorm"][2] == pytest.approx({99: 6.1, 199: 5.1, 299: 4.8})
    table = r.curves_table(curves)
    assert (
        "| prenorm (3e-3/150, 2 runs) | spannorm (1e-2/300, 2 runs) | spannorm - prenorm |" in table
    )
    # steps every variant logged: 100, 200, 300 (quarter marks of 300 steps: the nearest ones)
    assert "| 100 | 6.1000 | 6.1000 | 0.0000 |" in table
    assert "| 300 | 5.0500 | 4.8000 | -0.2500 |" in table
    assert "| 400 |" not in table
    names = [p.name for p in report(study)]
    assert "training_curves.png" in names
    text = (tmp_path / "out" / "grid.md").read_text()
    assert "## Validation loss during training (blocks 32)" in text
    # a best cell whose runs share no finite validation step has no mean curve, and no line
    nan = float("nan")
    runs[4:] = [
        curve(summary("spannorm", 1e-2, 300, 1, 4.7), [6.1, nan, 4.7]),
        curve(summary("spannorm", 1e-2, 300, 2, 4.7), [nan, 5.2, nan]),
    ]
    (tmp_path / "nan").mkdir()
    _, r = write(tmp_path / "nan", runs)
    assert list(r.best_curves(AT32)) == ["prenorm"]
    # summaries without curves (runs made before they were kept): no section, no figure
    (tmp_path / "old").mkdir()
    _, r = write(tmp_path / "old")
    assert r.best_curves(AT32) == {} and not r.plot_training_curves({}, AT32, tmp_path / "x.png")


def test_heatmap_scale_is_capped_above_the_best_so_a_plateau_run_does_not_flatten_it():
    # a PostNorm run on the plateau (6.42) beside tuned runs (4.68-4.90)
    assert heatmap_range([4.68, 4.90, 6.42]) == (4.68, 4.68 + 0.75, True)
    # every cell within the span: the scale is the data's own range, nothing clipped
    assert heatmap_range([4.68, 4.90, float("nan")]) == (4.68, 4.90, False)
    assert heatmap_range([float("nan")]) == (0.0, 1.0, False)


def test_pairs_by_seed_match_depth_cell_and_seed_and_count_diverged_runs_out(tmp_path):
    runs = [
        summary("prenorm", 6e-3, 300, 1, 4.80),
        summary("prenorm", 6e-3, 300, 2, 4.90),
        summary("prenorm", 6e-3, 300, 3, 4.85),  # no spannorm seed 3: unpaired
        summary("spannorm", 6e-3, 300, 1, 4.70),
        summary("spannorm", 6e-3, 300, 2, 4.95),
        summary("prenorm", 6e-3, 300, 1, 5.00, layers=8),
        summary("spannorm", 6e-3, 300, 1, float("nan"), layers=8, diverged=40),
        summary("spannorm", 1e-2, 300, 1, 4.60),  # no prenorm at this cell: unpaired
    ]
    _, r = write(tmp_path, runs)
    pairs = r.pairs("prenorm", "spannorm")
    assert [(dict(p.setting)["model.n_layers"], seed) for p, seed, _, _ in pairs] == [
        (8, 1),
        (32, 1),
        (32, 2),
    ]
    assert [round(b - a, 2) for _, _, a, b in pairs[1:]] == [-0.10, 0.05]
    text = r.paired_section("prenorm", "spannorm")
    assert text.startswith("spannorm ends lower in 1 of 2 pairs")


def test_ranks_share_ties_and_escape_correlation_counts_only_runs_that_escaped(tmp_path):
    assert ranks([30.0, 10.0, 20.0, 10.0]) == [4.0, 1.5, 3.0, 1.5]
    runs = [
        summary("prenorm", 6e-3, 300, 1, 4.80, escape=70),
        summary("prenorm", 6e-3, 150, 1, 4.90, escape=90),
        summary("prenorm", 3e-3, 300, 1, 5.10, escape=120),
        summary("prenorm", 1e-2, 60, 1, 6.40, escape=None),  # never: in the figure, not in rho
        summary("prenorm", 1e-2, 300, 1, float("nan"), diverged=30),  # left out
        summary("prenorm", 6e-3, 300, 1, 4.00, escape=300, layers=64),  # other depth: left out
        summary("spannorm", 6e-3, 300, 1, 4.70, escape=100),
        summary("spannorm", 6e-3, 300, 2, 4.60, escape=110),
        summary("spannorm", 6e-3, 300, 3, 4.65, escape=120),
    ]
    _, r = write(tmp_path, runs)
    points = r.escape_points(AT32)
    assert sorted(points["prenorm"], key=lambda p: p[1]) == [
        (70, 4.80, 300),
        (90, 4.90, 150),
        (120, 5.10, 300),
        (None, 6.40, 60),
    ]
    assert escape_correlation(points["prenorm"]) == (1.0, 3)  # later escape, higher loss
    rho, n = escape_correlation(points["spannorm"])
    assert n == 3 and round(rho, 2) == -0.5
    text = escape_correlation_text(points)
    assert (
        "- prenorm: Spearman's rank correlation of escape step and final loss 1.00 over the 3"
        in text
    )
    assert "1 of 4 runs never left the plateau" in text
    # two runs that escaped are too few for a correlation: no line rather than a meaningless one
    rho, n = escape_correlation([(70, 4.8, 300), (90, 4.9, 300), (None, 6.4, 60)])
    assert math.isnan(rho) and n == 2


# The tables of docs/results/grid/grid.md as scripts/grid_report.py wrote them from the 73
# committed summaries before the grid became a study (commit 7c5e153): the study's report of the
# same summaries must give the same best cells, means, bands and counts.
GRID_ROWS = [
    "| prenorm | lr 6e-3, warm-up 300 | 4.8191 ± 0.0256 (3) | 4.7920 | 4.8429 | 4 of 12: "
    "3e-3/300, 6e-3/150, 6e-3/300, 1e-2/300 | 25 of 25 |",
    "| spannorm | lr 6e-3, warm-up 300 | 4.6755 ± 0.0120 (3) | 4.6683 | 4.6893 | 1 of 12: "
    "6e-3/300 | 22 of 25 |",
    "| lns | lr 6e-3, warm-up 300 | 4.7690 (1) | 4.7690 | 4.7690 | 1 of 1: 6e-3/300 | 1 of 1 |",
    "| postnorm | lr 6e-3, warm-up 300 | 6.4220 (1) | 6.4220 | 6.4220 | 1 of 1: 6e-3/300 | 0 of 1 |",
    "| 300, spannorm | 5.3127 ± 0.0063 (2) [176, 168] | 4.8080 ± 0.0035 (2) [120, 119] | "
    "4.6755 ± 0.0120 (3) [101, 96, 121] | 4.7641 ± 0.0025 (2) [120, 96] |",
    "spannorm ends lower in 19 of 34 pairs (median difference -0.0242 nats;",
    "| 64 | lr 6e-3, warm-up 300 | 2 | 4.9309 | 4.6996 | -0.2312 |",
    "| spannorm, lr 6e-3, warm-up 300 | 4.7366 ± 0.0041 (2) [98, 96] | 4.7272 ± 0.0005 (2) "
    "[111, 103] | 4.6755 ± 0.0120 (3) [101, 96, 121] | 4.7128 ± 0.0186 (2) [125, 103] |",
    "| postnorm, lr 6e-3, warm-up 300 | 5.0927 (1) [74] | 6.4225 (1) [never] | 6.4220 (1) "
    "[never] | 6.4202 (1) [never] |",
    "- spannorm: Spearman's rank correlation of escape step and final val loss 0.66 over the 22 "
    "runs that escaped (every cell together); 3 of 25 runs never left the plateau.",
]


def test_placement_grid_study_reports_the_committed_grid_as_before(tmp_path):
    study = load_study("placement_grid", REPO / "conf")
    assert study.summaries == Path("docs/results/grid/runs")
    study.summaries = REPO / study.summaries
    study.report_dir = tmp_path / "grid.md"
    report(study)
    text = study.report_dir.read_text()
    assert "# Learning rate x warm-up grid at 32 blocks (73 runs)" in text
    for row in GRID_ROWS:
        assert row in text
    # the committed report is this report (regenerated by study.py, not edited by hand)
    committed = (REPO / "docs/results/grid/grid.md").read_text()
    assert committed == text.replace(f"`{study.summaries}`", "`docs/results/grid/runs`")


@pytest.mark.parametrize(
    "name", ["placement_grid", "lr_transfer", "budget_x1", "budget_x4", "moe", "collapse"]
)
def test_committed_studies_load(name):
    study = load_study(name, REPO / "conf")
    assert study.dir == Path("outputs/studies") / name


def test_the_representation_table_is_recomputed_from_the_64_block_summaries():
    """Each variant's best cell at 64 blocks: the mean over its runs of the mean consecutive-block
    cosine of the last 16 blocks, read here straight from the committed summaries."""
    study = load_study("placement_grid", REPO / "conf")
    study.summaries = REPO / study.summaries
    r = Report(study, load_summaries(study.summaries))
    runs = r.best_runs_at_depth(64)
    names = {variant: sorted(run["name"] for run in rs) for variant, rs in runs.items()}
    assert names["prenorm"] == ["prenorm_L64_lr6e-3_w300_s1", "prenorm_L64_lr6e-3_w300_s2"]
    table = r.representation_table(runs)
    for name in ("prenorm", "spannorm"):
        files = sorted((REPO / "docs/results/grid/runs").glob(f"{name}_L64_lr6e-3_w300_s*.json"))
        quarter = [json.loads(f.read_text())["profiles"]["cos"][-16:] for f in files]
        means = [sum(q) / len(q) for q in quarter]
        expected = sum(means) / len(means)
        row = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
        assert f"{expected:.4f}" in row.split("|")[3], (row, expected)


def test_a_study_of_deep_runs_alone_reports_their_representations(tmp_path):
    """Depth set once for the whole study (its overrides, no depth stage): the report still has the
    representations of its runs, each variant at its best cell (here lr 3e-3 for prenorm)."""
    runs = []
    for norm, lr, seed, loss in [
        ("prenorm", 3e-3, 1, 4.9),
        ("prenorm", 6e-3, 1, 5.0),
        ("spannorm", 6e-3, 1, 4.7),
    ]:
        run = summary(norm, lr, 300, seed, loss, layers=64)
        erank = 20.0 if (norm, lr) == ("prenorm", 3e-3) else 40.0 if norm == "spannorm" else 99.0
        run["profiles"] = {"cos": [0.5] * 48 + [0.9] * 16, "erank": [10.0] * 63 + [erank]}
        runs.append(run)
    directory = tmp_path / "runs"
    directory.mkdir()
    for run in runs:
        (directory / f"{run['name']}.json").write_text(json.dumps(run))
    (tmp_path / "study.yaml").write_text(
        STUDY.split("stages:")[0].replace("variants:", "overrides: {model.n_layers: 64}\nvariants:")
        + "summaries: runs\nreport: out/deep.md\n"
    )
    study = load_study(str(tmp_path / "study.yaml"), REPO / "conf")
    study.summaries, study.report_dir = directory, tmp_path / "out" / "deep.md"
    written = report(study)
    assert tmp_path / "out" / "representations.png" in written
    text = (tmp_path / "out" / "deep.md").read_text()
    section = text.split("## Representations at the end of training (64 blocks")[1]
    prenorm = next(line for line in section.splitlines() if line.startswith("| prenorm |"))
    assert "0.9000" in prenorm and "20.0000" in prenorm, prenorm  # not the 6e-3 run's 99


def test_keeping_one_depths_best_cell_at_another_is_the_difference_of_the_cell_means(tmp_path):
    """The grid at two depths: each variant's loss at a depth when it runs the other depth's best
    cell, against its own best there (the cost of not adjusting the learning rate)."""
    runs = [
        summary("prenorm", 3e-3, 150, 1, 4.90, layers=8),
        summary("prenorm", 3e-3, 150, 2, 4.80, layers=8),  # best at 8: 4.85
        summary("prenorm", 6e-3, 150, 1, 4.95, layers=8),
        summary("prenorm", 6e-3, 150, 2, 4.91, layers=8),  # 4.93
        summary("prenorm", 3e-3, 150, 1, 5.10, layers=16),
        summary("prenorm", 3e-3, 150, 2, 5.00, layers=16),  # 5.05
        summary("prenorm", 6e-3, 150, 1, 4.70, layers=16),
        summary("prenorm", 6e-3, 150, 2, 4.74, layers=16),  # best at 16: 4.72
        summary("spannorm", 3e-3, 150, 1, 4.60, layers=8),
        summary("spannorm", 3e-3, 150, 1, 4.60, layers=16),  # spannorm: one cell, best at both
    ]
    directory = tmp_path / "runs"
    directory.mkdir()
    for run in runs:
        (directory / f"{run['name']}.json").write_text(json.dumps(run))
    text = STUDY.split("stages:")[0] + (
        "stages:\n  - {name: tune, set: {model.n_layers: [8, 16]}}\nmin_seeds: 1\n"
        "summaries: runs\nreport: out/depths.md\n"
    )
    (tmp_path / "study.yaml").write_text(text)
    study = load_study(str(tmp_path / "study.yaml"), REPO / "conf")
    study.summaries, study.report_dir = directory, tmp_path / "out" / "depths.md"
    report(study)
    page = (tmp_path / "out" / "depths.md").read_text()
    section = page.split("## Keeping one setting's best cell at the others")[1].split("\n## ")[0]
    prenorm = section.split("prenorm:")[1].split("spannorm:")[0]
    rows = [line for line in prenorm.splitlines() if line.startswith("| blocks")]
    # tuned at 8 (lr 3e-3) used at 16: 5.05 - 4.72; tuned at 16 (lr 6e-3) used at 8: 4.93 - 4.85
    assert rows[0].split("|")[2:4] == [" 0 (its best) ", " +0.3300 (2) "], rows
    assert rows[1].split("|")[2:4] == [" +0.0800 (2) ", " 0 (its best) "], rows
    assert (
        "| blocks 8: lr 3e-3, warm-up 150 | 0 (its best) | 0 (its best) |"
        in section.split("spannorm:")[1]
    )
