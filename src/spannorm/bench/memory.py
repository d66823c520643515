"""Memory of the processes a benchmark runs: their peak resident sets (spannorm.memory's
`peak_rss_mib`, sampled while they run: `PeakRSSWatch`, `run_logged`) and page faults.
"""

from __future__ import annotations

import os
import resource
import subprocess
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

from spannorm.memory import PROC, peak_rss_mib


def minor_faults() -> int:
    """Minor page faults of this process so far: pages the kernel mapped in on first touch."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def descendants(root: int) -> list[int]:
    """The processes below `root` (children, their children, ...), from /proc."""
    parents = {}
    for stat in PROC.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    found = []
    for pid in parents:
        ancestor = parents.get(pid)
        while ancestor not in (None, 0, 1, root):
            ancestor = parents.get(ancestor)
        if ancestor == root:
            found.append(pid)
    return found


class PeakRSSWatch:
    """Samples `peak_rss_mib` of process `pid` (default: this one) and, with `descendants`, of
    every process below it, every `interval` seconds on a thread, from `start()` (or entering the
    `with` block) to `stop()`; `peaks` holds each process's highest reading.

    A worker process of a pool (a forkserver's child, say) is not its creator's to wait for, so
    sampling is the way to read its peak."""

    def __init__(self, pid: int | None = None, descendants: bool = False, interval: float = 0.1):
        self.pid = os.getpid() if pid is None else pid
        self.with_descendants, self.interval = descendants, interval
        self.peaks: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        pids = [self.pid, *(descendants(self.pid) if self.with_descendants else [])]
        for pid in pids:
            peak = peak_rss_mib(pid)
            if peak is not None:
                self.peaks[pid] = max(self.peaks.get(pid, 0.0), peak)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def start(self) -> PeakRSSWatch:
        self.sample()
        self._thread.start()
        return self

    def stop(self, final_sample: bool = True) -> None:
        """Stop sampling, after one last sample unless `final_sample` is False (a reaped child's
        pid may already name another process)."""
        self._stop.set()
        self._thread.join()
        if final_sample:
            self.sample()

    def __enter__(self) -> PeakRSSWatch:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def root_mib(self) -> float | None:
        """The watched process's own peak."""
        return self.peaks.get(self.pid)

    @property
    def largest_descendant_mib(self) -> float:
        """The highest peak of any process below it (0 if none was seen)."""
        return max((mib for pid, mib in self.peaks.items() if pid != self.pid), default=0.0)


def run_logged(command: Sequence[str], log_path: Path, env: Mapping[str, str]) -> float | None:
    """Run `command` with its output in `log_path`; its peak RSS in MiB (`PeakRSSWatch`)."""
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        watch = PeakRSSWatch(process.pid, interval=0.05).start()
        process.wait()
        watch.stop(final_sample=False)
    if process.returncode:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{' '.join(command)} exited {process.returncode}:\n{tail}")
    return watch.root_mib
