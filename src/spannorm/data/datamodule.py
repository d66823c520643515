"""The LightningDataModule: tokenize a source's samples once into cached token shards (or take
token files made elsewhere) and serve packed next-token blocks. The sources are in `.sources`."""

from __future__ import annotations

import codecs
import functools
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
from .shards import TokenShards, ensure_counts, index_files, token_dtype
from .sources import REGISTRY, Source, TokenSource, source_class
from .sources.base import SPLIT_KEYS, SPLITS, short_hash
from .tokenizer import (
    EOS_CANDIDATES,
    TOKENIZER_KINDS,
    ByteTokenizer,
    Tokenizer,
    build_tokenizer,
    load_hf_tokenizer,
)

# Bump when a change to tokenization makes cached token arrays stale.
TOKENS_FORMAT_VERSION = 2
# Samples per batch handed to the tokenizer (and the unit a cut build resumes from).
ENCODE_BATCH_SIZE = 1024
# Tokens per shard file: 128 MiB of uint16.
SHARD_TOKENS = 2**26
# The options every source may be given; a source reads those of its `options`.
SOURCE_OPTIONS = frozenset(key for cls in REGISTRY.values() for key in cls.options)


def _check_choice(key: str, value: str, what: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(
            f"data.{key}={value!r} is not a {what}; choose one of: {', '.join(choices)}"
        )


def _check_count(key: str, value: Any, minimum: int = 1, none: str = "") -> None:
    """`data.<key>` must be an integer >= `minimum` (or None, when `none` says what it means)."""
    if value is None and none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(
            f"data.{key}={value!r} must be {kind}{f' (or null: {none})' if none else ''}"
        )


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


def data_vocab_size(data: Any) -> int:
    """The vocabulary a model needs for the `data` config, known before any data is built:
    the token files' for a token source, 257 for `byte`, the file's for `hf`, `vocab_size` for
    `bpe` (its most)."""
    source = REGISTRY.get(data.source)  # an unknown one is reported when the module is made
    given = source.vocab_size_of(data) if source is not None else None
    if given is not None:
        return given
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
    """Samples of a source, tokenized once into cached token shards, served as packed blocks.

    `source` names a module of `.sources`: `shakespeare` (built on first use), `text` (samples
    split by `sample_by`), `json` or `parquet` (column `text_field`) from local
    `train_files`/`validation_files`, `hub` (`hub_name`, `hub_config`, `hub_streaming`,
    `hub_max_train_docs`, `hub_max_train_tokens`), or `tokens`: token ids tokenized elsewhere
    (nanoGPT's flat uint16 `.bin` files or this project's shard directories). Those options are
    `source_options`, read by the source. Each sample is followed by `separator` (and EOS when
    `append_eos`) and the samples of a split are concatenated. `num_proc` processes tokenize
    (null: one per core) into shards of `shard_tokens` tokens, cached under `data_dir`, keyed by
    the data's contents and every setting that changes the tokens; `tokenizer` is `bpe` (trained
    on at most `tokenizer_train_bytes` of the train split, sampled across all of it; None: all of
    it), `byte`, or `hf` (`tokenizer_file`: any HuggingFace `tokenizers` file).
    """

    def __init__(
        self,
        source: str = "shakespeare",
        tokenizer: str | None = "bpe",
        tokenizer_file: str | None = None,
        vocab_size: int | None = 8192,
        tokenizer_train_bytes: int | None = None,
        seq_len: int = 128,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        global_batch_size: int | None = None,
        separator: str = "\n\n",
        append_eos: bool = False,
        data_dir: str = "data",
        num_workers: int = 0,
        num_proc: int | None = None,
        shard_tokens: int = SHARD_TOKENS,
        seed: int = 1337,
        **source_options: Any,
    ) -> None:
        super().__init__()
        unknown = sorted(set(source_options) - SOURCE_OPTIONS)
        if unknown:
            raise TypeError(f"TextDataModule got unexpected options: {', '.join(unknown)}")
        self.source = source
        self.data_dir = Path(data_dir)
        self.corpus: Source = source_class(source)(source, self.data_dir, source_options)
        if tokenizer is not None or self.corpus.needs_tokenizer:
            _check_choice("tokenizer", tokenizer, "tokenizer", TOKENIZER_KINDS)
        _check_count("num_proc", num_proc, none="one process per core")
        _check_count("shard_tokens", shard_tokens)
        _check_count("tokenizer_train_bytes", tokenizer_train_bytes, none="the whole train split")
        _check_count("seq_len", seq_len)
        _check_count("batch_size", batch_size)
        _check_count("num_workers", num_workers, minimum=0)
        self.tokenizer_kind = tokenizer
        self.tokenizer_file = tokenizer_file
        self.bpe_vocab_size = vocab_size
        self.tokenizer_train_bytes = tokenizer_train_bytes
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.global_batch_size = global_batch_size  # the CLI derives accumulation from it
        self.separator = separator
        self.append_eos = append_eos
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
        if isinstance(self.corpus, TokenSource):
            if self.tokenizer_kind != "hf":
                raise ValueError(
                    "data=tokens has no tokenizer to turn text into ids; give the one the "
                    "tokens were made with: data.tokenizer=hf data.tokenizer_file=<tokenizer.json>"
                )
            return load_hf_tokenizer(self.tokenizer_file)
        files = self.corpus.files()
        hashes = FileHashes(self.cache_dir)
        source_key = self.corpus.key(files, hashes.sha256)
        splits = functools.cache(lambda: self._load_splits(files))
        return self._tokenizer(files, source_key, splits, hashes)

    def unigram_baseline(self) -> float:
        """Cross-entropy (nats/token) of the validation tokens under the add-one smoothed unigram
        distribution of the train tokens: the loss of a model that learned only frequencies.
        The counts come from the shards' indexes (recorded as each shard was written)."""
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
        if isinstance(self.corpus, TokenSource):
            return self._given_tokens()
        files = self.corpus.files()
        try:
            tokenizer, tokens = self._tokenized(files)
        except UnicodeDecodeError:
            for split in SPLITS:
                key = SPLIT_KEYS[split]
                if files is not None and (error := _not_utf8(key, files[split])) is not None:
                    raise error from None
            raise
        return tokenizer, tokens, tokenizer.vocab_size

    def _tokenized(self, files: dict[str, list[Path]] | None):
        hashes = FileHashes(self.cache_dir)
        source_key = self.corpus.key(files, hashes.sha256)
        # Loaded at most once per build, and only if some cache is missing.
        splits = functools.cache(lambda: self._load_splits(files))
        tokenizer = self._tokenizer(files, source_key, splits, hashes)
        if self.append_eos and tokenizer.eos_id is None:
            raise ValueError(
                f"data.append_eos=true, but the tokenizer has no end-of-text token "
                f"(none of {', '.join(EOS_CANDIDATES)}); set data.append_eos=false"
            )
        key = short_hash(
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
                    max_tokens=self.corpus.max_tokens(split),
                    progress=progress,
                )
            ensure_counts(directory)  # an index written without them (or resumed from such)
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
        """A token source: its token files as they are, and their vocabulary."""
        files, vocab_size = self.corpus.token_files(self.bpe_vocab_size)
        tokenizer = load_hf_tokenizer(self.tokenizer_file) if self.tokenizer_kind == "hf" else None
        if tokenizer is not None and tokenizer.vocab_size > vocab_size:
            vocab_size = tokenizer.vocab_size
        tokens = {}
        for split in SPLITS:
            rebuild = f"it was given as data.{SPLIT_KEYS[split]}: recreate it where it was made"
            tokens[split] = TokenShards(files[split], vocab_size, rebuild)
        return tokenizer, tokens, vocab_size

    def _tokenizer(
        self,
        files: dict[str, list[Path]] | None,
        source_key: str,
        splits: Callable[[], dict],
        hashes: FileHashes,
    ) -> Tokenizer:
        if self.tokenizer_kind != "bpe":
            training_files = []
        else:
            training_files = self.corpus.plain_text_files(files) or [
                self._train_text_file(source_key, splits)
            ]
        return build_tokenizer(
            self.tokenizer_kind,
            training_files,
            self.cache_dir,
            self.bpe_vocab_size,
            tokenizer_file=self.tokenizer_file,
            file_hash=hashes.sha256,
            train_bytes=self.tokenizer_train_bytes,
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
        return self.corpus.open(files)

    def _sample_batches(self, dataset, split: str) -> Iterator[list[str]]:
        """The split's samples, in batches of `ENCODE_BATCH_SIZE`."""
        return self.corpus.batches(dataset, split, ENCODE_BATCH_SIZE)
