"""The default corpus: 38 Shakespeare plays, built at first use into `data_dir/shakespeare`."""

from __future__ import annotations

from pathlib import Path

from ..shakespeare import ensure_shakespeare
from .files import FileSource


class ShakespeareSource(FileSource):
    """Plain text read as the `text` source reads it (samples split by `sample_by`)."""

    names = ("shakespeare",)

    @property
    def builder(self) -> str:
        return "text"

    def files(self) -> dict[str, list[Path]]:
        train_path, validation_path = ensure_shakespeare(self.data_dir)
        return {"train": [train_path], "validation": [validation_path]}
