"""The entry point's process set-up: glibc's mmap threshold fixed for full commands."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(not hasattr(os, "confstr") or not os.confstr("CS_GNU_LIBC_VERSION"),
                                reason="glibc only")

PROBE = textwrap.dedent("""
    import ctypes, sys
    from backup_tool.cli.entry import fixed_mmap_threshold

    class Info(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                   "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = Info
    applied = fixed_mmap_threshold() if sys.argv[1] == "fixed" else None
    big = bytearray(8 << 20)
    del big
    before = libc.mallinfo2().hblks
    block = bytearray(2 << 20)
    print(applied, libc.mallinfo2().hblks - before)
""")


def _probe(mode: str, **env: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"} | env)
    return out.stdout.split()


def test_a_freed_large_block_no_longer_moves_later_buffers_onto_the_heap() -> None:
    """Without the fixed threshold, freeing an 8 MiB block makes glibc serve the next 2 MiB
    buffer from a heap that keeps its pages; with it, the buffer is mapped on its own (and
    unmapped when freed)."""
    assert _probe("default") == ["None", "0"]
    assert _probe("fixed") == ["True", "1"]


def test_the_users_own_threshold_is_left_alone() -> None:
    assert _probe("fixed", MALLOC_MMAP_THRESHOLD_="4194304")[0] == "False"
