"""Tables and figures of the lr x warm-up grid and the depth runs, from per-run summaries
(scripts/sweep_summary.py; docs/results/grid/runs/ holds the committed ones).

    .venv/bin/python scripts/grid_report.py docs/results/grid/runs --out docs/results/grid
"""

from __future__ import annotations

import argparse
from pathlib import Path

from spannorm.analysis.grid import report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("summaries", type=Path, help="directory of run summaries (*.json)")
    parser.add_argument("--out", type=Path, required=True, help="where grid.md and figures go")
    parser.add_argument(
        "--band",
        type=float,
        default=0.05,
        help="a placement's band: cells whose mean is within this of its best",
    )
    args = parser.parse_args()
    for path in report(args.summaries, args.out, args.band):
        print(path)


if __name__ == "__main__":
    main()
