"""Token ids tokenized elsewhere: nanoGPT's flat uint16 `.bin` files, or shard directories this
project wrote (copied from another machine, say), read as they are."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..shards import INDEX, TokenFile, index_files, read_index
from .base import SPLIT_KEYS, SPLITS, TokenSource

# nanoGPT's train.bin/val.bin: flat little-endian uint16 token ids, no header.
FLAT_TOKENS_DTYPE = "uint16"


def token_files_at(key: str, path: Path) -> list[TokenFile]:
    """The token files of a `data=tokens` path: a shard directory's (by its index), or a flat
    uint16 file (nanoGPT's `.bin`)."""
    if path.is_dir():
        if not (path / INDEX).is_file():
            raise ValueError(
                f"data.{key}: {path} is a directory without {INDEX}; give a shard directory "
                "this project wrote (data/cache/tokens-*-train) or nanoGPT-style .bin files"
            )
        return index_files(path)
    size = path.stat().st_size
    itemsize = np.dtype(FLAT_TOKENS_DTYPE).itemsize
    if size == 0 or size % itemsize:
        raise ValueError(
            f"data.{key}: {path} has {size} bytes, not a whole number of {FLAT_TOKENS_DTYPE} "
            "token ids; data=tokens reads flat uint16 files (nanoGPT's train.bin) or shard "
            "directories"
        )
    return [TokenFile(path, FLAT_TOKENS_DTYPE, size // itemsize)]


def vocab_size_of_tokens(files: list[str] | str, vocab_size: int | None) -> int:
    """The vocabulary of pre-tokenized files: `vocab_size` if given, else their indexes'."""
    if vocab_size:
        return vocab_size
    paths = [files] if isinstance(files, (str, os.PathLike)) else files
    sizes = set()
    for path in map(Path, paths):
        if not (path / INDEX).is_file():
            raise ValueError(
                f"data.vocab_size is not set and {path} has no {INDEX} to read it from; "
                "give data.vocab_size (50257 for GPT-2's tokens)"
            )
        sizes.add(read_index(path)["vocab_size"])
    return max(sizes)


class TokenFiles(TokenSource):
    """`train_files` / `validation_files`: each a `.bin` file, a shard directory, or a list."""

    names = ("tokens",)
    options: ClassVar[dict[str, Any]] = {"train_files": None, "validation_files": None}

    @classmethod
    def vocab_size_of(cls, data: Any) -> int:
        return vocab_size_of_tokens(data.train_files, data.get("vocab_size"))

    def token_files(self, vocab_size: int | None) -> tuple[dict[str, list[TokenFile]], int]:
        paths = {
            split: self.checked_paths(key, getattr(self, key)) for split, key in SPLIT_KEYS.items()
        }
        vocab_size = vocab_size_of_tokens([str(p) for p in paths["train"]], vocab_size)
        files = {
            split: [
                file for path in paths[split] for file in token_files_at(SPLIT_KEYS[split], path)
            ]
            for split in SPLITS
        }
        return files, vocab_size
