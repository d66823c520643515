"""File contents hashes, remembered across starts so that a start with its caches in place reads
no source file: a file is re-hashed only when its size, mtime, ctime or inode changed (as git's
index does; ctime changes on every write, even one that restores the mtime)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from spannorm.files import atomic_output

from .tokenizer import file_sha256

MEMO = "file-hashes.json"


def _signature(stat: os.stat_result) -> list[int]:
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino, stat.st_dev]


class FileHashes:
    """sha256 of files, memoized in `<cache_dir>/file-hashes.json`."""

    def __init__(self, cache_dir: Path) -> None:
        self.path = Path(cache_dir) / MEMO
        try:
            self.memo = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.memo = {}

    def sha256(self, path: str | os.PathLike) -> str:
        key = str(Path(path).resolve())
        signature = _signature(os.stat(key))
        known = self.memo.get(key)
        if isinstance(known, dict) and known.get("stat") == signature:
            return known["sha256"]
        digest = file_sha256(key)
        self.memo[key] = {"stat": signature, "sha256": digest}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(self.path) as tmp:
            tmp.write_text(json.dumps(self.memo, indent=0))
        return digest
