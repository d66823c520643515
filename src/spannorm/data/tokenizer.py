"""Tokenizers behind one interface: raw UTF-8 bytes, a byte-level BPE trained locally, or any
HuggingFace `tokenizers` file (`tokenizer.json`, e.g. GPT-2's or Llama's)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from spannorm.files import atomic_output

log = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
# End-of-text tokens of common tokenizer files, in the order they are looked for.
EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<|end_of_text|>", "<eos>")
TOKENIZER_KINDS = ("bpe", "byte", "hf")
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


class HFTokenizer(Tokenizer):
    """A HuggingFace `tokenizers` tokenizer; EOS is the first of `EOS_CANDIDATES` it knows (None
    if it knows none)."""

    def __init__(self, hf_tokenizer, kind: str = "hf") -> None:
        self._tokenizer = hf_tokenizer
        self.vocab_size = hf_tokenizer.get_vocab_size()
        ids = (hf_tokenizer.token_to_id(token) for token in EOS_CANDIDATES)
        self.eos_id = next((i for i in ids if i is not None), None)
        digest = hashlib.sha256(hf_tokenizer.to_str().encode()).hexdigest()[:16]
        self.fingerprint = f"{kind}{self.vocab_size}-{digest}"

    @classmethod
    def load(cls, path: str | os.PathLike):
        from tokenizers import Tokenizer as HFTokenizerFile

        return cls(HFTokenizerFile.from_file(str(path)))

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [encoding.ids for encoding in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=True)

    def save(self, path: str | os.PathLike) -> None:
        with atomic_output(Path(path)) as tmp:
            self._tokenizer.save(str(tmp))


class BPETokenizer(HFTokenizer):
    """Byte-level BPE (GPT-2 style pre-tokenization, no prefix space) from `tokenizers`."""

    def __init__(self, hf_tokenizer) -> None:
        super().__init__(hf_tokenizer, kind="bpe")
        if hf_tokenizer.token_to_id(EOS_TOKEN) is None:
            raise ValueError(f"the BPE tokenizer has no {EOS_TOKEN} token")

    @classmethod
    def train(
        cls, texts: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2
    ) -> BPETokenizer:
        """Learn merges from `texts`; the same texts in the same order give the same tokenizer."""
        from tokenizers import Tokenizer as HFTokenizerFile
        from tokenizers import decoders, models, pre_tokenizers, trainers

        hf_tokenizer = HFTokenizerFile(models.BPE())
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


# Bytes of text per piece of a sample (a tokenizer trained on a sample sees it in such pieces),
# and the fewest pieces a sample is cut into (so even a small one is spread over the corpus).
SAMPLE_PIECE_BYTES = 1 << 20
SAMPLE_MIN_PIECES = 64


def _sampled_chunks(paths: Sequence[Path], total: int, budget: int) -> Iterator[str]:
    """At most `budget` bytes of the files' text (`total` bytes in all): pieces of whole lines,
    of up to `SAMPLE_PIECE_BYTES` each (at least `SAMPLE_MIN_PIECES` of them), at evenly spaced
    offsets across all of it (its head, middle and tail alike). Fixed by the files' contents and
    `budget`."""
    piece = max(min(SAMPLE_PIECE_BYTES, budget // SAMPLE_MIN_PIECES), min(budget, 4096))
    count = budget // piece
    sizes = [Path(path).stat().st_size for path in paths]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    for k in range(count):
        offset = k * total // count
        i = max(j for j, start in enumerate(starts) if start <= offset)
        with open(paths[i], "rb") as f:
            f.seek(offset - starts[i])
            data = f.read(piece)
        whole = len(data) == piece  # else the piece ends with its file
        if offset > starts[i]:  # begin after the line the offset falls in
            data = data[data.find(b"\n") + 1 :] if b"\n" in data else b""
        if whole and b"\n" in data:  # end at the last whole line
            data = data[: data.rfind(b"\n") + 1]
        if data:
            yield data.decode("utf-8", errors="ignore")


def load_hf_tokenizer(tokenizer_file: str | os.PathLike | None) -> HFTokenizer:
    """The `tokenizers` file that `data.tokenizer_file` names, for `data.tokenizer=hf`."""
    if not tokenizer_file:
        raise ValueError("data.tokenizer=hf needs data.tokenizer_file=<a tokenizer.json>")
    if not Path(tokenizer_file).is_file():
        raise FileNotFoundError(f"data.tokenizer_file: {tokenizer_file} does not exist")
    try:
        return HFTokenizer.load(tokenizer_file)
    except Exception as error:  # tokenizers raises a bare Exception on a malformed file
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(
            f"data.tokenizer_file: {tokenizer_file} is not a HuggingFace tokenizers file "
            f"(a tokenizer.json) ({first_line})"
        ) from None


def build_tokenizer(
    kind: str,
    train_files: Sequence[Path],
    cache_dir: Path,
    vocab_size: int = 8192,
    tokenizer_file: str | os.PathLike | None = None,
    file_hash: Callable[[Path], str] = file_sha256,
    train_bytes: int | None = None,
) -> Tokenizer:
    """A `byte` tokenizer, the `hf` tokenizer of `tokenizer_file`, or a `bpe` trained on
    `train_files` (plain text) and cached as JSON in `cache_dir` under a key of the files'
    contents (`file_hash` of each), `vocab_size` and the format version. Files of more than
    `train_bytes` bytes in all train it on a sample of that many (`_sampled_chunks`), which the
    key then names; files within it (or `train_bytes` None) train it on all of their text."""
    if kind not in TOKENIZER_KINDS:
        raise ValueError(
            f"data.tokenizer={kind!r} is not a tokenizer; "
            f"choose one of: {', '.join(TOKENIZER_KINDS)}"
        )
    if kind == "byte":
        return ByteTokenizer()
    if kind == "hf":
        return load_hf_tokenizer(tokenizer_file)
    if not train_files:
        raise ValueError("the bpe tokenizer needs at least one training file")
    key_parts = [file_hash(path) for path in train_files]
    key_parts += [f"vocab={vocab_size}", f"kind={kind}", f"format={BPE_FORMAT_VERSION}"]
    total = sum(Path(path).stat().st_size for path in train_files)
    sampled = train_bytes is not None and total > train_bytes
    if sampled:
        key_parts.append(f"sample_bytes={train_bytes}")
    key = hashlib.sha256("\n".join(key_parts).encode()).hexdigest()[:16]
    cache_path = Path(cache_dir) / f"tokenizer-bpe{vocab_size}-{key}.json"
    if cache_path.is_file():
        try:
            return BPETokenizer.load(cache_path)
        except Exception as error:  # tokenizers raises a bare Exception on a malformed file
            first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
            log.warning("rebuilding the corrupt tokenizer cache %s (%s)", cache_path, first_line)
    texts = (
        _sampled_chunks(list(train_files), total, train_bytes)
        if sampled
        else _text_chunks(train_files)
    )
    tokenizer = BPETokenizer.train(texts, vocab_size=vocab_size)
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(cache_path)
    trained_on = f"a {train_bytes:,}-byte sample of {total:,} bytes" if sampled else "all"
    print(f"trained a {tokenizer.vocab_size}-token BPE tokenizer on {trained_on} -> {cache_path}")
    return tokenizer
