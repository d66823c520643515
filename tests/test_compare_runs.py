"""scripts/compare_runs.py on two real tiny runs: a multirun directory and a list of run dirs."""

from __future__ import annotations

import pytest
from conftest import run_entry, tiny_overrides

from spannorm.analysis.compare import compare

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def sweep(tiny_corpus, tmp_path_factory):
    sweep_dir = tmp_path_factory.mktemp("sweep")
    overrides = tiny_overrides(tiny_corpus, "trainer.max_steps=10", "trainer.val_check_interval=5")
    run_entry(
        "train.py",
        "-m",
        *overrides,
        "model.norm=prenorm,spannorm",
        f"hydra.sweep.dir={sweep_dir}",
    )
    return sweep_dir


def test_compare_a_multirun_writes_the_table_and_the_plots(sweep, tmp_path):
    out = tmp_path / "report"
    result = run_entry("scripts/compare_runs.py", str(sweep), "--out", str(out))
    written = result.stdout.split()
    assert written == [
        str(out / name) for name in ("runs.md", "loss_curves.png", "final_val_loss_by_group.png")
    ]
    report = (out / "runs.md").read_text()
    header = report.splitlines()[2]
    assert header.startswith("| run | model.norm | final val loss | best val loss |"), header
    assert "| 0 | prenorm |" in report and "| 1 | spannorm |" in report
    assert report.count("| no | 0 |") == 2  # neither diverged, no spikes
    for plot in written[1:]:
        with open(plot, "rb") as image:
            assert image.read(8) == PNG_SIGNATURE


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
