"""A HuggingFace hub dataset (`hub_name`, `hub_config`), downloaded or streamed."""

from __future__ import annotations

import socket
from typing import Any, ClassVar

from .base import SPLITS, TextSource, short_hash


class HubSource(TextSource):
    """The train and validation splits of a hub dataset, samples in column `text_field`.
    `hub_streaming` reads documents as they are tokenized (never the whole split);
    `hub_max_train_docs` / `hub_max_train_tokens` stop the train split early."""

    names = ("hub",)
    options: ClassVar[dict[str, Any]] = {
        "hub_name": None,
        "hub_config": None,
        "hub_streaming": False,
        "hub_max_train_docs": None,
        "hub_max_train_tokens": None,
        "text_field": "text",
    }

    @property
    def column(self) -> str:
        return self.text_field

    def files(self) -> None:
        if not self.hub_name:
            raise ValueError("data.source='hub' needs data.hub_name=<a HuggingFace dataset>")
        return None

    def key(self, files: None, file_hash) -> str:
        return short_hash(
            {
                "hub": [self.hub_name, self.hub_config],
                "max_train_docs": self.hub_max_train_docs,
                "max_train_tokens": self.hub_max_train_tokens,
                "text_field": self.text_field,
            }
        )

    def max_tokens(self, split: str) -> int | None:
        return self.hub_max_train_tokens if split == "train" else None

    def open(self, files: None) -> dict[str, Any]:
        self._check_reachable()
        import datasets

        loaded = datasets.load_dataset(self.hub_name, self.hub_config, streaming=self.hub_streaming)
        for split in SPLITS:
            if split not in loaded:
                raise ValueError(
                    f"data.hub_name={self.hub_name!r} has no {split!r} split "
                    f"(it has: {', '.join(loaded)})"
                )
        train = loaded["train"]
        if self.hub_max_train_docs is not None:
            train = train.take(self.hub_max_train_docs)
        return {"train": train, "validation": loaded["validation"]}

    def _check_reachable(self) -> None:
        """Fail in seconds, with what to do offline, rather than after `datasets`' retries."""
        try:
            socket.create_connection(("huggingface.co", 443), timeout=3).close()
        except OSError:
            raise ConnectionError(
                f"data.hub_name={self.hub_name!r} needs the HuggingFace hub, which is unreachable "
                "from here; offline, use data=text data.train_files=<file> "
                "data.validation_files=<file> (or data=json / data=parquet)"
            ) from None
