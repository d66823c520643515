"""Benchmark the data path beyond RAM on synthetic corpora generated on the fly.

    python scripts/benchmark_data.py --sizes-gb 0.25 0.5 1 [--work DIR] [--out docs/benchmarks/data.json]

For each size it writes a text corpus of that many bytes (paragraphs of Zipf-distributed made-up
words, fixed seed), then, each in a fresh process:
- builds the token caches (`TextDataModule.prepare_data`, with a byte-level BPE tokenizer.json of
  8192 ids trained on an 8 MB sample) with `data.num_proc` 1 and 2 at the smallest size, 2 at the
  others, and reports tokenization MB/s (text bytes / build seconds, reading and writing
  included), the build's peak RSS (the main process's VmHWM, and its largest worker) and the size
  of the caches;
- times the `tokenizers` library's own `encode_batch` on the same paragraphs (its own threads, all
  cores; reading the file is not timed): the floor a build's throughput is compared with;
- times a start with the caches in place (`prepare_data` + `setup`, after the imports);
- at the largest size, trains the default model for `--steps` steps with the bare loop of
  spannorm.bench and reports the wait for the next batch as a share of a step.

    python scripts/benchmark_data.py --default-path --sizes-gb 0.25 1 [--repo DIR] [--work DIR]

measures instead the path a user takes first: whole `train.py` processes with `data=text` and the
default BPE tokenizer (trained by the build), a 1-block model, `trainer.max_steps=1` (validation
limited to 4 batches), first on an empty data_dir (cold: corpus hashing, BPE training,
tokenization), then `--starts` times with the caches in place (warm; `--warm-only`: these alone,
on the caches an earlier run left). Each reports the wall time of the whole
process, the time from its start (interpreter, imports) to the first training step, and the peak
RSS of the process and of its largest descendant (a tokenizing worker). `--repo` runs another
checkout's `train.py` and package (a worktree of an older commit, for before/after numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MB = 1e6


def write_corpus(path: Path, n_bytes: int, seed: int = 0) -> Path:
    """~`n_bytes` of paragraphs ("\\n\\n"-separated lines of Zipf-distributed made-up words)."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlucmfwypvbgkjqxz"))
    weights = 1 / np.arange(1, 27)
    words = [
        "".join(rng.choice(letters, rng.integers(1, 9), p=weights / weights.sum()))
        for _ in range(20000)
    ]
    zipf = 1 / np.arange(1, len(words) + 1)
    zipf /= zipf.sum()
    paragraphs = []
    for _ in range(4000):
        lines = []
        for _ in range(rng.integers(1, 5)):
            picked = rng.choice(len(words), rng.integers(4, 14), p=zipf)
            lines.append(" ".join(words[i] for i in picked).capitalize() + ".")
        paragraphs.append("\n".join(lines))
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < n_bytes:
            block = "\n\n".join(paragraphs[i] for i in rng.integers(0, len(paragraphs), 2000))
            f.write(block + "\n\n")
            written += len(block) + 2
    return path


def child(*args: str) -> dict:
    """Run this script's `args` mode in a fresh process; its JSON result."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, __file__, *args], env=env, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"{args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def datamodule(corpus: Path, cache: Path, num_proc: int):
    from spannorm.data import TextDataModule

    return TextDataModule(
        source="text",
        train_files=str(corpus / "train.txt"),
        validation_files=str(corpus / "validation.txt"),
        tokenizer="hf",
        tokenizer_file=str(corpus.parent / "tokenizer.json"),
        data_dir=str(cache),
        num_proc=num_proc,
    )


def mode_build(corpus: Path, cache: Path, num_proc: int) -> dict:
    from spannorm.bench.memory import PeakRSSWatch

    module = datamodule(corpus, cache, num_proc)
    # the tokenizing workers are the forkserver's children, so not this process's to wait for
    with PeakRSSWatch(descendants=True, interval=0.2) as watch:
        start = time.perf_counter()
        module.prepare_data()
        seconds = time.perf_counter() - start
    text = sum((corpus / f"{s}.txt").stat().st_size for s in ("train", "validation"))
    cache_bytes = sum(p.stat().st_size for p in (cache / "cache").glob("tokens-*/*"))
    return {
        "seconds": seconds,
        "mb_per_s": text / MB / seconds,
        "peak_rss_mib": watch.root_mib,
        # the largest process below this one: a tokenizing worker or their forkserver (none at
        # num_proc=1)
        "worker_peak_rss_mib": watch.largest_descendant_mib,
        "cache_mb": cache_bytes / MB,
    }


def mode_encode_batch(corpus: Path) -> dict:
    """The `tokenizers` library alone: encode_batch over the same samples, in batches of 1024."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(corpus.parent / "tokenizer.json"))
    seconds, text = 0.0, 0
    for split in ("train", "validation"):
        with open(corpus / f"{split}.txt", encoding="utf-8") as f:
            rest = ""
            while chunk := f.read(1 << 24):
                paragraphs = (rest + chunk).split("\n\n")
                rest = paragraphs.pop()
                for i in range(0, len(paragraphs), 1024):
                    batch = [p + "\n\n" for p in paragraphs[i : i + 1024] if p]
                    start = time.perf_counter()
                    tokenizer.encode_batch(batch, add_special_tokens=False)
                    seconds += time.perf_counter() - start
        text += (corpus / f"{split}.txt").stat().st_size
    return {"seconds": seconds, "mb_per_s": text / MB / seconds}


def mode_start(corpus: Path, cache: Path) -> dict:
    module = datamodule(corpus, cache, 1)
    start = time.perf_counter()
    module.prepare_data()
    module.setup("fit")
    return {"seconds": time.perf_counter() - start, "tokens": len(module.train_tokens)}


def mode_steps(corpus: Path, cache: Path, steps: int) -> dict:
    """The default model trained by the bare loop on the cached tokens: wait share of a step."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from spannorm.bench.bare import BareLoop, bare_steps, endless
    from spannorm.runs import register_resolvers

    register_resolvers()  # ${tokenizer_vocab:...} and the others of conf/
    overrides = [
        "data=text",
        f"data.train_files={corpus / 'train.txt'}",
        f"data.validation_files={corpus / 'validation.txt'}",
        "data.tokenizer=hf",
        f"data.tokenizer_file={corpus.parent / 'tokenizer.json'}",
        f"data.data_dir={cache}",
        "run_dir=.",
    ]
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        cfg = compose("train", overrides=overrides)
    module = instantiate(cfg.data)
    module.setup("fit")
    loop = BareLoop(instantiate(cfg.model), steps + 3, cfg.trainer.gradient_clip_val)
    batches = endless(module.train_dataloader())
    bare_steps(loop, batches, 3)
    periods, waits = bare_steps(loop, batches, steps)
    return {
        "median_step_s": statistics.median(periods),
        "median_wait_s": statistics.median(waits),
        "wait_share": sum(waits) / sum(periods),
    }


def default_path_overrides(corpus: Path, cache: Path, run_dir: Path) -> list[str]:
    """`train.py` overrides of the default data path at `corpus`: text files, BPE, 1 block, 1 step."""
    return [
        "data=text",
        f"data.train_files={corpus / 'train.txt'}",
        f"data.validation_files={corpus / 'validation.txt'}",
        f"data.data_dir={cache}",
        "model.n_layers=1",
        "trainer.max_steps=1",
        "+trainer.limit_val_batches=4",
        f"hydra.run.dir={run_dir}",
    ]


def mode_default(repo: Path, corpus: Path, cache: Path, run_dir: Path, started: float) -> dict:
    """One whole `train.py` of `repo` in this process (started at wall time `started`), as
    `python train.py` runs it: the time to its first training step. (Its parent samples its
    memory: `repo` may predate this script's helpers.)"""
    from spannorm.training.lm import LanguageModel

    first_step: list[float] = []
    training_step = LanguageModel.training_step

    def timed_training_step(self, *args, **kwargs):
        if not first_step:
            first_step.append(time.time())
        return training_step(self, *args, **kwargs)

    LanguageModel.training_step = timed_training_step
    sys.argv = [str(repo / "train.py"), *default_path_overrides(corpus, cache, run_dir)]
    import runpy

    code = 0
    try:
        runpy.run_path(str(repo / "train.py"), run_name="__main__")
    except SystemExit as exit:
        code = exit.code or 0
    if code or not first_step:
        raise RuntimeError(f"train.py exited {code} (first step reached: {bool(first_step)})")
    return {"first_step_s": first_step[0] - started}


def watched_child(repo: Path, *args: str) -> dict:
    """`child`, with the peak RSS of the process and of its largest descendant (a tokenizing
    worker) sampled from here while it runs."""
    from spannorm.bench.memory import PeakRSSWatch

    env = {**os.environ, "PYTHONPATH": str(repo / "src"), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, __file__, *args], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    watch = PeakRSSWatch(process.pid, descendants=True, interval=0.2).start()
    out, err = process.communicate()
    watch.stop(final_sample=False)  # the child is reaped: its pid may name another process
    if process.returncode != 0:
        raise RuntimeError(f"{args} failed:\n{out[-3000:]}\n{err[-3000:]}")
    return {
        **json.loads(out.strip().splitlines()[-1]),
        "peak_rss_mib": watch.root_mib,
        "worker_peak_rss_mib": watch.largest_descendant_mib,
    }


def default_path(args: argparse.Namespace, work: Path) -> dict:
    """Cold and warm whole-process starts of the default path at each size (see the docstring)."""
    from spannorm.bench.machine import describe_machine

    repo = (args.repo or REPO).resolve()
    commit = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    results = {
        "machine": describe_machine(),
        "repo": str(repo),
        "commit": commit,
        "load_before": os.getloadavg(),
        "sizes": {},
    }
    for size in sorted(args.sizes_gb):
        corpus = work / f"{size}gb"
        corpus.mkdir(exist_ok=True)
        if not (corpus / "train.txt").is_file():
            write_corpus(corpus / "validation.txt", 2 * 10**6, seed=2)
            write_corpus(corpus / "train.txt", int(size * 1e9), seed=3)
        cache = work / f"default-{commit}-{size}gb"
        names = [f"warm{i}" for i in range(1, args.starts + 1)]
        if not args.warm_only:  # else: the caches a previous run left
            shutil.rmtree(cache, ignore_errors=True)
            names.insert(0, "cold")
        row = {}
        for name in names:
            run_dir = cache / "runs" / f"{name}-{time.time_ns()}"
            started = time.time()
            measured = watched_child(
                repo, "--mode", "default", "--repo", str(repo), "--corpus", str(corpus),
                "--cache", str(cache / "data"), "--run-dir", str(run_dir),
                "--started", repr(started),
            )  # fmt: skip
            measured["process_s"] = time.time() - started
            row[name] = measured
            print(size, name, measured, flush=True)
        for key in ("first_step_s", "process_s", "peak_rss_mib"):
            warm = [row[name][key] for name in names if name.startswith("warm")]
            row[f"warm_{key}_median"] = statistics.median(warm) if warm else None
        results["sizes"][str(size)] = row
    results["load_after"] = os.getloadavg()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes-gb", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    parser.add_argument("--work", type=Path, default=None, help="scratch dir (default: a temp dir)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--starts", type=int, default=3, help="fresh starts timed at each size")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON")
    parser.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--corpus", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--num-proc", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument(
        "--default-path", action="store_true", help="whole train.py processes, BPE trained here"
    )
    parser.add_argument("--repo", type=Path, default=None, help="checkout whose train.py runs")
    parser.add_argument(
        "--warm-only", action="store_true", help="--default-path: only warm starts, on the caches"
    )
    parser.add_argument("--run-dir", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--started", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:  # a child process: one measurement, printed as JSON
        if args.mode == "default":
            result = mode_default(args.repo, args.corpus, args.cache, args.run_dir, args.started)
        elif args.mode == "build":
            result = mode_build(args.corpus, args.cache, args.num_proc)
        elif args.mode == "encode_batch":
            result = mode_encode_batch(args.corpus)
        elif args.mode == "start":
            result = mode_start(args.corpus, args.cache)
        else:
            result = mode_steps(args.corpus, args.cache, args.steps)
        print(json.dumps(result))
        return

    work = args.work or Path(tempfile.mkdtemp(prefix="benchmark_data-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.default_path:
        results = default_path(args, work)
        print(json.dumps(results, indent=1))
        if args.out:
            args.out.write_text(json.dumps(results, indent=1) + "\n")
        return
    sizes = sorted(args.sizes_gb)
    tokenizer_file = work / "tokenizer.json"
    if not tokenizer_file.is_file():
        from spannorm.data import BPETokenizer

        sample = write_corpus(work / "sample.txt", 8 * 10**6, seed=1)
        BPETokenizer.train([sample.read_text()], vocab_size=8192).save(tokenizer_file)
    from spannorm.bench.machine import describe_machine

    results = {
        "machine": describe_machine(),
        "load_before": os.getloadavg(),
        "sizes": {},
    }
    for size in sizes:
        corpus = work / f"{size}gb"
        corpus.mkdir(exist_ok=True)
        if not (corpus / "train.txt").is_file():
            write_corpus(corpus / "validation.txt", 2 * 10**6, seed=2)
            write_corpus(corpus / "train.txt", int(size * 1e9), seed=3)
        row = {}
        for num_proc in (1, 2) if size == sizes[0] else (2,):
            cache = corpus / f"cache-np{num_proc}"
            shutil.rmtree(cache, ignore_errors=True)
            build = ["--corpus", str(corpus), "--cache", str(cache)]
            row[f"build_np{num_proc}"] = child(
                "--mode", "build", *build, "--num-proc", str(num_proc)
            )
            print(size, num_proc, row[f"build_np{num_proc}"], flush=True)
        if size == sizes[0]:
            row["encode_batch"] = child("--mode", "encode_batch", "--corpus", str(corpus))
            print(size, "encode_batch", row["encode_batch"], flush=True)
        starts = [
            child("--mode", "start", "--corpus", str(corpus), "--cache", str(cache))["seconds"]
            for _ in range(args.starts)
        ]
        row["start_s_median"] = statistics.median(starts)
        row["start_s"] = starts
        print(size, "start_s", starts, flush=True)
        if size == sizes[-1]:
            row["steps"] = child(
                "--mode", "steps", "--corpus", str(corpus), "--cache", str(cache),
                "--steps", str(args.steps),
            )  # fmt: skip
        print(size, {k: v for k, v in row.items() if not k.startswith("build")}, flush=True)
        results["sizes"][str(size)] = row
    results["load_after"] = os.getloadavg()
    small, large = results["sizes"][str(sizes[0])], results["sizes"][str(sizes[-1])]
    results["rss_ratio_largest_to_smallest"] = (
        large["build_np2"]["peak_rss_mib"] / small["build_np2"]["peak_rss_mib"]
    )
    results["encode_batch_over_build_np2"] = (
        small["encode_batch"]["mb_per_s"] / small["build_np2"]["mb_per_s"]
    )
    print(json.dumps(results, indent=1))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
