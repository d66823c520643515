"""The LightningDataModule: load a corpus, tokenize and cache it, serve packed next-token blocks."""

from __future__ import annotations

import codecs
import functools
import hashlib
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

from .build import Encoder, build_split, default_num_proc
from .filehash import FileHashes
from .sampling import EpochShuffle, ResumableLoader
from .shakespeare import ensure_shakespeare
from .shards import INDEX, TokenFile, TokenShards, index_files, read_index, token_dtype
from .tokenizer import (
    EOS_CANDIDATES,
    TOKENIZER_KINDS,
    ByteTokenizer,
    Tokenizer,
    build_tokenizer,
    load_hf_tokenizer,
)

log = logging.getLogger(__name__)

SPLITS = ("train", "validation")
# The `datasets` builder that reads each local source.
LOCAL_BUILDERS = {"shakespeare": "text", "text": "text", "json": "json", "parquet": "parquet"}
SOURCES = (*LOCAL_BUILDERS, "hub", "tokens")
SAMPLE_BY = ("paragraph", "line", "document")
# Bump when a change to tokenization makes cached token arrays stale.
TOKENS_FORMAT_VERSION = 2
# Samples per batch handed to the tokenizer (and the unit a cut build resumes from).
ENCODE_BATCH_SIZE = 1024
# Tokens per shard file: 128 MiB of uint16.
SHARD_TOKENS = 2**26
# nanoGPT's train.bin/val.bin: flat little-endian uint16 token ids, no header.
FLAT_TOKENS_DTYPE = "uint16"


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
def _progress_bar(description: str) -> Iterator[Callable[[int, int], None]]:
    """A progress callback (texts, characters) shown as a bar of characters per second (on a
    terminal), created only when the first batch arrives: a cache hit shows nothing."""
    bar = None

    def update(texts: int, characters: int) -> None:
        nonlocal bar
        if bar is None:
            from tqdm.auto import tqdm

            bar = tqdm(desc=description, unit="char", unit_scale=True, disable=None, leave=False)
        bar.update(characters)

    try:
        yield update
    finally:
        if bar is not None:
            bar.close()


def _token_files(key: str, path: Path) -> list[TokenFile]:
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


@contextmanager
def _progress_bars_off(datasets) -> Iterator[None]:
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _not_utf8(key: str, paths: list[Path]) -> ValueError | None:
    """The error naming the first of `paths` that is not UTF-8 text, or None if all are."""
    for path in paths:
        decoder = codecs.getincrementaldecoder("utf-8")()
        offset = 0
        with open(path, "rb") as f:
            while True:
                chunk = f.read(1 << 20)
                try:
                    decoder.decode(chunk, final=not chunk)
                except UnicodeDecodeError as error:
                    where = offset + error.start
                    return ValueError(
                        f"data.{key}: {path} is not UTF-8 text (byte {where} is "
                        f"{chunk[error.start]:#04x}); text, json and the tokenizers read UTF-8, "
                        "so convert it (iconv -t utf-8), or give token ids with data=tokens"
                    )
                if not chunk:
                    break
                offset += len(chunk)
    return None


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


def data_vocab_size(data: Any) -> int:
    """The vocabulary a model needs for the `data` config, known before any data is built:
    257 for `byte`, the file's for `hf`, `vocab_size` for `bpe` (its most), the token files'."""
    if data.source == "tokens":
        return vocab_size_of_tokens(data.train_files, data.get("vocab_size"))
    if data.tokenizer == "byte":
        return ByteTokenizer.vocab_size
    if data.tokenizer == "hf":
        return load_hf_tokenizer(data.get("tokenizer_file")).vocab_size
    return data.vocab_size


class PackedBlocks(Dataset):
    """Non-overlapping blocks of `seq_len + 1` tokens as int64 pairs (x, y), y = x shifted by 1."""

    def __init__(self, tokens: np.ndarray | TokenShards, seq_len: int, split: str = "data") -> None:
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
    """Text from a corpus, tokenized once into cached token shards, served as packed blocks.

    `source` is `shakespeare` (built on first use), `text` (samples split by `sample_by`),
    `json` or `parquet` (column `text_field`) from local `train_files`/`validation_files`,
    `hub` (`hub_name`, `hub_config`; `hub_streaming` tokenizes documents as they arrive, up to
    `hub_max_train_docs` documents or `hub_max_train_tokens` tokens), or `tokens`: token ids
    tokenized elsewhere (nanoGPT's flat uint16 `.bin` files or this project's shard directories).
    Each sample is followed by `separator` (and EOS when `append_eos`) and the samples of a split
    are concatenated. `num_proc` processes tokenize (null: one per core) into shards of
    `shard_tokens` tokens, cached under `data_dir`, keyed by the data's contents and every setting
    that changes the tokens; `tokenizer` is `bpe` (trained on the train split), `byte`, or `hf`
    (`tokenizer_file`: any HuggingFace `tokenizers` file).
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
        hub_max_train_tokens: int | None = None,
        tokenizer: str | None = "bpe",
        tokenizer_file: str | None = None,
        vocab_size: int | None = 8192,
        seq_len: int = 128,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        global_batch_size: int | None = None,
        separator: str = "\n\n",
        append_eos: bool = False,
        sample_by: str = "paragraph",
        data_dir: str = "data",
        num_workers: int = 0,
        num_proc: int | None = None,
        shard_tokens: int = SHARD_TOKENS,
        seed: int = 1337,
    ) -> None:
        super().__init__()
        _check_choice("source", source, "source", SOURCES)
        if tokenizer is not None or source != "tokens":
            _check_choice("tokenizer", tokenizer, "tokenizer", TOKENIZER_KINDS)
        _check_choice("sample_by", sample_by, "sample_by mode", SAMPLE_BY)
        for key, value in (("num_proc", num_proc), ("shard_tokens", shard_tokens)):
            if value is not None and value <= 0:
                raise ValueError(f"data.{key}={value} must be a positive integer")
        self.source = source
        self.train_files = train_files
        self.validation_files = validation_files
        self.text_field = text_field
        self.hub_name = hub_name
        self.hub_config = hub_config
        self.hub_streaming = hub_streaming
        self.hub_max_train_docs = hub_max_train_docs
        self.hub_max_train_tokens = hub_max_train_tokens
        self.tokenizer_kind = tokenizer
        self.tokenizer_file = tokenizer_file
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
        self.num_proc = num_proc or default_num_proc()
        self.shard_tokens = shard_tokens
        self.seed = seed
        self.tokenizer: Tokenizer | None = None
        self.train_tokens: TokenShards | None = None
        self.val_tokens: TokenShards | None = None
        self.train_set: PackedBlocks | None = None
        self.val_set: PackedBlocks | None = None
        self._vocab_size: int | None = None

    @property
    def vocab_size(self) -> int:
        """The vocabulary of the tokens (known after `setup`)."""
        if self._vocab_size is None:
            raise RuntimeError("TextDataModule.vocab_size is known only after setup()")
        return self._vocab_size

    # ---- Lightning hooks

    def prepare_data(self) -> None:
        """Build the corpus, the tokenizer and the token caches (whatever is missing). Lightning
        calls it in one process per node; the others wait, then `setup` reads the caches."""
        self._build_or_load()

    def setup(self, stage: str | None = None) -> None:
        """Load tokenizer and tokens (building them if `prepare_data` has not) and the blocks."""
        if self.train_tokens is not None:
            return
        tokenizer, tokens, vocab_size = self._build_or_load()
        self.train_set = PackedBlocks(tokens["train"], self.seq_len, "train")
        self.val_set = PackedBlocks(tokens["validation"], self.seq_len, "validation")
        if len(self.train_set) < self.batch_size:
            raise ValueError(
                f"the train split makes {len(self.train_set)} blocks of data.seq_len+1 tokens, "
                f"fewer than data.batch_size={self.batch_size}; lower one of them"
            )
        self.tokenizer, self._vocab_size = tokenizer, vocab_size
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
        if self.source == "tokens":
            if self.tokenizer_kind != "hf":
                raise ValueError(
                    "data=tokens has no tokenizer to turn text into ids; give the one the "
                    "tokens were made with: data.tokenizer=hf data.tokenizer_file=<tokenizer.json>"
                )
            return load_hf_tokenizer(self.tokenizer_file)
        files = self._split_files()
        hashes = FileHashes(self.cache_dir)
        source_key = self._source_key(files, hashes)
        splits = functools.cache(lambda: self._load_splits(files))
        return self._tokenizer(files, source_key, splits, hashes)

    def unigram_baseline(self) -> float:
        """Cross-entropy (nats/token) of the validation tokens under the add-one smoothed unigram
        distribution of the train tokens: the loss of a model that learned only frequencies."""
        if self.train_tokens is None:
            raise RuntimeError("TextDataModule.unigram_baseline() needs setup() first")
        train_counts, val_counts = (
            tokens.counts(self.vocab_size) for tokens in (self.train_tokens, self.val_tokens)
        )
        log_probs = np.log(train_counts + 1.0) - np.log(train_counts.sum() + self.vocab_size)
        return float(-(val_counts * log_probs).sum() / val_counts.sum())

    # ---- Building and caching

    def _build_or_load(self) -> tuple[Tokenizer | None, dict[str, TokenShards], int]:
        """(tokenizer, each split's tokens, vocab size), building what is missing."""
        if self.source == "tokens":
            return self._given_tokens()
        files = self._split_files()
        try:
            tokenizer, tokens = self._tokenized(files)
        except UnicodeDecodeError:
            for split, key in zip(SPLITS, ("train_files", "validation_files"), strict=True):
                if files is not None and (error := _not_utf8(key, files[split])) is not None:
                    raise error from None
            raise
        return tokenizer, tokens, tokenizer.vocab_size

    def _tokenized(self, files: dict[str, list[Path]] | None):
        hashes = FileHashes(self.cache_dir)
        source_key = self._source_key(files, hashes)
        # Loaded at most once per build, and only if some cache is missing.
        splits = functools.cache(lambda: self._load_splits(files))
        tokenizer = self._tokenizer(files, source_key, splits, hashes)
        if self.append_eos and tokenizer.eos_id is None:
            raise ValueError(
                f"data.append_eos=true, but the tokenizer has no end-of-text token "
                f"(none of {', '.join(EOS_CANDIDATES)}); set data.append_eos=false"
            )
        key = _short_hash(
            {
                "source": source_key,
                "tokenizer": tokenizer.fingerprint,
                "separator": self.separator,
                "append_eos": self.append_eos,
                "format": TOKENS_FORMAT_VERSION,
            }
        )
        encoder = Encoder(
            tokenizer,
            self.separator,
            tokenizer.eos_id if self.append_eos else None,
            token_dtype(tokenizer.vocab_size),
        )
        record = {"vocab_size": tokenizer.vocab_size, "tokenizer": tokenizer.fingerprint}
        tokens = {}
        for split in SPLITS:
            directory = self.cache_dir / f"tokens-{key}-{split}"
            with _progress_bar(f"tokenizing the {split} split") as progress:
                built = build_split(
                    directory,
                    lambda split=split: self._sample_batches(splits()[split], split),
                    encoder,
                    shard_tokens=self.shard_tokens,
                    num_proc=self.num_proc,
                    record=record,
                    max_tokens=self.hub_max_train_tokens if split == "train" else None,
                    progress=progress,
                )
            rebuild = (
                f"delete {directory} and start again to rebuild it "
                "(python -m spannorm.data verify checks every shard)"
            )
            tokens[split] = TokenShards(index_files(directory), tokenizer.vocab_size, rebuild)
            if built:
                print(
                    f"tokenized the {split} split: {len(tokens[split]):,} tokens in "
                    f"{len(tokens[split].files)} shard(s) -> {directory}"
                )
        return tokenizer, tokens

    def _given_tokens(self) -> tuple[Tokenizer | None, dict[str, TokenShards], int]:
        """data=tokens: the token files as they are, and their vocabulary."""
        paths = {
            "train": self._checked_paths("train_files", self.train_files),
            "validation": self._checked_paths("validation_files", self.validation_files),
        }
        vocab_size = vocab_size_of_tokens([str(p) for p in paths["train"]], self.bpe_vocab_size)
        tokenizer = load_hf_tokenizer(self.tokenizer_file) if self.tokenizer_kind == "hf" else None
        if tokenizer is not None and tokenizer.vocab_size > vocab_size:
            vocab_size = tokenizer.vocab_size
        tokens = {}
        for split, key in zip(SPLITS, ("train_files", "validation_files"), strict=True):
            token_files = [file for path in paths[split] for file in _token_files(key, path)]
            rebuild = f"it was given as data.{key}: recreate it where it was made"
            tokens[split] = TokenShards(token_files, vocab_size, rebuild)
        return tokenizer, tokens, vocab_size

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

    def _checked_paths(self, key: str, value: list[str] | str | None) -> list[Path]:
        if not value:
            raise ValueError(
                f"data.{key} is not set; data.source={self.source!r} needs it "
                f"(data.{key}=<file> or a list of files)"
            )
        paths = [Path(value)] if isinstance(value, (str, os.PathLike)) else [Path(v) for v in value]
        for path in paths:
            if not path.exists():
                raise FileNotFoundError(f"data.{key}: {path} does not exist")
        return paths

    def _checked_files(self, key: str, value: list[str] | str | None) -> list[Path]:
        paths = self._checked_paths(key, value)
        for path in paths:
            if not path.is_file():
                raise ValueError(f"data.{key}: {path} is a directory; give text files")
            if path.stat().st_size == 0:
                raise ValueError(f"data.{key}: {path} is empty")
        return paths

    def _source_key(self, files: dict[str, list[Path]] | None, hashes: FileHashes) -> str:
        """A hash of what the samples are: file contents and reading options, or the hub dataset."""
        if files is None:
            return _short_hash(
                {
                    "hub": [self.hub_name, self.hub_config],
                    "max_train_docs": self.hub_max_train_docs,
                    "max_train_tokens": self.hub_max_train_tokens,
                    "text_field": self.text_field,
                }
            )
        builder = LOCAL_BUILDERS[self.source]
        identity = {
            "builder": builder,
            "files": {
                split: [hashes.sha256(path) for path in paths] for split, paths in files.items()
            },
        }
        if builder == "text":
            identity["sample_by"] = self.sample_by
        else:
            identity["text_field"] = self.text_field
        return _short_hash(identity)

    def _tokenizer(
        self,
        files: dict[str, list[Path]] | None,
        source_key: str,
        splits: Callable[[], dict],
        hashes: FileHashes,
    ) -> Tokenizer:
        if self.tokenizer_kind != "bpe":
            training_files = []
        elif files is not None and LOCAL_BUILDERS[self.source] == "text":
            training_files = files["train"]
        else:
            training_files = [self._train_text_file(source_key, splits)]
        return build_tokenizer(
            self.tokenizer_kind,
            training_files,
            self.cache_dir,
            self.bpe_vocab_size,
            tokenizer_file=self.tokenizer_file,
            file_hash=hashes.sha256,
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
            # streamed: samples are read as they are tokenized, with no copy of the corpus
            return datasets.load_dataset(
                builder,
                data_files={split: [str(path) for path in paths] for split, paths in files.items()},
                streaming=True,
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
