"""Check cached token shards against the sha256 their index recorded when they were written.

    python -m spannorm.data verify                  # every token split under data/cache
    python -m spannorm.data verify DIR [DIR ...]    # shard directories, or data dirs / caches

A start reads only the index and the shards' sizes; this re-reads every byte.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .shards import INDEX, read_index, verify_split


def _splits(path: Path) -> list[Path]:
    """The shard directories at or under `path` (a split, a cache dir or a data dir)."""
    if (path / INDEX).is_file():
        return [path]
    found = sorted(index.parent for index in path.glob(f"tokens-*/{INDEX}"))
    return found or sorted(index.parent for index in path.glob(f"cache/tokens-*/{INDEX}"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spannorm.data", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    verify = commands.add_parser("verify", help="re-hash every shard and compare with its index")
    default_dir = Path(os.environ.get("SPANNORM_DATA_DIR", "data")) / "cache"
    verify.add_argument("paths", nargs="*", type=Path, default=[default_dir])
    args = parser.parse_args(argv)

    splits = [split for path in args.paths for split in _splits(path)]
    if not splits:
        print(
            f"error: no token splits (directories with {INDEX}) under {args.paths}", file=sys.stderr
        )
        return 2
    damaged = 0
    for split in splits:
        problems = verify_split(split)
        if problems:
            damaged += 1
            for problem in problems:
                print(f"DAMAGED {problem}")
        else:
            index = read_index(split)
            print(f"ok      {split} ({index['tokens']:,} tokens, {len(index['shards'])} shards)")
    if damaged:
        print(
            f"error: {damaged} of {len(splits)} token splits are damaged; delete each damaged "
            "directory and start again to rebuild it",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
