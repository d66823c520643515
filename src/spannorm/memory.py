"""Peak resident memory of a process, read one way: the kernel's high-water mark of the process's
resident set, `VmHWM` in /proc/<pid>/status. The throughput monitor logs it and the benchmarks
(spannorm.bench.memory) sample it; it imports nothing of the package, so either can use it.

Not `getrusage(...).ru_maxrss` (nor `wait4`'s, nor `/usr/bin/time`'s, which report the same): on
Linux that maximum survives `execve`, so a process started from a large one reports at least the
resident set its parent had when it forked. Measured here: a Python process holding 600 MiB
started `python -c pass`; the child's ru_maxrss read 613 MiB and its VmHWM 13 MiB. A benchmark
starts `train.py` from a process with torch loaded, and Lightning starts its DDP processes the same
way, so ru_maxrss would charge them their parent's memory. VmHWM belongs to the address space the
process got at exec.

A process's VmHWM is gone once it exits, so a parent reads a child's by sampling it while it
runs (`spannorm.bench.memory.PeakRSSWatch`). Because it is a high-water mark, sampling loses no
short-lived peak: every peak before the last sample is in it, and only growth in the last interval
before the exit can be missed. Where there is no /proc (macOS), `peak_rss_mib` of this process
falls back to ru_maxrss, the only figure there is.
"""

from __future__ import annotations

import resource
import sys
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
