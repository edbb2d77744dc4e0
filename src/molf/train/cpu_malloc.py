"""Keep freed memory in the process when training on the CPU (glibc only).

glibc serves every allocation above 32 MiB with a fresh ``mmap`` and returns it on ``free``. A training
step allocates and frees many tensors that large (the vocab logits and their gradients, the tied
embedding's gradient, each weight gradient after ``zero_grad(set_to_none=True)``), so every step the
kernel maps and zeroes the same gigabytes again: at Qwen2.5-1.5B layer shapes on a 2-core VM that is
about a quarter of the step (``results/bench_train.md``). ``tune_cpu_malloc`` tells glibc to serve
large blocks from the heap and never give the heap back (``mallopt(M_MMAP_MAX, 0)`` and
``mallopt(M_TRIM_THRESHOLD, -1)``), so freed blocks are reused by the next step. The process's
resident memory then stays at its peak, which is what a training process holds anyway.

``src/script/train.py`` calls it when no GPU is visible; ``MOLF_CPU_MALLOC=0`` turns it off.
Elsewhere (macOS, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_MAX = -4


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - present in glibc only
    except (OSError, AttributeError):
        return None
    return libc


def tune_cpu_malloc() -> bool:
    """Serve large allocations from glibc's heap and never trim it; returns whether it was applied
    (False when disabled by ``MOLF_CPU_MALLOC=0``, off glibc, or when glibc refuses)."""
    if os.environ.get("MOLF_CPU_MALLOC", "1") == "0":
        return False
    libc = _glibc()
    if libc is None:
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, -1) == 1
