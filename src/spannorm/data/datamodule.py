"""The LightningDataModule: load a corpus, tokenize and cache it, serve packed next-token blocks."""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import logging
import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from spannorm.files import atomic_output

from .sampling import EpochShuffle, ResumableLoader
from .shakespeare import ensure_shakespeare
from .tokenizer import TOKENIZER_KINDS, Tokenizer, build_tokenizer, file_sha256

log = logging.getLogger(__name__)

SPLITS = ("train", "validation")
# The `datasets` builder that reads each local source.
LOCAL_BUILDERS = {"shakespeare": "text", "text": "text", "json": "json", "parquet": "parquet"}
SOURCES = (*LOCAL_BUILDERS, "hub")
SAMPLE_BY = ("paragraph", "line", "document")
# Bump when a change to tokenization makes cached token arrays stale.
TOKENS_FORMAT_VERSION = 1
ENCODE_BATCH_SIZE = 1024


def _short_hash(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _check_choice(key: str, value: str, what: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(
            f"data.{key}={value!r} is not a {what}; choose one of: {', '.join(choices)}"
        )


def _import_datasets(offline: bool):
    """`datasets`, imported with HF_HUB_OFFLINE=1 (unless set) when only local files are read."""
    if offline:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets

    return datasets


@contextmanager
def _progress_bars_off(datasets) -> Iterator[None]:
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _read_token_cache(path: Path) -> np.ndarray | None:
    """The cached tokens at `path` if they match their JSON record; None (warning unless both files
    are simply absent) otherwise."""
    record_path = path.with_suffix(".json")
    if not path.exists() and not record_path.exists():
        return None
    try:
        record = json.loads(record_path.read_text())
        tokens = np.load(path, mmap_mode="r")
        if record.get("format") != TOKENS_FORMAT_VERSION or tokens.ndim != 1:
            problem = "of another format"
        elif len(tokens) != record["tokens"]:
            problem = f"{len(tokens)} tokens where its record says {record['tokens']}"
        elif hashlib.sha256(memoryview(tokens)).hexdigest() != record["sha256"]:
            problem = "different from its recorded sha256"
        else:
            return tokens
    except (OSError, ValueError, EOFError, KeyError, TypeError) as error:
        problem = f"unreadable ({type(error).__name__})"
    log.warning("token cache %s is %s; rebuilding it", path, problem)
    return None


def _write_token_cache(path: Path, tokens: np.ndarray) -> None:
    """Write `tokens` to `path` (.npy) and its record (.json: count, sha256), each atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        np.save(f, tokens)
    record = {
        "tokens": len(tokens),
        "dtype": str(tokens.dtype),
        "sha256": hashlib.sha256(memoryview(tokens)).hexdigest(),
        "format": TOKENS_FORMAT_VERSION,
    }
    with atomic_output(path.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(record, indent=1))


class PackedBlocks(Dataset):
    """Non-overlapping blocks of `seq_len + 1` tokens as int64 pairs (x, y), y = x shifted by 1."""

    def __init__(self, tokens: np.ndarray, seq_len: int, split: str = "data") -> None:
        if len(tokens) < seq_len + 1:
            raise ValueError(
                f"the {split} split has {len(tokens)} tokens, but data.seq_len={seq_len} needs at "
                f"least {seq_len + 1}; lower data.seq_len or give more text"
            )
        self.tokens = tokens
        self.seq_len = seq_len

    def __len__(self) -> int:
        return len(self.tokens) // (self.seq_len + 1)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"block {index} of {len(self)}")
        start = index * (self.seq_len + 1)
        block = torch.from_numpy(self.tokens[start : start + self.seq_len + 1].astype(np.int64))
        return block[:-1], block[1:]


class TextDataModule(L.LightningDataModule):
    """Text from a corpus, tokenized once into cached token arrays, served as packed blocks.

    `source` is `shakespeare` (built on first use), `text` (samples split by `sample_by`),
    `json` or `parquet` (column `text_field`) from local `train_files`/`validation_files`, or
    `hub` (`hub_name`, `hub_config`). Each sample is followed by `separator` (and EOS when
    `append_eos`) and the samples of a split are concatenated. Everything is cached under
    `data_dir`, keyed by the data's contents and every setting that changes the tokens.
    """

    def __init__(
        self,
        source: str = "shakespeare",
        train_files: list[str] | str | None = None,
        validation_files: list[str] | str | None = None,
        text_field: str = "text",
        hub_name: str | None = None,
        hub_config: str | None = None,
        hub_streaming: bool = False,
        hub_max_train_docs: int | None = None,
        tokenizer: str = "bpe",
        vocab_size: int = 8192,
        seq_len: int = 128,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        global_batch_size: int | None = None,
        separator: str = "\n\n",
        append_eos: bool = False,
        sample_by: str = "paragraph",
        data_dir: str = "data",
        num_workers: int = 0,
        seed: int = 1337,
    ) -> None:
        super().__init__()
        _check_choice("source", source, "source", SOURCES)
        _check_choice("tokenizer", tokenizer, "tokenizer", TOKENIZER_KINDS)
        _check_choice("sample_by", sample_by, "sample_by mode", SAMPLE_BY)
        self.source = source
        self.train_files = train_files
        self.validation_files = validation_files
        self.text_field = text_field
        self.hub_name = hub_name
        self.hub_config = hub_config
        self.hub_streaming = hub_streaming
        self.hub_max_train_docs = hub_max_train_docs
        self.tokenizer_kind = tokenizer
        self.bpe_vocab_size = vocab_size
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.global_batch_size = global_batch_size  # the CLI derives accumulation from it
        self.separator = separator
        self.append_eos = append_eos
        self.sample_by = sample_by
        self.data_dir = Path(data_dir)
        self.cache_dir = self.data_dir / "cache"
        self.num_workers = num_workers
        self.seed = seed
        self.tokenizer: Tokenizer | None = None
        self.train_tokens: np.ndarray | None = None
        self.val_tokens: np.ndarray | None = None
        self.train_set: PackedBlocks | None = None
        self.val_set: PackedBlocks | None = None

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary size (known after `setup`)."""
        if self.tokenizer is None:
            raise RuntimeError("TextDataModule.vocab_size is known only after setup()")
        return self.tokenizer.vocab_size

    # ---- Lightning hooks

    def prepare_data(self) -> None:
        """Build the corpus, the tokenizer and the token caches (whatever is missing)."""
        self._build_or_load()

    def setup(self, stage: str | None = None) -> None:
        """Load tokenizer and tokens (building them if `prepare_data` has not) and the blocks."""
        if self.train_tokens is not None:
            return
        tokenizer, tokens = self._build_or_load()
        self.train_set = PackedBlocks(tokens["train"], self.seq_len, "train")
        self.val_set = PackedBlocks(tokens["validation"], self.seq_len, "validation")
        if len(self.train_set) < self.batch_size:
            raise ValueError(
                f"the train split makes {len(self.train_set)} blocks of data.seq_len+1 tokens, "
                f"fewer than data.batch_size={self.batch_size}; lower one of them"
            )
        self.tokenizer = tokenizer
        self.train_tokens, self.val_tokens = tokens["train"], tokens["validation"]

    def train_dataloader(self) -> DataLoader:
        # shuffled by (seed, epoch) and resumable in mid-epoch: see .sampling
        shuffle_order = EpochShuffle(self.train_set, self.seed, **self._data_parallel_rank())
        return self._loader(
            self.train_set, self.batch_size, ResumableLoader, sampler=shuffle_order, drop_last=True
        )

    def _data_parallel_rank(self) -> dict[str, int]:
        """This process's place among the data-parallel ones: {num_replicas, rank}."""
        strategy = getattr(self.trainer, "strategy", None)
        return getattr(strategy, "distributed_sampler_kwargs", None) or {}

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.eval_batch_size, shuffle=False, drop_last=False)

    def _loader(
        self, dataset: PackedBlocks, batch_size: int, loader=DataLoader, **options: Any
    ) -> DataLoader:
        return loader(
            dataset,
            batch_size=batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=False,
            **options,
        )

    # ---- Public helpers

    def load_tokenizer(self) -> Tokenizer:
        """The configured tokenizer, from its cache (trained on the train split if missing)."""
        files = self._split_files()
        source_key = self._source_key(files)
        return self._tokenizer(files, source_key, functools.cache(lambda: self._load_splits(files)))

    def unigram_baseline(self) -> float:
        """Cross-entropy (nats/token) of the validation tokens under the add-one smoothed unigram
        distribution of the train tokens: the loss of a model that learned only frequencies."""
        if self.train_tokens is None:
            raise RuntimeError("TextDataModule.unigram_baseline() needs setup() first")
        train_counts = np.bincount(self.train_tokens, minlength=self.vocab_size)
        val_counts = np.bincount(self.val_tokens, minlength=self.vocab_size)
        log_probs = np.log(train_counts + 1.0) - np.log(train_counts.sum() + self.vocab_size)
        return float(-(val_counts * log_probs).sum() / val_counts.sum())

    # ---- Building and caching

    def _build_or_load(self) -> tuple[Tokenizer, dict[str, np.ndarray]]:
        files = self._split_files()
        source_key = self._source_key(files)
        # Loaded at most once per build, and only if some cache is missing.
        splits = functools.cache(lambda: self._load_splits(files))
        tokenizer = self._tokenizer(files, source_key, splits)
        key = _short_hash(
            {
                "source": source_key,
                "tokenizer": tokenizer.fingerprint,
                "separator": self.separator,
                "append_eos": self.append_eos,
                "format": TOKENS_FORMAT_VERSION,
            }
        )
        tokens = {}
        for split in SPLITS:
            path = self.cache_dir / f"tokens-{key}-{split}.npy"
            cached = _read_token_cache(path)
            if cached is None:
                _write_token_cache(path, self._tokenize(splits()[split], split, tokenizer))
                cached = np.load(path, mmap_mode="r")
                print(f"tokenized the {split} split: {len(cached):,} tokens -> {path}")
            tokens[split] = cached
        return tokenizer, tokens

    def _split_files(self) -> dict[str, list[Path]] | None:
        """Each split's local files (building the Shakespeare corpus if needed); None for hub."""
        if self.source == "shakespeare":
            train_path, validation_path = ensure_shakespeare(self.data_dir)
            return {"train": [train_path], "validation": [validation_path]}
        if self.source == "hub":
            if not self.hub_name:
                raise ValueError("data.source='hub' needs data.hub_name=<a HuggingFace dataset>")
            return None
        return {
            "train": self._checked_files("train_files", self.train_files),
            "validation": self._checked_files("validation_files", self.validation_files),
        }

    def _checked_files(self, key: str, value: list[str] | str | None) -> list[Path]:
        if not value:
            raise ValueError(
                f"data.{key} is not set; data.source={self.source!r} needs it "
                f"(data.{key}=<file> or a list of files)"
            )
        paths = [Path(value)] if isinstance(value, (str, os.PathLike)) else [Path(v) for v in value]
        for path in paths:
            if not path.is_file():
                raise FileNotFoundError(f"data.{key}: {path} does not exist")
            if path.stat().st_size == 0:
                raise ValueError(f"data.{key}: {path} is empty")
        return paths

    def _source_key(self, files: dict[str, list[Path]] | None) -> str:
        """A hash of what the samples are: file contents and reading options, or the hub dataset."""
        if files is None:
            return _short_hash(
                {
                    "hub": [self.hub_name, self.hub_config],
                    "max_train_docs": self.hub_max_train_docs,
                    "text_field": self.text_field,
                }
            )
        builder = LOCAL_BUILDERS[self.source]
        identity = {
            "builder": builder,
            "files": {
                split: [file_sha256(path) for path in paths] for split, paths in files.items()
            },
        }
        if builder == "text":
            identity["sample_by"] = self.sample_by
        else:
            identity["text_field"] = self.text_field
        return _short_hash(identity)

    def _tokenizer(
        self, files: dict[str, list[Path]] | None, source_key: str, splits: Callable[[], dict]
    ) -> Tokenizer:
        if files is not None and LOCAL_BUILDERS[self.source] == "text":
            training_files = files["train"]
        elif self.tokenizer_kind == "bpe":
            training_files = [self._train_text_file(source_key, splits)]
        else:
            training_files = []
        return build_tokenizer(
            self.tokenizer_kind, training_files, self.cache_dir, self.bpe_vocab_size
        )

    def _train_text_file(self, source_key: str, splits: Callable[[], dict]) -> Path:
        """The train samples as one plain-text file, for BPE training on json/parquet/hub data."""
        path = self.cache_dir / f"train-text-{source_key}.txt"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
                for texts in self._sample_batches(splits()["train"], "train"):
                    f.writelines(text + self.separator for text in texts)
            print(f"wrote the train samples for BPE training -> {path}")
        return path

    def _load_splits(self, files: dict[str, list[Path]] | None) -> dict[str, Any]:
        """The train and validation splits as `datasets` (iterable) datasets."""
        if files is None:
            self._check_hub_reachable()
            datasets = _import_datasets(offline=False)
            loaded = datasets.load_dataset(
                self.hub_name, self.hub_config, streaming=self.hub_streaming
            )
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
        datasets = _import_datasets(offline=True)
        builder = LOCAL_BUILDERS[self.source]
        options = {"sample_by": self.sample_by} if builder == "text" else {}
        with _progress_bars_off(datasets):
            return datasets.load_dataset(
                builder,
                data_files={split: [str(path) for path in paths] for split, paths in files.items()},
                cache_dir=str(self.data_dir / "hf_cache"),
                # `datasets` keys local files by path and mtime, so its cache can be stale where
                # ours (keyed by content) is not; we only get here when ours missed, so reread.
                download_mode="force_redownload",
                **options,
            )

    def _check_hub_reachable(self) -> None:
        try:
            socket.create_connection(("huggingface.co", 443), timeout=3).close()
        except OSError:
            raise ConnectionError(
                f"data.hub_name={self.hub_name!r} needs the HuggingFace hub, which is unreachable "
                "from here; offline, use data=text data.train_files=<file> "
                "data.validation_files=<file> (or data=json / data=parquet)"
            ) from None

    def _sample_batches(self, dataset, split: str) -> Iterator[list[str]]:
        """The split's samples, in batches of `ENCODE_BATCH_SIZE`."""
        column = "text" if LOCAL_BUILDERS.get(self.source) == "text" else self.text_field
        for batch in dataset.iter(batch_size=ENCODE_BATCH_SIZE):
            if column not in batch:
                raise ValueError(
                    f"data.text_field={column!r} is not a column of the {split} split "
                    f"(it has: {', '.join(batch)})"
                )
            yield batch[column]

    def _tokenize(self, dataset, split: str, tokenizer: Tokenizer) -> np.ndarray:
        """All samples of a split, each followed by the separator (and EOS), as one token array."""
        dtype = np.uint16 if tokenizer.vocab_size <= 65535 else np.int32
        eos = [tokenizer.eos_id] if self.append_eos else []
        pieces = [np.empty(0, dtype=dtype)]
        for texts in self._sample_batches(dataset, split):
            ids = tokenizer.encode_batch([text + self.separator for text in texts])
            pieces.append(np.fromiter(itertools.chain.from_iterable(i + eos for i in ids), dtype))
        return np.concatenate(pieces)
