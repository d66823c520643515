"""The data pipeline: corpora, tokenizers, sharded token storage and the LightningDataModule.

The names below are imported when first used: the tokenizing workers' server process imports
`spannorm.data.build` alone, without Lightning or `datasets`, so it starts (and, when a build is
killed, ends) in a fraction of the time."""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "PackedBlocks": "datamodule",
    "TextDataModule": "datamodule",
    "data_vocab_size": "datamodule",
    "ensure_shakespeare": "shakespeare",
    "markdown_to_text": "shakespeare",
    "ShardError": "shards",
    "TokenShards": "shards",
    "verify_split": "shards",
    "BPETokenizer": "tokenizer",
    "ByteTokenizer": "tokenizer",
    "HFTokenizer": "tokenizer",
    "Tokenizer": "tokenizer",
    "build_tokenizer": "tokenizer",
    "load_tokenizer": "tokenizer",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])
