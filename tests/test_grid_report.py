"""The grid report (spannorm.analysis.grid) on summaries written by the test: best cell, band,
plateau escapes, depth plot."""

from __future__ import annotations

import json
import math

from spannorm.analysis.grid import (
    band,
    best_cell,
    by_cell,
    escape_correlation,
    escape_correlation_text,
    escape_points,
    heatmap_range,
    load_summaries,
    paired_by_seed,
    paired_table,
    ranks,
    report,
)


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
    directory = tmp_path / "runs"
    directory.mkdir()
    for run in runs:
        (directory / f"{run['name']}.json").write_text(json.dumps(run).replace("NaN", "null"))
    return directory


def test_best_cell_needs_two_seeds_and_the_band_is_measured_from_it(tmp_path):
    cells = by_cell(load_summaries(write(tmp_path)))
    best = best_cell(cells, "spannorm")
    assert (best.lr, best.warmup) == (3e-3, 150)  # 4.785 over two seeds beats 1e-3's one run
    assert best_cell(cells, "prenorm").lr == 3e-3  # 4.85 against 4.86 at 6e-3
    assert sorted(c.lr for c in band(cells, best, 0.05)) == [1e-3, 3e-3]  # 1e-3: one seed, 4.0


def test_report_writes_tables_with_escapes_and_depth(tmp_path):
    written = report(write(tmp_path), tmp_path / "out")
    names = [p.name for p in written]
    assert names == [
        "grid.md",
        "grid_heatmap.png",
        "loss_vs_depth.png",
        "escape_vs_loss.png",
        "gradient_profiles.png",
    ]
    text = (tmp_path / "out" / "grid.md").read_text()
    assert "| spannorm | lr 3e-3, warm-up 150 | 4.7850 ± 0.0071 (2) |" in text
    assert "| 150 | 4.0000 (1) | 4.7850 ± 0.0071 (2) | 5.5400 ± 1.0748 (2) |" in text
    assert "100, never" in text  # the seed of spannorm at 6e-3 that stayed on the plateau
    # side by side: a row per warm-up and placement that ran there, a cell not run left empty
    assert "| 60, prenorm |" not in text and "| 60, spannorm |  |  |  | – (1) [100] |" in text
    assert "| 150, prenorm |  | 4.8500 ± 0.0707 (2) [100, 100] |" in text
    assert "| 150, spannorm | 4.0000 (1) [100] | 4.7850 ± 0.0071 (2) [100, 100] |" in text
    # the depth table: a row per setting run at two or more depths
    assert "| setting \\ blocks | 32 | 64 |" in text
    assert (
        "| spannorm, lr 3e-3, warm-up 150 | 4.7850 ± 0.0071 (2) [100, 100] | 4.9000 (1) [100] |"
        in text
    )
    assert "at step 50" in text


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
    cells = by_cell(load_summaries(write(tmp_path, runs)))
    pairs = paired_by_seed(cells, "prenorm", "spannorm")
    assert [(c.n_layers, seed) for c, seed, _, _ in pairs] == [(8, 1), (32, 1), (32, 2)]
    assert [round(b - a, 2) for _, _, a, b in pairs[1:]] == [-0.10, 0.05]
    text = paired_table(cells, "prenorm", "spannorm")
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
    points = escape_points(load_summaries(write(tmp_path, runs)))
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
