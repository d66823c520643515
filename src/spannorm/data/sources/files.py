"""Local files: plain text split into samples (`text`), JSON lines or parquet rows (`json`,
`parquet`: the samples are the column `text_field`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

from .base import SPLIT_KEYS, SPLITS, TextSource, short_hash

SAMPLE_BY = ("paragraph", "line", "document")


@contextmanager
def _progress_bars_off(datasets) -> Iterator[None]:
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


class FileSource(TextSource):
    """`train_files` and `validation_files` (a path or a list), read by the `datasets` builder of
    the same name as the source (`builder`), streamed: never copied or held in memory."""

    names = ("text", "json", "parquet")
    options: ClassVar[dict[str, Any]] = {
        "train_files": None,
        "validation_files": None,
        "sample_by": "paragraph",
        "text_field": "text",
    }

    def check(self) -> None:
        if self.sample_by not in SAMPLE_BY:
            raise ValueError(
                f"data.sample_by={self.sample_by!r} is not a sample_by mode; "
                f"choose one of: {', '.join(SAMPLE_BY)}"
            )

    @property
    def builder(self) -> str:
        return self.name

    @property
    def column(self) -> str:  # the text builder names its one column "text"
        return "text" if self.builder == "text" else self.text_field

    def files(self) -> dict[str, list[Path]]:
        return {
            split: self._checked_files(SPLIT_KEYS[split], getattr(self, SPLIT_KEYS[split]))
            for split in SPLITS
        }

    def _checked_files(self, key: str, value: list[str] | str | None) -> list[Path]:
        paths = self.checked_paths(key, value)
        for path in paths:
            if not path.is_file():
                raise ValueError(f"data.{key}: {path} is a directory; give text files")
            if path.stat().st_size == 0:
                raise ValueError(f"data.{key}: {path} is empty")
        return paths

    def key(self, files: dict[str, list[Path]], file_hash) -> str:
        identity: dict[str, Any] = {
            "builder": self.builder,
            "files": {split: [file_hash(path) for path in paths] for split, paths in files.items()},
        }
        if self.builder == "text":
            identity["sample_by"] = self.sample_by
        else:
            identity["text_field"] = self.text_field
        return short_hash(identity)

    def plain_text_files(self, files: dict[str, list[Path]]) -> list[Path] | None:
        return files["train"] if self.builder == "text" else None

    def open(self, files: dict[str, list[Path]]) -> dict[str, Any]:
        # `datasets` reads local files with its packaged builders, without the hub
        import datasets

        options = {"sample_by": self.sample_by} if self.builder == "text" else {}
        with _progress_bars_off(datasets):
            return datasets.load_dataset(
                self.builder,
                data_files={split: [str(path) for path in paths] for split, paths in files.items()},
                streaming=True,
                **options,
            )
