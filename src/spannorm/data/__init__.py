"""The data pipeline: corpora, tokenizers, cached token arrays and the LightningDataModule."""

from .datamodule import PackedBlocks, TextDataModule
from .shakespeare import ensure_shakespeare, markdown_to_text
from .tokenizer import BPETokenizer, ByteTokenizer, Tokenizer, build_tokenizer, load_tokenizer

__all__ = [
    "BPETokenizer",
    "ByteTokenizer",
    "PackedBlocks",
    "TextDataModule",
    "Tokenizer",
    "build_tokenizer",
    "ensure_shakespeare",
    "load_tokenizer",
    "markdown_to_text",
]
