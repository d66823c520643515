"""The interface every source implements. A `TextSource` gives each split's text samples, which
the data module tokenizes and caches; a `TokenSource` gives token files made elsewhere."""

from __future__ import annotations

import hashlib
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

SPLITS = ("train", "validation")
SPLIT_KEYS = {"train": "train_files", "validation": "validation_files"}

# data.source name -> the class serving it, filled as the source modules are imported
REGISTRY: dict[str, type[Source]] = {}


def short_hash(identity: dict[str, Any]) -> str:
    """The 16-hex-digit key of a JSON-able identity (cache directory and file names use it)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


class Source:
    """A kind of corpus. `names` are the `data.source` values it serves; `options` the `data.*`
    keys it reads, with their defaults (each becomes an attribute). Nothing is read until asked."""

    names: ClassVar[tuple[str, ...]] = ()
    options: ClassVar[dict[str, Any]] = {}
    # whether `data.tokenizer` must name a tokenizer (token files need none)
    needs_tokenizer: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in cls.names:
            REGISTRY[name] = cls

    def __init__(self, name: str, data_dir: Path, options: dict[str, Any]) -> None:
        self.name = name
        self.data_dir = Path(data_dir)
        for key, default in self.options.items():
            setattr(self, key, options.get(key, default))
        self.check()

    def check(self) -> None:
        """Check the options (reading nothing); a ValueError saying what is right if one is bad."""

    @classmethod
    def vocab_size_of(cls, data: Any) -> int | None:
        """The vocabulary this source fixes for a `data` config (None: the tokenizer's)."""
        return None

    def checked_paths(self, key: str, value: list[str] | str | None) -> list[Path]:
        """The paths `data.<key>` names, each of which must exist."""
        if not value:
            raise ValueError(
                f"data.{key} is not set; data.source={self.name!r} needs it "
                f"(data.{key}=<file> or a list of files)"
            )
        paths = [Path(value)] if isinstance(value, (str, os.PathLike)) else [Path(v) for v in value]
        for path in paths:
            if not path.exists():
                raise FileNotFoundError(f"data.{key}: {path} does not exist")
        return paths


class TextSource(Source, ABC):
    """Text samples per split, tokenized and cached by the data module."""

    # the column of a batch holding the samples
    column: str = "text"

    def files(self) -> dict[str, list[Path]] | None:
        """Each split's local files (checked, built first if the source builds them); None when
        the samples do not come from local files."""
        return None

    @abstractmethod
    def key(self, files: dict[str, list[Path]] | None, file_hash) -> str:
        """A hash of what the samples are (file contents by `file_hash`, reading options)."""

    @abstractmethod
    def open(self, files: dict[str, list[Path]] | None) -> dict[str, Any]:
        """Each split as a `datasets` (iterable) dataset, read as it is iterated."""

    def plain_text_files(self, files: dict[str, list[Path]] | None) -> list[Path] | None:
        """The train split's files if a tokenizer can be trained on them as they are (plain
        text); None if the train samples must be written out as text first."""
        return None

    def max_tokens(self, split: str) -> int | None:
        """Tokens at which the split stops (None: all of it)."""
        return None

    def batches(self, dataset: Any, split: str, batch_size: int) -> Iterator[list[str]]:
        """The split's samples, `batch_size` at a time; a sample that is not text is an error
        naming the column, the row and what it holds."""
        column = self.column
        row = 0
        for batch in dataset.iter(batch_size=batch_size):
            if column not in batch:
                raise ValueError(
                    f"data.text_field={column!r} is not a column of the {split} split "
                    f"(it has: {', '.join(batch)})"
                )
            texts = batch[column]
            for i, text in enumerate(texts):
                if not isinstance(text, str):
                    raise ValueError(
                        f"data.text_field={column!r}: row {row + i} of the {split} split holds "
                        f"{type(text).__name__} {str(text)[:40]!r}, not text; data.text_field "
                        "must name a column of strings"
                    )
            row += len(texts)
            yield texts


class TokenSource(Source, ABC):
    """Token ids made elsewhere, read as they are."""

    needs_tokenizer = False

    @abstractmethod
    def token_files(self, vocab_size: int | None) -> tuple[dict[str, list], int]:
        """({split: its `TokenFile`s}, the vocabulary) of the given files."""
