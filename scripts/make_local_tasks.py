"""Build two offline lm-eval tasks from held-out text (see spannorm.analysis.local_tasks):

    .venv/bin/python scripts/make_local_tasks.py data/shakespeare/validation.txt tasks/shakespeare
    python eval.py ckpt_path=<run> tasks=[shakespeare_next_line,shakespeare_ppl] \
        include_path=tasks/shakespeare
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from spannorm.analysis.local_tasks import write_local_tasks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("text", type=Path, help="a held-out plain-text file (not trained on)")
    parser.add_argument("out", type=Path, help="folder for the task YAMLs and their JSONL data")
    parser.add_argument("--name", default="shakespeare", help="task name prefix")
    parser.add_argument("-n", type=int, default=500, help="examples per task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--overwrite", action="store_true", help="replace task files of the same names in OUT"
    )
    args = parser.parse_args()
    if not args.text.is_file():
        print(f"error: {args.text} is not a file; give a held-out plain-text file", file=sys.stderr)
        sys.exit(2)
    try:
        text = args.text.read_text(encoding="utf-8")
        written = write_local_tasks(
            text, args.out, args.name, n=args.n, seed=args.seed, overwrite=args.overwrite
        )
    except (OSError, ValueError) as error:  # an unreadable text, task files in the way
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    for task in written:
        print(f"{task}: {args.out / (task + '.yaml')}")


if __name__ == "__main__":
    main()
