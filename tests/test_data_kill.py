"""A killed shard build leaves no process behind, and a SIGTERM says what the build kept."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # each case starts a forkserver that imports the package

# A build with two tokenizing processes, as `python train.py data.num_proc=2` runs one.
DRIVER = """
import sys
from spannorm.data import TextDataModule

if __name__ == "__main__":
    train, validation, data_dir = sys.argv[1:]
    TextDataModule(
        source="text", train_files=train, validation_files=validation, tokenizer="byte",
        data_dir=data_dir, num_proc=2, shard_tokens=1 << 18,
    ).prepare_data()
    print("the build finished before it was killed")
"""


def _parents() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state) of every process, read from /proc."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        found[int(stat.parent.name)] = (int(fields[1]), fields[0])
    return found


def _descendants(pid: int) -> set[int]:
    table = _parents()
    below, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, (parent, _) in table.items() if parent in frontier} - below
        below |= frontier
    return below


def _running(pids: set[int]) -> dict[int, str]:
    """The processes of `pids` still running (zombies are not), with their command lines."""
    table, running = _parents(), {}
    for pid in pids:
        if pid in table and table[pid][1] != "Z":
            try:
                command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            running[pid] = command.decode(errors="replace")[:120]
    return running


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """80 MB of text: about 20 s of building here, so a kill lands in the middle of it."""
    root = tmp_path_factory.mktemp("kill")
    block = "".join(
        f"Paragraph {i}: the quick brown fox jumps.\nOver {i}.\n\n" for i in range(20000)
    )
    with open(root / "train.txt", "w") as f:
        for _ in range(-(-80 * 10**6 // len(block))):
            f.write(block)
    (root / "validation.txt").write_text(block[:5000])
    return root


def _start_and_kill(corpus: Path, data_dir: Path, signum: int):
    """Start the build, kill its main process with `signum` once it has finished a shard, and
    return (the process, its descendants seen just before the kill, seconds until it ended)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [str(corpus / "train.txt"), str(corpus / "validation.txt"), str(data_dir)]
    build = subprocess.Popen(
        [sys.executable, "-c", DRIVER, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not list(data_dir.glob("cache/tokens-*-train/shard-00000.bin")):
            assert build.poll() is None, build.communicate()
            assert time.monotonic() < deadline, "the build finished no shard in 4 minutes"
            time.sleep(0.05)
        seen = _descendants(build.pid)
        build.send_signal(signum)
        killed = time.monotonic()
        try:
            build.wait(timeout=60)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the build still ran 60 s after signal {signum}") from None
        return build, seen, time.monotonic() - killed
    finally:
        if build.poll() is None:
            build.kill()
            build.wait()


def _assert_none_outlives(seen: set[int], seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while (left := _running(seen)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in left:  # this test's own processes: end them, so that a failure leaves none
        os.kill(pid, signal.SIGKILL)
    assert not left, f"alive {seconds:.0f} s after the build ended: {left}"


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM])
def test_no_process_of_a_killed_build_outlives_it(corpus, tmp_path, signum):
    build, seen, _ = _start_and_kill(corpus, tmp_path / "data", signum)
    # the forkserver, two workers and the resource tracker were there to be left behind
    assert len(seen) >= 3, f"expected the build's worker processes, found {seen}"
    _assert_none_outlives(seen)
    build.communicate()  # (the processes left behind would hold its pipes open)
    assert build.returncode == -signum if signum == signal.SIGKILL else 128 + signum


def test_a_sigterm_during_a_build_says_what_it_kept_and_how_to_go_on(corpus, tmp_path):
    build, seen, seconds = _start_and_kill(corpus, tmp_path / "data", signal.SIGTERM)
    _assert_none_outlives(seen)
    out, err = build.communicate()
    assert build.returncode == 143 and seconds < 10
    (split_dir,) = (tmp_path / "data" / "cache").glob("tokens-*-train")
    kept = json.loads((split_dir / "progress.json").read_text())["shards"]
    tokens = sum(shard["tokens"] for shard in kept)
    (line,) = err.strip().splitlines()
    assert line == (
        f"stopped by SIGTERM while tokenizing: kept {len(kept)} finished shard(s), {tokens:,} "
        f"tokens, in {split_dir}; run the same command again and the build resumes from its "
        "finished shards"
    )
    assert sorted(p.name for p in split_dir.glob("shard-*.bin")) == [s["name"] for s in kept]
    assert not list(split_dir.glob(".*tmp"))  # the shard in progress was removed
