"""Compare runs: a markdown table (settings that differ, final and best val loss, steps, tokens/s,
divergence, loss spikes), loss curves, the final val loss per group and, for runs evaluated with
`eval.py tasks=[...]`, their downstream metrics (eval/).

    .venv/bin/python scripts/compare_runs.py outputs/multirun/<sweep> --group-by model.norm
    .venv/bin/python scripts/compare_runs.py outputs/sweeps/lr/* --pivot optim.lr
    .venv/bin/python scripts/compare_runs.py outputs/runs/<run a> outputs/runs/<run b> --out cmp
"""

from __future__ import annotations

import argparse
from pathlib import Path

from spannorm.analysis.compare import compare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "paths", nargs="+", type=Path, help="run directories or multirun directories"
    )
    parser.add_argument(
        "--group-by",
        default="model.norm",
        help="config key to color and group by; several: comma-separated (model.norm,seed)",
    )
    parser.add_argument(
        "--pivot", help="config key for a groups x values table and plot (e.g. optim.lr)"
    )
    parser.add_argument(
        "--out", type=Path, help="output directory (default: <runs' parent>/compare)"
    )
    args = parser.parse_args()
    for path in compare(args.paths, args.group_by, args.out, args.pivot):
        print(path)


if __name__ == "__main__":
    main()
