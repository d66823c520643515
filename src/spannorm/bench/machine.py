"""The machine a benchmark ran on, as its results describe it."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what `platform` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    for line in lines:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def describe_machine() -> str:
    """`<cores>-core <CPU model> CPU, no GPU` (`a GPU` if torch sees one)."""
    gpu = "a" if torch.cuda.is_available() else "no"
    return f"{os.cpu_count()}-core {cpu_model()} CPU, {gpu} GPU"


def load_average() -> float:
    """The 1-minute load average: how busy the machine was besides (and with) the benchmark."""
    return round(os.getloadavg()[0], 2)


def software() -> str:
    """`torch <version>, <n> threads`: what sets the speed besides the hardware."""
    return f"torch {torch.__version__}, {torch.get_num_threads()} threads"
