"""Tokenizers behind one interface: raw UTF-8 bytes, or a byte-level BPE trained locally."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from spannorm.files import atomic_output

log = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
TOKENIZER_KINDS = ("bpe", "byte")
# Bump when a change to training makes cached tokenizers stale.
BPE_FORMAT_VERSION = 1


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class Tokenizer(ABC):
    """Text <-> token ids. `fingerprint` names the settings and vocabulary that fix the ids."""

    vocab_size: int
    eos_id: int
    fingerprint: str

    @abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`, skipping EOS."""

    @abstractmethod
    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer as JSON that `load_tokenizer` reads back."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]


class ByteTokenizer(Tokenizer):
    """Ids 0..255 are the UTF-8 bytes of the text and 256 is EOS: exact on any text."""

    vocab_size = 257
    eos_id = 256
    fingerprint = "byte"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if i != self.eos_id).decode("utf-8", errors="replace")

    def save(self, path: str | os.PathLike) -> None:
        with atomic_output(Path(path)) as tmp:
            tmp.write_text(json.dumps({"kind": "byte"}))


class BPETokenizer(Tokenizer):
    """Byte-level BPE (GPT-2 style pre-tokenization, no prefix space) from `tokenizers`."""

    def __init__(self, hf_tokenizer) -> None:
        self._tokenizer = hf_tokenizer
        self.vocab_size = hf_tokenizer.get_vocab_size()
        self.eos_id = hf_tokenizer.token_to_id(EOS_TOKEN)
        if self.eos_id is None:
            raise ValueError(f"the BPE tokenizer has no {EOS_TOKEN} token")
        digest = hashlib.sha256(hf_tokenizer.to_str().encode()).hexdigest()[:16]
        self.fingerprint = f"bpe{self.vocab_size}-{digest}"

    @classmethod
    def train(
        cls, texts: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2
    ) -> BPETokenizer:
        """Learn merges from `texts`; the same texts in the same order give the same tokenizer."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        hf_tokenizer = HFTokenizer(models.BPE())
        hf_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf_tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=[EOS_TOKEN],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        hf_tokenizer.train_from_iterator(texts, trainer)
        return cls(hf_tokenizer)

    @classmethod
    def load(cls, path: str | os.PathLike) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        return cls(HFTokenizer.from_file(str(path)))

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [encoding.ids for encoding in self._tokenizer.encode_batch(list(texts))]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=True)

    def save(self, path: str | os.PathLike) -> None:
        with atomic_output(Path(path)) as tmp:
            self._tokenizer.save(str(tmp))


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer that `Tokenizer.save` wrote to `path`."""
    if json.loads(Path(path).read_text()).get("kind") == "byte":
        return ByteTokenizer()
    return BPETokenizer.load(path)


def _text_chunks(paths: Iterable[Path], chars_per_chunk: int = 1 << 20) -> Iterator[str]:
    """The files' text in chunks of whole lines, so BPE also learns multi-newline tokens."""
    for path in paths:
        with open(path, encoding="utf-8") as f:
            while lines := f.readlines(chars_per_chunk):
                yield "".join(lines)


def build_tokenizer(
    kind: str, train_files: Sequence[Path], cache_dir: Path, vocab_size: int = 8192
) -> Tokenizer:
    """A `byte` tokenizer, or a `bpe` trained on `train_files` (plain text) and cached as JSON
    in `cache_dir` under a key of the files' contents, `vocab_size` and the format version."""
    if kind not in TOKENIZER_KINDS:
        raise ValueError(
            f"data.tokenizer={kind!r} is not a tokenizer; "
            f"choose one of: {', '.join(TOKENIZER_KINDS)}"
        )
    if kind == "byte":
        return ByteTokenizer()
    if not train_files:
        raise ValueError("the bpe tokenizer needs at least one training file")
    key_parts = [file_sha256(path) for path in train_files]
    key_parts += [f"vocab={vocab_size}", f"kind={kind}", f"format={BPE_FORMAT_VERSION}"]
    key = hashlib.sha256("\n".join(key_parts).encode()).hexdigest()[:16]
    cache_path = Path(cache_dir) / f"tokenizer-bpe{vocab_size}-{key}.json"
    if cache_path.is_file():
        try:
            return BPETokenizer.load(cache_path)
        except Exception as error:  # tokenizers raises a bare Exception on a malformed file
            first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
            log.warning("rebuilding the corrupt tokenizer cache %s (%s)", cache_path, first_line)
    tokenizer = BPETokenizer.train(_text_chunks(train_files), vocab_size=vocab_size)
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(cache_path)
    print(f"trained a {tokenizer.vocab_size}-token BPE tokenizer -> {cache_path}")
    return tokenizer
