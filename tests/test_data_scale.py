"""The default data path at scale: the BPE tokenizer trains on a bounded sample, a start with
its caches in place reads no shard, and bad data options get one line saying what is right."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from spannorm.cli import friendly_errors
from spannorm.cli.train import train
from spannorm.data import TextDataModule, build_tokenizer, tokenizer

from helpers import compose_config, text_datamodule, tiny_overrides

LINES = [
    f"line {i:06d}: the quick brown fox jumps over the lazy dog {i % 97}.\n" for i in range(40000)
]


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """About 2.5 MB of numbered lines in two files (so a sample must cross from one to the next)."""
    half = len(LINES) // 2
    (tmp_path / "a.txt").write_text("".join(LINES[:half]))
    (tmp_path / "b.txt").write_text("".join(LINES[half:]))
    (tmp_path / "validation.txt").write_text("".join(LINES[:300]))
    return tmp_path


@pytest.fixture
def trained_on(monkeypatch) -> list[list[str]]:
    """The texts each BPE training of the test was given."""
    seen: list[list[str]] = []
    train = tokenizer.BPETokenizer.train.__func__

    def recording(cls, texts, *args, **kwargs):
        texts = list(texts)
        seen.append(texts)
        return train(cls, texts, *args, **kwargs)

    monkeypatch.setattr(tokenizer.BPETokenizer, "train", classmethod(recording))
    return seen


def _numbers(texts: list[str]) -> list[int]:
    return [int(line[5:11]) for text in texts for line in text.splitlines() if line]


def test_bpe_trains_on_a_sample_within_the_bound_taken_across_the_whole_corpus(corpus, trained_on):
    files = [corpus / "a.txt", corpus / "b.txt"]
    total = sum(path.stat().st_size for path in files)
    bound = 300_000
    sampled = build_tokenizer("bpe", files, corpus / "cache", 300, train_bytes=bound)
    (texts,) = trained_on
    size = sum(len(text.encode()) for text in texts)
    assert 0.9 * bound <= size <= bound < total / 5
    numbers = _numbers(texts)
    assert len(set(numbers)) == len(numbers)  # whole lines, none twice
    assert all(line in LINES for text in texts for line in text.splitlines(keepends=True))
    # spread over the corpus: lines from each tenth of it, the last tenth included
    assert {n * 10 // len(LINES) for n in numbers} == set(range(10))

    # the same files and bound: the same sample, and the cached tokenizer is found
    again = build_tokenizer("bpe", files, corpus / "cache2", 300, train_bytes=bound)
    assert trained_on[1] == texts and again.fingerprint == sampled.fingerprint
    assert build_tokenizer("bpe", files, corpus / "cache", 300, train_bytes=bound)
    assert len(trained_on) == 2

    # another bound is another tokenizer (its cache key names the bound)
    build_tokenizer("bpe", files, corpus / "cache", 300, train_bytes=2 * bound)
    assert len(trained_on) == 3 and len(list((corpus / "cache").glob("tokenizer-*.json"))) == 2

    # a corpus within the bound trains on all of it, under the key it always had
    whole = build_tokenizer("bpe", files, corpus / "cache", 300, train_bytes=total)
    assert "".join(trained_on[3]) == "".join(LINES)
    assert len(list((corpus / "cache").glob("tokenizer-*.json"))) == 3
    unbounded = build_tokenizer("bpe", files, corpus / "cache", 300, train_bytes=None)
    assert len(trained_on) == 4 and unbounded.fingerprint == whole.fingerprint


def test_the_data_module_passes_its_bound_to_the_bpe_training(corpus, trained_on):
    module = TextDataModule(
        source="text",
        train_files=[str(corpus / "a.txt"), str(corpus / "b.txt")],
        validation_files=str(corpus / "validation.txt"),
        vocab_size=300,
        tokenizer_train_bytes=200_000,
        seq_len=16,
        batch_size=2,
        data_dir=str(corpus / "data"),
    )
    module.setup("fit")
    (texts,) = trained_on
    assert sum(len(text.encode()) for text in texts) <= 200_000
    assert module.load_tokenizer().fingerprint == module.tokenizer.fingerprint
    assert len(trained_on) == 1  # found in the cache


def _module(root: Path, **options) -> TextDataModule:
    settings = dict(train_files=str(root / "a.txt"), batch_size=2, shard_tokens=100_000)
    module = text_datamodule(root, **{**settings, **options})
    module.setup("fit")
    return module


def test_each_shard_records_its_id_counts_and_a_warm_start_reads_no_shard(corpus, monkeypatch):
    built = _module(corpus)
    (index_path,) = (corpus / "data" / "cache").glob("tokens-*-train/index.json")
    index = json.loads(index_path.read_text())
    assert len(index["shards"]) > 5
    for shard in index["shards"]:
        tokens = np.fromfile(index_path.parent / shard["name"], np.uint16)
        assert shard["counts"] == np.bincount(tokens).tolist()
    baseline = built.unigram_baseline()

    def no_reading(*args, **kwargs):
        raise AssertionError("a start with its caches in place read a shard whole")

    with monkeypatch.context() as patched:
        patched.setattr(np, "bincount", no_reading)
        patched.setattr(np, "fromfile", no_reading)
        patched.setattr(np.memmap, "__array__", no_reading, raising=False)
        warm = _module(corpus)
        assert warm.unigram_baseline() == baseline


def test_an_index_without_counts_is_counted_once_and_rewritten(corpus, monkeypatch):
    built = _module(corpus)
    baseline = built.unigram_baseline()
    indexes = sorted((corpus / "data" / "cache").glob("tokens-*/index.json"))
    for path in indexes:  # as written before shards recorded their counts
        index = json.loads(path.read_text())
        for shard in index["shards"]:
            del shard["counts"]
        path.write_text(json.dumps(index, indent=1))

    counted = []
    bincount = np.bincount

    def counting(*args, **kwargs):
        counted.append(1)
        return bincount(*args, **kwargs)

    monkeypatch.setattr(np, "bincount", counting)
    assert _module(corpus).unigram_baseline() == baseline
    shards = sum(len(json.loads(path.read_text())["shards"]) for path in indexes)
    assert len(counted) == shards  # each shard read once
    assert all("counts" in s for p in indexes for s in json.loads(p.read_text())["shards"])
    counted.clear()
    assert _module(corpus).unigram_baseline() == baseline
    assert counted == []


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (
            "num_proc=abc",
            "data.num_proc='abc' must be a positive integer (or null: one process per core)",
        ),
        (
            "num_proc=0",
            "data.num_proc=0 must be a positive integer (or null: one process per core)",
        ),
        ("shard_tokens=1.5", "data.shard_tokens=1.5 must be a positive integer"),
        (
            "tokenizer_train_bytes=-5",
            "data.tokenizer_train_bytes=-5 must be a positive integer (or null: the whole train split)",
        ),
    ],
)
def test_a_bad_count_option_is_one_line_saying_what_is_right(
    tiny_corpus, tmp_path, capsys, option, message
):
    overrides = [f"data.{option}", "trainer.max_steps=1", f"run_dir={tmp_path / 'run'}"]
    cfg = compose_config(tiny_overrides(tiny_corpus, *overrides))
    with pytest.raises(SystemExit) as exit:
        friendly_errors(train)(cfg)
    assert exit.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {message}"]


def test_a_json_row_whose_text_is_not_a_string_is_named(tmp_path):
    rows = [{"text": "a fine row"}] * 5 + [{"text": 12345}] + [{"text": "more"}] * 3
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    (tmp_path / "val.jsonl").write_text(json.dumps({"text": "fine"}))
    module = TextDataModule(
        source="json",
        train_files=str(tmp_path / "train.jsonl"),
        validation_files=str(tmp_path / "val.jsonl"),
        tokenizer="byte",
        data_dir=str(tmp_path / "data"),
    )
    with pytest.raises(ValueError) as error:
        module.setup("fit")
    assert str(error.value) == (
        "data.text_field='text': row 5 of the train split holds int '12345', not text; "
        "data.text_field must name a column of strings"
    )


@pytest.mark.slow
def test_the_default_path_benchmark_runs_on_a_tiny_corpus(tmp_path):
    """scripts/benchmark_data.py --default-path (whole train.py processes, cold then warm) runs:
    at 0.25 GB it runs for many minutes before it reports, so a failure should show here first."""
    import argparse
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "benchmark_data", Path(__file__).parents[1] / "scripts" / "benchmark_data.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = argparse.Namespace(sizes_gb=[0.0003], repo=None, starts=1, warm_only=False)
    (row,) = bench.default_path(args, tmp_path)["sizes"].values()
    for name in ("cold", "warm1"):
        assert 0 < row[name]["first_step_s"] < row[name]["process_s"]
        assert row[name]["peak_rss_mib"] > 100
    assert list(
        (tmp_path / next(tmp_path.glob("default-*")).name / "data" / "cache").glob(
            "tokenizer-bpe8192-*.json"
        )
    )
