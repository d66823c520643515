"""Data beyond RAM: sharded token caches, parallel and resumable builds, token files made
elsewhere (nanoGPT .bin, shard directories), HuggingFace tokenizer files, streamed hub splits."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from spannorm.cli import friendly_errors
from spannorm.cli.train import train
from spannorm.data import PackedBlocks, ShardError, TextDataModule, build, datamodule, filehash
from spannorm.data.__main__ import main as data_main

from helpers import compose_config, text_datamodule, tiny_overrides

PARAGRAPHS = [f"Paragraph {i}: naïve café {'ab' * (i % 7)}.\nLine {i}." for i in range(60)]


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    (tmp_path / "train.txt").write_text("\n\n".join(PARAGRAPHS), encoding="utf-8")
    (tmp_path / "validation.txt").write_text("\n\n".join(PARAGRAPHS[:9]), encoding="utf-8")
    return tmp_path


def _module(root: Path, **options) -> TextDataModule:
    module = text_datamodule(root, **{"batch_size": 2, "num_proc": 1, **options})
    module.setup("fit")
    return module


def _shard_dir(module: TextDataModule, split: str = "train") -> Path:
    tokens = module.train_tokens if split == "train" else module.val_tokens
    return tokens.files[0].path.parent


def test_small_shards_hold_exactly_the_tokens_of_one_array_and_blocks_cross_them(
    corpus, monkeypatch
):
    monkeypatch.setattr(datamodule, "ENCODE_BATCH_SIZE", 7)  # many batches, so many workers' parts
    whole = _module(corpus, data_dir=str(corpus / "whole"))
    assert len(whole.train_tokens.files) == 1
    expected = np.asarray(whole.train_tokens)
    assert whole.tokenizer.decode(expected.tolist()) == "".join(p + "\n\n" for p in PARAGRAPHS)

    sharded = _module(corpus, data_dir=str(corpus / "sharded"), shard_tokens=50, num_proc=2)
    files = sharded.train_tokens.files
    assert len(files) == -(-len(expected) // 50) > 10
    assert [f.path.stat().st_size for f in files[:-1]] == [100] * (len(files) - 1)  # uint16
    np.testing.assert_array_equal(np.asarray(sharded.train_tokens), expected)
    np.testing.assert_array_equal(np.asarray(sharded.val_tokens), np.asarray(whole.val_tokens))
    assert sharded.unigram_baseline() == whole.unigram_baseline()

    blocks, reference = sharded.train_set, PackedBlocks(expected, 16)
    crossing = [i for i in range(len(blocks)) if (i * 17) // 50 != (i * 17 + 16) // 50]
    assert len(blocks) == len(reference) and len(crossing) > 5
    for i in range(len(blocks)):
        assert all(torch.equal(a, b) for a, b in zip(blocks[i], reference[i], strict=True))
    for start, stop in [(0, len(expected)), (49, 51), (99, 100), (100, 230), (7, 7)]:
        np.testing.assert_array_equal(sharded.train_tokens[start:stop], expected[start:stop])


class Cut(Exception):
    """A build stopped in its tracks (as by a kill: nothing after it runs)."""


def test_a_cut_build_resumes_from_its_finished_shards(corpus, monkeypatch):
    monkeypatch.setattr(datamodule, "ENCODE_BATCH_SIZE", 4)
    expected = np.asarray(_module(corpus, data_dir=str(corpus / "whole")).train_tokens)
    calls, cuts = [], []
    encode = build.Encoder.__call__

    def cut_after_ten(self, texts):
        calls.append(len(texts))
        if len(calls) == 10 and not cuts:
            cuts.append(len(calls))
            raise Cut
        return encode(self, texts)

    monkeypatch.setattr(build.Encoder, "__call__", cut_after_ten)
    with pytest.raises(Cut):
        _module(corpus, shard_tokens=64)
    (split_dir,) = (corpus / "data" / "cache").glob("tokens-*-train")
    finished = sorted(split_dir.glob("shard-*.bin"))
    assert not (split_dir / "index.json").exists() and len(finished) >= 3
    kept = {path.name: path.stat().st_mtime_ns for path in finished}
    resume_batch, _ = json.loads((split_dir / "progress.json").read_text())["resume"]
    assert 5 <= resume_batch < 9  # the batch the last finished shard ended in

    calls.clear()
    resumed = _module(corpus, shard_tokens=64)
    np.testing.assert_array_equal(np.asarray(resumed.train_tokens), expected)
    assert {name: (split_dir / name).stat().st_mtime_ns for name in kept} == kept
    batches = -(-len(PARAGRAPHS) // 4) + -(-9 // 4)  # train and validation
    assert len(calls) == batches - resume_batch  # the finished shards were not redone
    assert not list(split_dir.glob(".*tmp")) and not (split_dir / "progress.json").exists()


def test_a_start_with_caches_reads_only_the_index(corpus, monkeypatch):
    built = _module(corpus)

    def no_reading(*args, **kwargs):
        raise AssertionError("a start with its caches in place read or re-hashed a source")

    monkeypatch.setattr(filehash, "file_sha256", no_reading)
    monkeypatch.setattr(TextDataModule, "_load_splits", no_reading)
    monkeypatch.setattr(build, "ShardWriter", no_reading)
    again = _module(corpus)
    np.testing.assert_array_equal(np.asarray(again.train_tokens), np.asarray(built.train_tokens))

    # a new file with the old one's size and mtime is still seen as new (its ctime changed)
    with pytest.raises(AssertionError, match="re-hashed"):
        train = corpus / "train.txt"
        stat = train.stat()
        train.write_text(train.read_text().upper(), encoding="utf-8")
        import os

        os.utime(train, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        _module(corpus)


def test_a_damaged_shard_is_reported_by_name(corpus, capsys):
    module = _module(corpus, shard_tokens=64)
    split_dir = _shard_dir(module)
    assert data_main(["verify", str(corpus / "data")]) == 0
    assert capsys.readouterr().out.count("ok ") == 2

    third = split_dir / "shard-00002.bin"
    data = bytearray(third.read_bytes())
    data[3] ^= 0x01  # a flipped bit: only the recorded sha256 sees it
    third.write_bytes(data)
    assert data_main(["verify", str(corpus / "data")]) == 1
    out = capsys.readouterr()
    assert f"DAMAGED {third} is different from the sha256" in out.out
    assert "1 of 2 token splits are damaged" in out.err

    third.write_bytes(data[:-10])  # truncated: found when the split is opened
    with pytest.raises(ShardError) as error:
        _module(corpus, shard_tokens=64)
    assert f"token file {third} is 118 bytes where its index says 128" in str(error.value)
    assert f"delete {split_dir} and start again to rebuild it" in str(error.value)

    data[0:2] = (40000).to_bytes(2, "little")  # an id no tokenizer of this vocab makes
    third.write_bytes(data)
    blocks = _module(corpus, shard_tokens=64).train_set
    with pytest.raises(ShardError, match=rf"{third} holds id 40000, outside the vocabulary of 257"):
        blocks[128 // 17]


def test_token_files_made_elsewhere_are_read_as_they_are(corpus, tmp_path):
    built = _module(corpus, shard_tokens=64)
    train = np.asarray(built.train_tokens)
    given = _module(
        corpus,
        source="tokens",
        train_files=str(_shard_dir(built)),
        validation_files=[str(_shard_dir(built, "validation"))],
        vocab_size=None,
    )
    assert given.vocab_size == 257  # from the index
    np.testing.assert_array_equal(np.asarray(given.train_tokens), train)

    train.astype(np.uint16).tofile(tmp_path / "train.bin")
    train[:100].astype(np.uint16).tofile(tmp_path / "val.bin")
    flat = dict(source="tokens", train_files=str(tmp_path / "train.bin"))
    with pytest.raises(ValueError, match="data.vocab_size is not set and .*train.bin has no index"):
        _module(corpus, **flat, validation_files=str(tmp_path / "val.bin"), vocab_size=None)
    (tmp_path / "odd.bin").write_bytes(b"abc")
    with pytest.raises(ValueError, match="odd.bin has 3 bytes, not a whole number of uint16"):
        _module(corpus, **flat, validation_files=str(tmp_path / "odd.bin"), vocab_size=300)
    module = _module(corpus, **flat, validation_files=str(tmp_path / "val.bin"), vocab_size=300)
    np.testing.assert_array_equal(np.asarray(module.val_tokens), train[:100])
    assert module.vocab_size == 300


def test_a_non_utf8_file_is_named_with_what_was_expected(corpus):
    (corpus / "latin1.txt").write_bytes("café au lait\n\nencore".encode("latin-1"))
    with pytest.raises(ValueError) as error:
        _module(corpus, validation_files=str(corpus / "latin1.txt"))
    message = str(error.value)
    assert message.startswith(f"data.validation_files: {corpus / 'latin1.txt'} is not UTF-8 text")
    assert "byte 3 is 0xe9" in message and "data=tokens" in message


def test_a_streamed_hub_split_stops_at_its_token_budget(tmp_path, monkeypatch):
    import datasets

    streamed = []

    def fake_load_dataset(name, config, streaming):
        def documents(split, n):
            for i in range(n):
                streamed.append(split)
                yield {"story": PARAGRAPHS[i % len(PARAGRAPHS)]}

        return datasets.IterableDatasetDict(
            {
                split: datasets.IterableDataset.from_generator(documents, gen_kwargs=kwargs)
                for split, kwargs in (
                    ("train", {"split": "train", "n": 10_000}),
                    ("validation", {"split": "validation", "n": 5}),
                )
            }
        )

    monkeypatch.setattr("socket.create_connection", lambda *args, **kwargs: io.BytesIO())
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr(datamodule, "ENCODE_BATCH_SIZE", 8)
    module = _module(
        tmp_path,
        source="hub",
        hub_name="someone/stories",
        hub_streaming=True,
        hub_max_train_tokens=1000,
        text_field="story",
        shard_tokens=300,
        train_files=None,
        validation_files=None,
    )
    expected = "".join(p + "\n\n" for p in PARAGRAPHS)[:1000]  # byte tokens of ASCII-led text
    assert len(module.train_tokens) == 1000 and len(module.train_tokens.files) == 4
    assert bytes(np.asarray(module.train_tokens).astype(np.uint8)) == expected.encode()[:1000]
    assert streamed.count("train") < 100  # stopped reading the stream near the budget


def train_here(corpus: dict, run_dir: Path, *overrides: str) -> dict:
    """Train the tiny config with `overrides` in this process, as train.py does; return the
    last checkpoint."""
    fast = ["trainer.max_steps=4", "trainer.val_check_interval=4"]
    cfg = compose_config(tiny_overrides(corpus, *fast, *overrides, f"run_dir={run_dir}"))
    assert np.isfinite(train(cfg))
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)


def test_a_tokenizer_json_drives_a_training_run(tiny_corpus, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=90, special_tokens=["[UNK]", "</s>"])
    tokenizer.train([str(tiny_corpus["train"])], trainer)
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    vocab = tokenizer.get_vocab_size()

    checkpoint = train_here(
        tiny_corpus,
        tmp_path / "run",
        "data.tokenizer=hf",
        f"data.tokenizer_file={tmp_path / 'tokenizer.json'}",
        "data.append_eos=true",
        f"data.data_dir={tmp_path / 'data'}",
    )
    assert checkpoint["hyper_parameters"]["vocab_size"] == vocab
    (index,) = (tmp_path / "data" / "cache").glob("tokens-*-train/index.json")
    assert json.loads(index.read_text())["vocab_size"] == vocab


def test_a_nanogpt_bin_file_trains(tiny_corpus, tmp_path):
    text = tiny_corpus["train"].read_bytes()
    np.frombuffer(text, np.uint8).astype(np.uint16).tofile(tmp_path / "train.bin")
    np.frombuffer(text[:3000], np.uint8).astype(np.uint16).tofile(tmp_path / "val.bin")
    checkpoint = train_here(
        tiny_corpus,
        tmp_path / "run",
        "data=tokens",
        f"data.train_files={tmp_path / 'train.bin'}",
        f"data.validation_files={tmp_path / 'val.bin'}",
        "data.tokenizer=null",
        "data.vocab_size=130",
    )
    assert checkpoint["hyper_parameters"]["vocab_size"] == 130
    assert checkpoint["global_step"] == 4


def test_a_damaged_token_file_met_while_training_is_one_line_of_bad_input(
    tiny_corpus, tmp_path, capsys
):
    text = tiny_corpus["train"].read_bytes()
    ids = np.frombuffer(text, np.uint8).astype(np.uint16)
    ids[::40] = 500  # an id outside the vocabulary of 130: met in the first training batch
    ids.tofile(tmp_path / "train.bin")
    np.frombuffer(text[:3000], np.uint8).astype(np.uint16).tofile(tmp_path / "val.bin")
    overrides = [
        "data=tokens",
        f"data.train_files={tmp_path / 'train.bin'}",
        f"data.validation_files={tmp_path / 'val.bin'}",
        "data.tokenizer=null",
        "data.vocab_size=130",
        "trainer.max_steps=4",
        f"run_dir={tmp_path / 'run'}",
    ]
    cfg = compose_config(tiny_overrides(tiny_corpus, *overrides))
    with pytest.raises(SystemExit) as exit:
        friendly_errors(train)(cfg)
    assert exit.value.code == 2  # bad input, not a bug (exit 1) with a traceback
    (line,) = capsys.readouterr().err.strip().splitlines()[-1:]
    assert line.startswith(f"error: token file {tmp_path / 'train.bin'} holds id 500, outside")
