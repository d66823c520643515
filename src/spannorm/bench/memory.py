"""Peak resident memory of a process, read one way: the kernel's high-water mark of the process's
resident set, `VmHWM` in /proc/<pid>/status.

Not `getrusage(...).ru_maxrss` (nor `wait4`'s, nor `/usr/bin/time`'s, which report the same): on
Linux that maximum survives `execve`, so a process started from a large one reports at least the
resident set its parent had when it forked. Measured here: a Python process holding 600 MiB
started `python -c pass`; the child's ru_maxrss read 613 MiB and its VmHWM 13 MiB. A benchmark
starts `train.py` from a process with torch loaded, and Lightning starts its DDP processes the same
way, so ru_maxrss would charge them their parent's memory. VmHWM belongs to the address space the
process got at exec.

A process's VmHWM is gone once it exits, so a parent reads a child's by sampling it while it
runs (`PeakRSSWatch`). Because it is a high-water mark, sampling loses no short-lived peak: every
peak before the last sample is in it, and only growth in the last interval before the exit can
be missed. Where there is no /proc (macOS), `peak_rss_mib` of this process falls back to
ru_maxrss, the only figure there is.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

PROC = Path("/proc")


def peak_rss_mib(pid: int | str = "self") -> float | None:
    """The peak resident set size of process `pid` (this one by default) in MiB, from its VmHWM;
    None if the process is gone (or has no address space left: a zombie)."""
    try:
        status = (PROC / str(pid) / "status").read_text()
    except OSError:
        if pid == "self" and not PROC.is_dir():
            max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            return max_rss / (2**20 if sys.platform == "darwin" else 2**10)  # bytes there
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**10  # kB
    return None


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
