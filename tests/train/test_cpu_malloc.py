"""``tune_cpu_malloc``: large CPU blocks come from glibc's heap, not a fresh mmap each time."""

import os
import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent("""
    import ctypes
    import torch
    from molf.train.cpu_malloc import tune_cpu_malloc

    class MallInfo(ctypes.Structure):
        _fields_ = [(name, ctypes.c_int) for name in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo.restype = MallInfo
    applied = tune_cpu_malloc()
    before = libc.mallinfo().hblkhd
    big = torch.ones(64 * 2**20 // 4)  # 64 MiB: above glibc's largest mmap threshold
    mapped = libc.mallinfo().hblkhd - before
    del big
    heap = libc.mallinfo().arena
    again = torch.ones(48 * 2**20 // 4)  # smaller: the aligned request fits the freed block
    reused = libc.mallinfo().arena == heap  # the freed block was kept and served again
    print(applied, mapped >= 64 * 2**20, reused)
""")


def _child(**env) -> str:
    result = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120,
                            env={**os.environ, **env})
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tuning; a no-op elsewhere")
def test_large_blocks_are_served_from_the_heap_and_reused():
    assert _child() == ["True", "False", "True"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tuning; a no-op elsewhere")
def test_disabled_by_environment_keeps_glibc_defaults():
    applied, mapped, _ = _child(MOLF_CPU_MALLOC="0")
    assert (applied, mapped) == ("False", "True")
