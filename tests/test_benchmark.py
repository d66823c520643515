"""The benchmarks' parts: the bare loop trains exactly as Lightning does (else its ratio compares
different work), the paired-ratio statistics, the step timers, and the peak-RSS reader."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from spannorm.bench.bare import BareLoop, quiet_trainer
from spannorm.bench.memory import PeakRSSWatch, run_logged
from spannorm.bench.stats import Ratio, median_interval, paired_ratio
from spannorm.bench.timing import StepClock, interleaved_rounds
from spannorm.memory import peak_rss_mib
from spannorm.model.layers import rope_tables, rotate
from spannorm.training.lm import LanguageModel

from helpers import optim_options

MODEL = {"vocab_size": 64, "d_model": 32, "n_heads": 2, "n_layers": 2, "max_seq_len": 16}
OPTIM = optim_options(lr=3e-2, warmup_steps=2)


def batches(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 64, (count, 4, 17), generator=generator)
    return [(t[:, :-1], t[:, 1:]) for t in tokens]


@pytest.mark.parametrize("clip", [None, 0.05])
def test_bare_loop_matches_the_lightning_trainer(clip):
    """Same init, batches, AdamW groups, schedule and clipping: the same weights after 6 steps.
    A clip of 0.05 is active at every step (the gradient norms are ~1), so clipping is compared."""
    steps, data = 6, batches(6)
    torch.manual_seed(0)
    trained = LanguageModel(optim=OPTIM, **MODEL)
    bare = LanguageModel(optim=OPTIM, **MODEL)
    bare.load_state_dict(trained.state_dict())
    initial = next(trained.parameters()).detach().clone()
    trainer = quiet_trainer(max_steps=steps, gradient_clip_val=clip)
    trainer.fit(trained, DataLoader(data, batch_size=None))
    loop = BareLoop(bare, steps, clip)
    for batch in data:
        loop.step(batch)
    for (name, a), b in zip(trained.state_dict().items(), bare.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.allclose(next(trained.parameters()), initial)  # it trained


def test_bare_loop_clipping_changes_the_result():
    """The comparison above can fail: clipping at 0.05 or not gives different weights."""
    data, models = batches(3), []
    for clip in (None, 0.05):
        torch.manual_seed(0)
        loop = BareLoop(LanguageModel(optim=OPTIM, **MODEL), 3, clip)
        for batch in data:
            loop.step(batch)
        models.append(next(loop.lm.parameters()).detach())
    assert not torch.allclose(*models, rtol=1e-5, atol=1e-6)


def test_median_interval():
    # n = 9: P(Binomial(9, 1/2) < 2) = 10/512 <= 0.05 < P(... < 3) = 46/512, so k = 2
    low, high, confidence = median_interval([5, 1, 9, 2, 8, 3, 7, 4, 6])
    assert (low, high) == (2, 8) and confidence == pytest.approx(1 - 20 / 512)
    # n = 3: only the extremes, with confidence 1 - 2/8
    assert median_interval([3.0, 1.0, 2.0]) == (1.0, 3.0, 0.75)


def test_paired_ratio_is_the_median_of_the_rounds_ratios():
    """By hand: the ratios per round are 2, 1.5, 1.25, 2, 0.9, so their median is 1.5 (the ratio
    of the medians, 5 / 4 = 1.25, would be wrong); n = 5 reaches only the extremes, 0.9 and 2,
    with confidence 1 - 2 / 2^5."""
    ratio = paired_ratio([2, 3, 5, 8, 9], [1, 2, 4, 4, 10])
    assert ratio == Ratio(median=1.5, low=0.9, high=2.0, confidence=1 - 2 / 32)
    assert ratio.interval() == "0.900-2.000 (94%)"
    with pytest.raises(ValueError):  # rounds that do not pair up
        paired_ratio([1, 2, 3], [1, 2])


def test_interleaved_rounds_start_one_arm_later_each_round():
    order: list[str] = []
    arms = {name: (lambda name=name: order.append(name)) for name in "abc"}
    rounds = interleaved_rounds(arms, rounds=3, steps=2)
    assert "".join(order) == "aabbcc" + "bbccaa" + "ccaabb"
    assert len(rounds) == 3 and all(set(r["wall"]) == set(r["cpu"]) == set("abc") for r in rounds)


def test_step_clock_leaves_out_what_it_is_told_to():
    """Steps end at 10, 20, 35, 45 s on the wall clock and start 1 s after the previous end; 4 s
    of step 2 (from 25 s) were left out."""
    wall = lambda t: {"wall": float(t), "cpu": 0.0}  # noqa: E731
    clock = StepClock.from_state(
        {
            "starts": [wall(t) for t in (0, 11, 21, 36)],
            "ends": [wall(t) for t in (10, 20, 35, 45)],
            "left_out": [(wall(25), wall(29))],
        }
    )
    periods, waits = clock.step_times(first=1, count=3)
    assert periods == [10.0, 11.0, 10.0] and waits == [1.0, 1.0, 1.0]


ALLOCATE = "import time; block = b'1' * ({mib} << 20); time.sleep(0.5)"


def test_peak_rss_of_a_child_is_its_own_not_its_parents(tmp_path):
    """A child that holds 64 MiB peaks at 64 MiB plus Python's own ~10, although its parent held
    256 MiB when it started it (getrusage's ru_maxrss would report at least the parent's)."""
    parent_block = b"1" * (256 << 20)
    assert peak_rss_mib() > 256
    command = [sys.executable, "-c", ALLOCATE.format(mib=64)]
    peak = run_logged(command, tmp_path / "child.log", env={})
    assert 64 < peak < 64 + 48, peak
    del parent_block


def test_peak_rss_watch_sees_the_processes_below():
    with PeakRSSWatch(descendants=True, interval=0.05) as watch:
        subprocess.run([sys.executable, "-c", ALLOCATE.format(mib=32)], check=True)
    assert 32 < watch.largest_descendant_mib < 32 + 48
    assert watch.root_mib == pytest.approx(peak_rss_mib(), rel=0.01)


def load_benchmark_model():
    """scripts/benchmark_model.py as a module (scripts are not a package)."""
    path = Path(__file__).resolve().parents[1] / "scripts" / "benchmark_model.py"
    spec = importlib.util.spec_from_file_location("benchmark_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_model_reference_rope_is_ours_and_the_script_runs(capsys):
    """The minimal reference's textbook RoPE rotates exactly as our attention does (else
    `ours gelu / minimal rope` would compare different models), and a tiny run reports every arm
    and ratio."""
    bench = load_benchmark_model()
    reference = bench.MinimalGPT(vocab=32, d=16, layers=1, heads=2, seq=5, rope=True)
    x = torch.randn(2, 2, 5, 8)  # [B, H, T, hd]
    torch.testing.assert_close(
        bench.rotate_half(x, reference.cos, reference.sin), rotate(x, *rope_tables(8, 0, 5, 1e4))
    )
    tiny = "--d-model 16 --n-layers 1 --n-heads 2 --seq-len 8 --batch 2 --vocab 32"
    bench.main([*tiny.split(), "--rounds", "2", "--steps", "1", "--warmup", "0"])
    out = capsys.readouterr().out
    for name in [*bench.ARMS, *bench.RATIOS]:
        assert f"| {name} |" in out, name
    # --compile ours: our arms' blocks compiled (not run here: compiling takes minutes), not minimal's
    args = bench.parse([*tiny.split(), "--compile", "ours"])
    compiled = {arm: bench.build(arm, args).blocks[0]._compiled_call_impl for arm in bench.ARMS}
    assert {arm for arm, call in compiled.items() if call is not None} == {"ours gelu", "ours"}


@pytest.mark.slow
def test_benchmark_data_modes_run_on_a_tiny_corpus(tmp_path):
    """Each measurement of scripts/benchmark_data.py (build, start with the caches in place in a
    fresh process, training steps on them in another) runs on the config as conf/ composes it,
    resolvers included: the benchmark runs for half an hour before its last mode, so a mode that
    fails there should fail here first."""
    spec = importlib.util.spec_from_file_location(
        "benchmark_data", Path(__file__).parents[1] / "scripts" / "benchmark_data.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    from spannorm.data import BPETokenizer

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    bench.write_corpus(corpus / "train.txt", 60_000, seed=3)
    bench.write_corpus(corpus / "validation.txt", 20_000, seed=2)
    BPETokenizer.train([(corpus / "train.txt").read_text()], vocab_size=300).save(
        tmp_path / "tokenizer.json"
    )
    cache = corpus / "cache-np1"
    build = bench.mode_build(corpus, cache, 1)
    assert build["cache_mb"] > 0 and build["mb_per_s"] > 0
    # in fresh processes, as the benchmark runs them (this one has every resolver registered)
    where = ["--corpus", str(corpus), "--cache", str(cache)]
    assert bench.child("--mode", "start", *where)["tokens"] > 0
    steps = bench.child("--mode", "steps", *where, "--steps", "2")
    assert 0 <= steps["wait_share"] < 1 and steps["median_step_s"] > 0
