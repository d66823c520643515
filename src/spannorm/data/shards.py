"""Token storage beyond RAM: a split is a directory of fixed-size token shards plus `index.json`.

    tokens-<key>-train/
        index.json         shard names, token counts, sha256 of each and how often each id
                           occurs in it (recorded at write time), dtype, vocab size, tokenizer
                           fingerprint
        shard-00000.bin    raw little-endian uint16 (uint32 where the vocab needs it), no header
        ...

`ShardWriter` appends tokens and finishes each shard atomically as it fills, so memory stays
bounded by what is appended at once; `TokenShards` reads shards (or nanoGPT's flat uint16 `.bin`
files) through memory maps as one sequence, slices crossing shard boundaries included. Opening
checks only the index and the shards' sizes; `verify_split` re-hashes every shard on demand.
The id counts recorded per shard give a split's unigram statistics without reading it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from spannorm.files import atomic_output

INDEX = "index.json"
PROGRESS = "progress.json"  # a build under way: the shards it has finished and where to go on
SHARDS_FORMAT_VERSION = 2


class ShardError(ValueError):
    """A token file that is missing, truncated, damaged or not what its index says."""


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id of a `vocab_size` vocabulary."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def shard_name(number: int) -> str:
    return f"shard-{number:05d}.bin"


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def write_json(path: Path, record: dict[str, Any]) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(record, indent=1))


def id_counts(tokens: np.ndarray) -> list[int]:
    """How often each id occurs in `tokens`, up to the largest one (the form an index keeps)."""
    return np.bincount(tokens).tolist() if len(tokens) else []


@contextmanager
def build_lock(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock for building (or completing the index of) `directory`: other
    processes (ranks of one run, runs sharing a data_dir) wait here, then find the index."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    with open(directory.with_name(directory.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class ShardWriter:
    """Appends tokens to `directory`'s shards of `shard_tokens` tokens each. A shard is written to
    a temporary file, hashed and its ids counted as it is written, and renamed into place once
    full (or by `finish_shard`); `finished` lists the shards done so far (name, tokens, sha256,
    counts), continuing those given."""

    def __init__(
        self, directory: Path, dtype: np.dtype, shard_tokens: int, finished: list[dict] = ()
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.dtype = np.dtype(dtype)
        self.shard_tokens = shard_tokens
        self.finished = list(finished)
        self._file = None
        self._count = 0

    @property
    def room(self) -> int:
        """Tokens the current shard still takes."""
        return self.shard_tokens - self._count

    def write(self, tokens: np.ndarray) -> None:
        """Append `tokens` (at most `room` of them) to the current shard."""
        if len(tokens) > self.room:
            raise ValueError(f"{len(tokens)} tokens do not fit in the {self.room} left")
        if self._file is None:
            name = shard_name(len(self.finished))
            self._tmp = self.directory / f".{name}.{os.getpid()}.tmp"
            self._file = open(self._tmp, "wb")
            self._digest = hashlib.sha256()
            self._counts = np.zeros(0, np.int64)
        data = np.ascontiguousarray(tokens, dtype=self.dtype.newbyteorder("<")).tobytes()
        self._file.write(data)
        self._digest.update(data)
        if len(tokens):
            counts = np.bincount(np.asarray(tokens))
            if len(counts) > len(self._counts):
                self._counts = np.pad(self._counts, (0, len(counts) - len(self._counts)))
            self._counts[: len(counts)] += counts
        self._count += len(tokens)

    def finish_shard(self) -> dict | None:
        """Close the current shard and put it in place; its record, or None if it was empty."""
        if self._file is None:
            return None
        self._file.close()
        name = shard_name(len(self.finished))
        os.replace(self._tmp, self.directory / name)
        record = {
            "name": name,
            "tokens": self._count,
            "sha256": self._digest.hexdigest(),
            "counts": self._counts.tolist(),
        }
        self.finished.append(record)
        self._file, self._count = None, 0
        return record

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._tmp.unlink(missing_ok=True)
            self._file = None


@dataclass(frozen=True)
class TokenFile:
    """One memory-mappable run of tokens: a shard of an index, or a flat `.bin` file."""

    path: Path
    dtype: str
    tokens: int
    sha256: str | None = None
    # how often each id occurs (from the index; None where no index records it)
    counts: list[int] | None = field(default=None, compare=False, repr=False)


def read_index(directory: Path) -> dict[str, Any]:
    """The index of a shard directory; a ShardError if it is missing or unreadable."""
    path = Path(directory) / INDEX
    try:
        index = json.loads(path.read_text())
        if index.get("format") != SHARDS_FORMAT_VERSION:
            raise ValueError(f"format {index.get('format')}, expected {SHARDS_FORMAT_VERSION}")
        return index
    except FileNotFoundError:
        raise ShardError(f"{directory} has no {INDEX}: it is not a finished token split") from None
    except (OSError, ValueError, AttributeError) as error:
        raise ShardError(f"{path} is unreadable ({error})") from None


def index_files(directory: Path) -> list[TokenFile]:
    index = read_index(directory)
    return [
        TokenFile(
            Path(directory) / shard["name"],
            index["dtype"],
            shard["tokens"],
            shard["sha256"],
            shard.get("counts"),
        )
        for shard in index["shards"]
    ]


def ensure_counts(directory: Path) -> bool:
    """Give an index written before shards recorded their id counts those counts: each shard is
    read once, and the index rewritten with them (so no later start reads a shard). Returns
    whether it counted; a directory that cannot be written is left as it is (its counts are then
    computed when asked, as for token files made elsewhere)."""
    index = read_index(directory)
    if all("counts" in shard for shard in index["shards"]):
        return False
    if not os.access(directory, os.W_OK):
        return False
    with build_lock(Path(directory)):
        index = read_index(directory)  # another process may have counted meanwhile
        if all("counts" in shard for shard in index["shards"]):
            return False
        for file, shard in zip(index_files(directory), index["shards"], strict=True):
            if "counts" not in shard:
                if (problem := damaged(file, check_contents=False)) is not None:
                    raise ShardError(f"token file {file.path} is {problem}")
                shard["counts"] = id_counts(_memmap(file))
        write_json(Path(directory) / INDEX, index)
    return True


def _memmap(file: TokenFile) -> np.ndarray:
    dtype = np.dtype(file.dtype).newbyteorder("<")
    return np.memmap(file.path, dtype=dtype, mode="r", shape=file.tokens)


def damaged(file: TokenFile, check_contents: bool) -> str | None:
    """What is wrong with `file` (missing, wrong size, or with `check_contents` a sha256 other
    than its index records), or None."""
    try:
        size = file.path.stat().st_size
    except FileNotFoundError:
        return "missing"
    expected = file.tokens * np.dtype(file.dtype).itemsize
    if size != expected:
        return f"{size} bytes where its index says {expected}"
    if check_contents and file.sha256 and file_digest(file.path) != file.sha256:
        return "different from the sha256 its index records"
    return None


def verify_split(directory: Path) -> list[str]:
    """Every problem of a shard directory, re-hashing each shard: [] when it is intact."""
    try:
        files = index_files(directory)
    except ShardError as error:
        return [str(error)]
    return [
        f"{file.path} is {problem}"
        for file in files
        if (problem := damaged(file, True)) is not None
    ]


class TokenShards:
    """Token files read through memory maps as one sequence: `len`, slices (crossing file
    boundaries), `np.asarray` (the whole split: small data only) and `pieces()` (file by file).
    Opening checks each file's size; a slice holding an id >= `vocab_size` is a ShardError naming
    the file (a damaged shard, or tokens of another vocabulary). `rebuild` says how to remake it."""

    def __init__(
        self, files: list[TokenFile], vocab_size: int | None = None, rebuild: str = ""
    ) -> None:
        self.files = [file for file in files if file.tokens > 0]
        self.vocab_size = vocab_size
        self.rebuild = rebuild
        for file in self.files:
            if (problem := damaged(file, check_contents=False)) is not None:
                raise self._error(file, f"is {problem}")
        self._open()

    def _open(self) -> None:
        self._maps = [_memmap(f) for f in self.files]
        self._starts = np.cumsum([0] + [f.tokens for f in self.files])

    def _error(self, file: TokenFile, problem: str) -> ShardError:
        return ShardError(f"token file {file.path} {problem}; {self.rebuild}".rstrip("; "))

    def __getstate__(self) -> dict:  # DataLoader workers reopen the maps, never copy them
        return {k: v for k, v in vars(self).items() if k not in ("_maps", "_starts")}

    def __setstate__(self, state: dict) -> None:
        vars(self).update(state)
        self._open()

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.files[0].dtype) if self.files else np.dtype(np.uint16)

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("TokenShards takes contiguous slices only")
        start, stop, _ = key.indices(len(self))
        pieces = []
        first = int(np.searchsorted(self._starts, start, side="right")) - 1
        for i in range(max(first, 0), len(self.files)):
            if self._starts[i] >= stop:
                break
            lo, hi = max(start, self._starts[i]), min(stop, self._starts[i + 1])
            piece = self._maps[i][lo - self._starts[i] : hi - self._starts[i]]
            if self.vocab_size is not None and len(piece) and int(piece.max()) >= self.vocab_size:
                bad = int(piece.max())
                raise self._error(
                    self.files[i], f"holds id {bad}, outside the vocabulary of {self.vocab_size}"
                )
            pieces.append(piece)
        if not pieces:
            return np.empty(0, self.dtype)
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def pieces(self) -> Iterator[np.ndarray]:
        """The tokens file by file (each a memory map)."""
        yield from self._maps

    def counts(self, vocab_size: int | None = None) -> np.ndarray:
        """How often each id of the vocabulary (`vocab_size`, else this split's) occurs: from the
        counts each file's index records, else read file by file; an id outside it is an error
        naming its file."""
        vocab_size = vocab_size or self.vocab_size
        total = np.zeros(vocab_size, np.int64)
        for file, piece in zip(self.files, self._maps, strict=True):
            if file.counts is not None:
                counts = np.asarray(file.counts, np.int64)
            else:
                counts = np.bincount(piece, minlength=vocab_size)
            if len(counts) > vocab_size:
                problem = f"holds id {len(counts) - 1}, outside the vocabulary of {vocab_size}"
                raise self._error(file, problem)
            total[: len(counts)] += counts
        return total

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self[:]
        return whole if dtype is None else whole.astype(dtype)

    def tolist(self) -> list[int]:
        return self[:].tolist()
