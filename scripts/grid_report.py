"""Tables and figures of the lr x warm-up grid and the depth runs, from per-run summaries
(scripts/sweep_summary.py; docs/results/grid/runs/ holds the committed ones).

    .venv/bin/python scripts/grid_report.py docs/results/grid/runs --out docs/results/grid
"""

from __future__ import annotations

import argparse
from pathlib import Path

from spannorm.analysis.grid import best_cell, by_cell, load_summaries, lr_text, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("summaries", type=Path, help="directory of run summaries (*.json)")
    parser.add_argument("--out", type=Path, help="where grid.md and figures go")
    parser.add_argument(
        "--band",
        type=float,
        default=0.05,
        help="a placement's band: cells whose mean is within this of its best",
    )
    parser.add_argument(
        "--best",
        metavar="NORM",
        help="print NORM's best 32-block cell so far as 'LR WARMUP' (for run_sweeps.sh) and exit",
    )
    args = parser.parse_args()
    if args.best:
        cell = best_cell(by_cell(load_summaries(args.summaries)), args.best)
        if cell is None:
            raise SystemExit(f"error: no finished 32-block run of {args.best} in {args.summaries}")
        print(f"{lr_text(cell.lr)} {cell.warmup}")
        return
    if args.out is None:
        parser.error("--out is required (where grid.md and its figures go)")
    for path in report(args.summaries, args.out, args.band):
        print(path)


if __name__ == "__main__":
    main()
