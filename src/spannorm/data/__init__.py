"""The data pipeline: corpora, tokenizers, sharded token storage and the LightningDataModule."""

from .datamodule import PackedBlocks, TextDataModule, data_vocab_size
from .shakespeare import ensure_shakespeare, markdown_to_text
from .shards import ShardError, TokenShards, verify_split
from .tokenizer import (
    BPETokenizer,
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
    build_tokenizer,
    load_tokenizer,
)

__all__ = [
    "BPETokenizer",
    "ByteTokenizer",
    "HFTokenizer",
    "PackedBlocks",
    "ShardError",
    "TextDataModule",
    "TokenShards",
    "Tokenizer",
    "build_tokenizer",
    "data_vocab_size",
    "ensure_shakespeare",
    "load_tokenizer",
    "markdown_to_text",
    "verify_split",
]
