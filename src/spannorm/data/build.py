"""Tokenize a stream of text batches into a shard directory: in parallel, with bounded memory,
resumable, and once however many processes ask for it at the same time."""

from __future__ import annotations

import ctypes
import itertools
import json
import multiprocessing
import os
import shutil
import signal
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from .shards import (
    INDEX,
    PROGRESS,
    SHARDS_FORMAT_VERSION,
    ShardWriter,
    build_lock,
    read_index,
    write_json,
)
from .tokenizer import Tokenizer

# Batches handed out per worker process before the oldest result is awaited: bounds the text and
# tokens in flight (and so the memory of a build) whatever the corpus size.
BATCHES_IN_FLIGHT_PER_PROCESS = 4


def default_num_proc() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


class Encoder:
    """Text batch -> one token array: each text followed by `separator` (and EOS if `eos_id` is
    not None), exactly as the samples of a split are concatenated."""

    def __init__(self, tokenizer: Tokenizer, separator: str, eos_id: int | None, dtype) -> None:
        self.tokenizer = tokenizer
        self.separator = separator
        self.eos = [] if eos_id is None else [eos_id]
        self.dtype = np.dtype(dtype)

    def __call__(self, texts: list[str]) -> np.ndarray:
        ids = self.tokenizer.encode_batch([text + self.separator for text in texts])
        return np.fromiter(itertools.chain.from_iterable(i + self.eos for i in ids), self.dtype)


_worker_encoder: Encoder | None = None
# How often a worker checks that the process it tokenizes for is still there.
PARENT_CHECK_SECONDS = 0.5
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, killed but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True


def _die_with(pid: int) -> None:
    """End this worker as soon as process `pid` (the build's) is gone, however it went: a killed
    build leaves no worker behind, blocked on a full result pipe that nobody reads any more."""
    if sys.platform.startswith("linux"):
        # the forkserver, this worker's parent, ends when the build does; this follows it at once
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

    def watch() -> None:
        while _alive(pid):
            threading.Event().wait(PARENT_CHECK_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _init_worker(encoder: Encoder, build_pid: int) -> None:
    global _worker_encoder
    _worker_encoder = encoder
    _die_with(build_pid)


def _encode_in_worker(texts: list[str]) -> np.ndarray:
    return _worker_encoder(texts)


def _worker_context() -> multiprocessing.context.BaseContext:
    """Where tokenizing workers come from: forked from a clean, single-threaded server process
    (started once per process, this module preloaded) rather than from this process, whose other
    threads (torch's, the `tokenizers` pool, a Trainer's) may hold a lock at the moment of the fork
    and so deadlock the child that next takes it."""
    if sys.platform == "win32":
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


def _encoded(
    batches: Iterable[tuple[int, list[str]]], encoder: Encoder, num_proc: int
) -> Iterator[tuple[int, np.ndarray]]:
    """(number, tokens) of each (number, texts) batch, in order; with `num_proc` > 1 and at least
    that many batches, encoded by that many worker processes, a bounded number of batches in
    flight (fewer batches are encoded here: starting workers would cost more than it saves)."""
    batches = iter(batches)
    head = list(itertools.islice(batches, max(num_proc, 1)))
    if num_proc <= 1 or len(head) < num_proc:
        for number, texts in itertools.chain(head, batches):
            yield number, encoder(texts)
        return
    # The workers use one thread each.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # unlike multiprocessing.Pool, a worker that dies fails the build (BrokenProcessPool)
    # instead of leaving its batch pending forever
    pool = ProcessPoolExecutor(num_proc, _worker_context(), _init_worker, (encoder, os.getpid()))
    try:
        pending: deque = deque()
        for number, texts in itertools.chain(head, batches):
            pending.append((number, pool.submit(_encode_in_worker, texts)))
            if len(pending) >= BATCHES_IN_FLIGHT_PER_PROCESS * num_proc:
                number, result = pending.popleft()
                yield number, result.result()
        while pending:
            number, result = pending.popleft()
            yield number, result.result()
    except BaseException:
        # a stopped build (a signal, an error, the consumer gone) ends its workers now rather
        # than after the batches in flight, which nobody will read
        for process in list((pool._processes or {}).values()):
            process.terminate()
        # Nor may the exit wait on the pipes of workers now gone: not for the batch still being
        # written to them, nor for the rest of a result one of them had begun to send (closing
        # this process's end of the result pipe, which it never writes, lets the reading thread
        # see that no more will come).
        pool._call_queue.cancel_join_thread()
        pool._result_queue._writer.close()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


class BuildStopped(BaseException):
    """A stop signal (SIGTERM, SIGINT) arrived during a build."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _StopSignals:
    """While entered, SIGTERM and SIGINT raise BuildStopped (in the main thread only: signals are
    delivered there), so the build can say what it kept before the process ends; within
    `deferred()` one waits for the end of the block, so that a shard put in place is also
    recorded as kept."""

    def __init__(self) -> None:
        self.pending: int | None = None
        self.deferring = False
        self.previous: dict[int, Any] = {}

    def _stop(self, signum: int, frame: Any) -> None:
        if self.deferring:
            self.pending = signum
            return
        raise BuildStopped(signum)

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self.previous[signum] = signal.signal(signum, self._stop)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    @contextmanager
    def deferred(self) -> Iterator[None]:
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False
        if self.pending is not None:
            raise BuildStopped(self.pending)


def _report_stop(stopped: BuildStopped, directory: Path, finished: list[dict]) -> None:
    """Say what a stopped build kept and how to go on, then end with 128 + the signal."""
    tokens = sum(shard["tokens"] for shard in finished)
    kept = (
        f"kept {len(finished)} finished shard(s), {tokens:,} tokens, in {directory}"
        if finished
        else f"no shard of {directory} was finished yet"
    )
    print(
        f"stopped by {stopped} while tokenizing: {kept}; run the same command again and the "
        "build resumes from its finished shards",
        file=sys.stderr,
        flush=True,
    )
    raise SystemExit(128 + stopped.signum) from None


def _resume_point(directory: Path, settings: dict[str, Any]) -> tuple[list[dict], int, int]:
    """(finished shards, batch number, tokens of that batch already written) of a build cut
    short with the same `settings`; nothing finished if there is none (stale files removed)."""
    try:
        progress = json.loads((directory / PROGRESS).read_text())
        if progress["settings"] == settings:
            shards = progress["shards"]
            if all((directory / s["name"]).is_file() for s in shards):
                keep = {s["name"] for s in shards} | {PROGRESS}
                for path in directory.iterdir():
                    if path.name not in keep:
                        path.unlink()
                batch, skip = progress["resume"]
                return shards, batch, skip
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if directory.exists():
        shutil.rmtree(directory)
    return [], 0, 0


def build_split(
    directory: Path,
    batches: Callable[[], Iterable[list[str]]],
    encoder: Encoder,
    *,
    shard_tokens: int,
    num_proc: int,
    record: dict[str, Any],
    max_tokens: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> bool:
    """Tokenize the text batches of `batches()` into shards under `directory` unless its index is
    already there; returns whether it built. A build cut short resumes from its finished shards
    (`record`, stored in the index, must match). `max_tokens` stops the split at that many tokens;
    `progress(texts, characters)` is called per batch tokenized."""
    if (directory / INDEX).is_file():
        return False
    with build_lock(directory):
        if (directory / INDEX).is_file():  # another process built it while this one waited
            return False
        settings = {**record, "shard_tokens": shard_tokens, "max_tokens": max_tokens}
        finished, resume_batch, skip = _resume_point(directory, settings)
        writer = ShardWriter(directory, encoder.dtype, shard_tokens, finished)
        total = sum(shard["tokens"] for shard in finished)

        def todo() -> Iterator[tuple[int, list[str]]]:
            for number, texts in enumerate(batches()):
                if number >= resume_batch:
                    if progress is not None:
                        progress(len(texts), sum(map(len, texts)))
                    yield number, texts

        recorded = list(finished)  # the shards progress.json lists: what a resume keeps
        try:
            with _StopSignals() as stops, closing(_encoded(todo(), encoder, num_proc)) as encoded:
                for number, tokens in encoded:
                    offset = skip if number == resume_batch else 0  # written before the cut
                    tokens = tokens[offset:]
                    if max_tokens is not None:
                        tokens = tokens[: max_tokens - total]
                    start = 0
                    while start < len(tokens):
                        take = min(len(tokens) - start, writer.room)
                        writer.write(tokens[start : start + take])
                        start, total = start + take, total + take
                        if writer.room == 0:
                            with stops.deferred():  # in place and recorded, or neither
                                writer.finish_shard()
                                resume = [number, offset + start]
                                state = {
                                    "settings": settings,
                                    "shards": writer.finished,
                                    "resume": resume,
                                }
                                write_json(directory / PROGRESS, state)
                                recorded = list(writer.finished)
                    if max_tokens is not None and total >= max_tokens:
                        break
                with stops.deferred():
                    writer.finish_shard()
        except BuildStopped as stopped:
            writer.abort()
            _report_stop(stopped, directory, recorded)
        except BaseException:
            writer.abort()
            raise
        write_json(
            directory / INDEX,
            {
                "format": SHARDS_FORMAT_VERSION,
                **record,
                "dtype": encoder.dtype.name,
                "tokens": total,
                "shard_tokens": shard_tokens,
                "shards": writer.finished,
            },
        )
        (directory / PROGRESS).unlink(missing_ok=True)
        read_index(directory)
        return True
