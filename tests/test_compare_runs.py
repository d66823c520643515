"""scripts/compare_runs.py on two real tiny runs: a multirun directory and a list of run dirs."""

from __future__ import annotations

import pytest

from spannorm.analysis.compare import (
    Run,
    compare,
    groups_table,
    pivot_axis,
    pivot_table,
    plot_pivot,
)

from helpers import run_entry, tiny_overrides

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def sweep(tiny_corpus, tmp_path_factory):
    sweep_dir = tmp_path_factory.mktemp("sweep")
    overrides = tiny_overrides(
        tiny_corpus,
        "trainer.max_steps=10",
        "trainer.val_check_interval=5",
        "callbacks.layer_stats.every_n_steps=5",
    )
    run_entry(
        "train.py",
        "-m",
        *overrides,
        "model.norm=prenorm,spannorm",
        f"hydra.sweep.dir={sweep_dir}",
    )
    return sweep_dir


@pytest.mark.slow
def test_compare_a_multirun_writes_the_table_and_the_plots(sweep, tmp_path):
    out = tmp_path / "report"
    result = run_entry("scripts/compare_runs.py", str(sweep), "--out", str(out))
    written = result.stdout.split()
    names = ("runs.md", "loss_curves.png", "final_val_loss_by_group.png", "layer_profiles.png")
    assert written == [str(out / name) for name in names]
    report = (out / "runs.md").read_text()
    header = report.splitlines()[2]
    assert header.startswith("| run | model.norm | final val loss | best val loss |"), header
    assert "| 0 | prenorm |" in report and "| 1 | spannorm |" in report
    assert report.count("| no | 0 |") == 2  # neither diverged, no spikes
    for plot in written[1:]:
        with open(plot, "rb") as image:
            assert image.read(8) == PNG_SIGNATURE


@pytest.mark.slow
def test_compare_a_list_of_run_dirs_and_bad_input(sweep):
    report_file, *_ = compare([sweep / "0", sweep / "1"], group_by="model.norm")
    assert report_file == sweep / "compare" / "runs.md"
    report = report_file.read_text()
    assert "| 0 | prenorm |" in report and "| 1 | spannorm |" in report
    assert "| prenorm | 1 | 0 |" in report and "| spannorm | 1 | 0 |" in report  # the groups
    with pytest.raises(ValueError, match="model.norm"):
        compare([sweep], group_by="model.nrom")
    with pytest.raises(FileNotFoundError, match="neither a run directory"):
        compare([sweep / "compare"], group_by="model.norm")


@pytest.mark.slow
def test_group_by_several_keys(sweep):
    report_file, *_ = compare([sweep], group_by="model.norm,model.n_layers")
    assert "| prenorm / 2 | 1 | 0 | 0 |" in report_file.read_text()


def fake_run(name: str, norm: str, lr: float, val: list[float], diverged_at: int | None = None):
    """A run of 100 steps (max_steps) whose val/loss is logged at steps 49, 99, ... in turn."""
    scalars = {"val/loss": [(49 + 50 * i, v) for i, v in enumerate(val)]}
    if diverged_at is not None:
        scalars["train/diverged"] = [(diverged_at, 1.0)]
    settings = {"model.norm": norm, "optim.lr": lr, "trainer.max_steps": 100}
    return Run(name, settings, scalars)


def test_groups_and_pivot_tables_leave_out_diverged_and_unfinished_runs():
    runs = [
        fake_run("a", "prenorm", 1e-3, [5.0, 4.0]),
        fake_run("b", "prenorm", 1e-3, [5.0, 4.0, 3.9][:2]),
        fake_run("c", "prenorm", 1e-2, [4.5, 3.0]),
        fake_run("d", "postnorm", 1e-3, [6.0]),  # unfinished: its last val/loss is at step 49
        fake_run("e", "postnorm", 1e-2, [6.0], diverged_at=60),
    ]
    groups = {"prenorm": runs[:3], "postnorm": runs[3:]}
    table = groups_table(groups, "model.norm")
    assert "| prenorm | 3 | 0 | 0 | 3.6667 ± 0.5774 | 3.6667 ± 0.5774 | 3.0000 | 4.0000 |" in table
    assert "| postnorm | 2 | 1 | 1 | – | – |" in table
    pivot = pivot_table(groups, "model.norm", "optim.lr")
    assert pivot.splitlines()[0] == "| model.norm \\ optim.lr | 0.001 | 0.01 |"
    assert "| prenorm | 4.0000 ± 0.0000 | 3.0000 |" in pivot
    assert "| postnorm | unfinished | diverged at step 60 |" in pivot


def test_pivot_axis_is_numeric_only_when_every_value_is_a_number(tmp_path):
    assert pivot_axis(["0.001", "0.01"]) == ({"0.001": 0.001, "0.01": 0.01}, True)
    positions, numeric = pivot_axis(["1", "deepnorm", "sqrt2L"])
    assert (positions, numeric) == ({"1": 0.0, "deepnorm": 1.0, "sqrt2L": 2.0}, False)
    runs = [
        fake_run("a", "spannorm", 1e-3, [5.0, 4.0]),
        fake_run("b", "spannorm", 1e-3, [5.0, 4.5]),
    ]
    runs[0].settings["model.alpha"], runs[1].settings["model.alpha"] = 1, "sqrt2L"
    plot = tmp_path / "alpha.png"
    plot_pivot({"0.001": runs}, "optim.lr", "model.alpha", plot)
    assert plot.read_bytes()[:8] == PNG_SIGNATURE
