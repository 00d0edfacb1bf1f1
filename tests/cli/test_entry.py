"""The entry point's process set-up: glibc's mmap threshold fixed for full commands, its heaps
padded for ``restore tables``, and the garbage collector kept off the start-up and the exit of
a command."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

glibc_only = pytest.mark.skipif(not hasattr(os, "confstr") or not os.confstr("CS_GNU_LIBC_VERSION"),
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


@glibc_only
def test_a_freed_large_block_no_longer_moves_later_buffers_onto_the_heap() -> None:
    """Without the fixed threshold, freeing an 8 MiB block makes glibc serve the next 2 MiB
    buffer from a heap that keeps its pages; with it, the buffer is mapped on its own (and
    unmapped when freed)."""
    assert _probe("default") == ["None", "0"]
    assert _probe("fixed") == ["True", "1"]


@glibc_only
def test_the_users_own_threshold_is_left_alone() -> None:
    assert _probe("fixed", MALLOC_MMAP_THRESHOLD_="4194304")[0] == "False"


PAD_PROBE = textwrap.dedent("""
    import resource, sys
    from backup_tool.cli import entry

    if sys.argv[1] == "restore":
        sys.argv = ["backup-tool", "restore", "tables", "--help"]
        try:
            entry.main()
        except SystemExit:
            pass
    entry.fixed_mmap_threshold()
    bytearray(900 << 10)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        bytearray(900 << 10)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before < 20 * 225 // 2)
""")


def _pad_probe(mode: str, **env: str) -> str:
    out = subprocess.run([sys.executable, "-c", PAD_PROBE, mode], cwd=ROOT, capture_output=True, text=True,
                         check=True, env={k: v for k, v in os.environ.items() if k != "MALLOC_TOP_PAD_"} | env)
    return out.stdout.split()[-1]


@glibc_only
def test_restore_tables_keeps_a_padded_heap_top_instead_of_giving_each_freed_buffer_back() -> None:
    """Buffers under the mmap threshold made and freed in turn: a command gives each back to
    the kernel and faults the next one's 225 pages in again; ``restore tables`` keeps them."""
    assert _pad_probe("other") == "False"
    assert _pad_probe("restore") == "True"
    assert _pad_probe("restore", MALLOC_TOP_PAD_="0") == "False"


GC_PROBE = textwrap.dedent("""
    import gc, sys
    from backup_tool.cli import entry

    if sys.argv[1] == "off":
        gc.disable()
    import backup_tool.cli.program  # what a command loads: the CLI, Typer
    loaded = len(gc.get_objects())
    getattr(entry, sys.argv[2])()
    print(gc.isenabled(), loaded > 10000, len(gc.get_objects()) < loaded // 10)
""")


def _gc_probe(state: str, step: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", GC_PROBE, state, step], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    return out.stdout.split()


def test_a_command_that_loaded_with_the_collector_off_gets_it_back_without_the_loaded_objects() -> None:
    """``restore tables`` loads with the collector off; turned back on, its passes skip what was loaded."""
    assert _gc_probe("off", "resume_collection") == ["True", "True", "True"]


def test_a_collector_already_on_is_left_as_it_is() -> None:
    """A command run in-process (tests) keeps its collector as it was: nothing is exempted."""
    assert _gc_probe("on", "resume_collection") == ["True", "True", "False"]


def test_at_exit_the_objects_alive_are_out_of_the_collectors_passes() -> None:
    assert _gc_probe("on", "exempt_from_collection") == ["True", "True", "True"]


BACKUP_GC_PROBE = textwrap.dedent("""
    import gc, sys
    from backup_tool.cli import entry

    before_open = []
    gc.callbacks.append(lambda phase, info: phase == "start" and before_open.append(
        "backup_tool.repository.storage.local" not in sys.modules))
    sys.argv = ["backup-tool", *sys.argv[1:]]
    try:
        entry.main()
    except SystemExit as exc:
        print(exc.code, any(before_open), gc.isenabled())
""")


@pytest.mark.parametrize("kind", ["full", "incremental"])
def test_a_backup_loads_and_opens_its_repository_before_the_collector_runs(tmp_path: Path, kind: str) -> None:
    """``backup full|incremental`` load the CLI and open their repository with the collector
    off (building an S3 client set off 20-35 ms of collections), then turn it back on: here
    the command fails at the database, after the repository was opened."""
    out = subprocess.run([sys.executable, "-c", BACKUP_GC_PROBE, "backup", kind, "--repo", str(tmp_path / "repo"),
                          "--dsn", f"host={tmp_path}/no-server port=1 dbname=app"],
                         cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1", "False", "True"], out.stderr
