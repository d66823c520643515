"""Process-wide memory settings for training on CPU."""

from __future__ import annotations

import ctypes
import sys


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse rather than give it back to the kernel.

    By default it maps every block over 32 MiB straight from the kernel and unmaps it when freed;
    on CPU the [tokens, vocab] logits, their log-softmax and both gradients are such blocks, so
    each step page-faults them in again (see docs/performance.md). With mmap off and the heap
    never trimmed they are reused from the heap: faster steps for a somewhat higher peak RSS.
    A setting of the whole process, so `train` applies it (on CPU). Returns whether it applied
    (False where the C library is not glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "gnu_get_libc_version"):
        return False
    mmap_max, trim_threshold = -4, -1  # M_MMAP_MAX, M_TRIM_THRESHOLD in <malloc.h>
    return bool(libc.mallopt(mmap_max, 0)) and bool(libc.mallopt(trim_threshold, 2**31 - 1))
