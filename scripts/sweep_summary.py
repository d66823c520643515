"""Summarize a run directory that has no `summary.json` of its own (runs trained before the
`summary` callback, or with `callbacks=minimal`), in the schema the callback writes
(spannorm.callbacks.summary) and a study reads:

    .venv/bin/python scripts/sweep_summary.py outputs/runs/<run> --baseline 6.3615 \
        --out docs/results/grid/runs/<name>.json
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from spannorm.callbacks.summary import summarize, write_summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument(
        "--baseline",
        type=float,
        required=True,
        help="the unigram baseline (nats) printed by the run",
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    summary = summarize(args.run_dir, args.baseline)
    if not summary["complete"]:
        raise SystemExit(
            f"{args.run_dir} stopped at step {summary['last_step']} before its "
            "max_steps; continue it (resume=auto) before summarizing it"
        )
    write_summary(summary, args.out)
    print(
        f"{args.out}: final val loss {summary['final_val_loss']:.4f}, escape step "
        f"{summary['plateau_escape_step']}"
        if not math.isnan(summary["final_val_loss"])
        else f"{args.out}: no validation"
    )


if __name__ == "__main__":
    main()
