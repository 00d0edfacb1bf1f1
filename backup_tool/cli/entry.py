"""Process entry point, kept light: ``wal push``/``wal fetch`` called by PostgreSQL's
archiver and recovery once per file are answered from the spool before the CLI (Typer,
psycopg, boto3) is even imported, when the segment is already known to be durable in the
repository or already fetched; a plain ``wal push`` of a ready segment waits there for the
push-ahead process (started if none runs) to make it durable, and a plain ``wal fetch``
otherwise runs without the CLI. Whatever these cannot answer, the full command does.
``--version`` (and ``version``) alone is answered here too, as the CLI would answer it.
``restore tables`` forks its repository reads off here, before the CLI loads (:mod:`.ahead`),
with glibc's heaps padded (:func:`padded_heap_top`); ``backup full|incremental`` build their S3
client here and a thread makes their first repository reads while the CLI loads
(:func:`.ahead.start_backup`); all three load with the garbage collector off (:func:`resume_collection`). Every full command runs with glibc's mmap threshold fixed (:func:`fixed_mmap_threshold`) and
ends without a collector pass over what it loaded (:func:`exempt_from_collection`)."""

from __future__ import annotations

import sys

TYPE_CHECKING = False  # not typing's: see backup_tool.physical.walack
if TYPE_CHECKING:
    from backup_tool.physical.walspool import FetchArgs

PREPARED_EARLY = 2
MMAP_THRESHOLD = 1 << 20
M_MMAP_THRESHOLD = -3  # glibc's malloc.h
HEAP_TOP_PAD = 16 << 20
M_TOP_PAD = -2  # glibc's malloc.h


def main() -> None:
    if sys.argv[1:] in (["--version"], ["version"]):
        from backup_tool import __version__

        print(f"backup-tool {__version__}")
        sys.exit(0)
    if sys.argv[1:3] == ["wal", "push"]:
        _quick_push()
    elif sys.argv[1:3] in (["backup", "full"], ["backup", "incremental"]):
        import gc

        gc.disable()  # until the command has loaded and opened its repository: see resume_collection
        from backup_tool.cli import ahead

        ahead.start_backup(sys.argv[1:])  # its S3 client built, its first reads made while the CLI loads
    elif sys.argv[1:3] == ["restore", "tables"]:
        import gc

        gc.disable()  # until the command has loaded: see resume_collection
        padded_heap_top()
        from backup_tool.cli import ahead

        ahead.start(sys.argv[1:])
    elif sys.argv[1:3] == ["wal", "fetch"]:
        from backup_tool.physical.walspool import never_archived, parse_fetch, try_fast_fetch

        if try_fast_fetch(sys.argv[1:]):
            sys.exit(0)
        fetch = parse_fetch(sys.argv[1:])
        if fetch is not None:
            _quick_fetch(fetch, never_archived(fetch.name))
    fixed_mmap_threshold()
    readable_output()
    from backup_tool.cli.program import main as cli_main

    try:
        cli_main()
    finally:
        exempt_from_collection()


def readable_output() -> None:
    """A byte of a non-UTF-8 database (a SQL_ASCII or LATIN1 comment, a name) reaches the
    output as a lone surrogate: written as its escape (``\\udce9``), valid inside a JSON
    string, instead of failing the command under a UTF-8 locale's strict output."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="backslashreplace")


def resume_collection() -> None:
    """Turn the garbage collector back on, with what is alive now exempt from its passes.
    ``restore tables`` loads (Typer, psycopg, the restore's modules) with it off, and so do
    ``backup full`` and ``backup incremental`` until their repository is open: loading builds
    long-lived objects only, and the collections it set off cost 10-25 ms of CPU while a
    restore waits to start, 40-60 ms on the way to a backup's first request (20-35 of them
    building the S3 client). Does nothing where the collector is on (a command run
    in-process, as tests do)."""
    import gc

    if not gc.isenabled():
        gc.freeze()
        gc.enable()


def exempt_from_collection() -> None:
    """Called as the command returns: every object then alive is left out of the garbage
    collector's passes (``gc.freeze``), so Python's finalization does not walk the CLI's,
    psycopg's and boto3's object graphs several times over (35-45 ms of CPU per command,
    in series after the command's work). Their memory goes back with the process; thread
    joins, ``atexit`` handlers and output flushing are unchanged."""
    import gc

    gc.freeze()


def fixed_mmap_threshold() -> bool:
    """Have glibc map every allocation of :data:`MMAP_THRESHOLD` or more on its own, and give
    it back on free. Left alone, glibc raises the threshold to the size of each large block
    freed (up to 32 MiB), after which the 4-8 MiB buffers of this program (zstd frames, S3
    parts, read pieces, made on one thread and freed on another) come from per-thread heaps
    that keep their pages: a backup full of a 3 GB table peaked at 183-211 MB of RSS, with the
    threshold fixed at 125 MB, in the same time. Setting it also turns glibc's adjustment off.
    True when set; False off glibc or when the user set ``MALLOC_MMAP_THRESHOLD_``."""
    return _mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD, "MALLOC_MMAP_THRESHOLD_")


def padded_heap_top() -> bool:
    """Have glibc grow a heap by :data:`HEAP_TOP_PAD` more than it needs and keep that much
    free at its top instead of giving it back. Left at its 128 KiB, the buffers under the
    mmap threshold that a table PITR makes and frees by the thousand (ranged reads of the
    base backup, zstd output, WAL pieces, COPY data) are freed at a heap's top, handed back to
    the kernel, and faulted in page by page when the next one is made: 340-380 thousand page
    faults per table PITR of the benchmark's shape, 115-125 thousand with the pad, and 0.6
    CPU-seconds less of its 3.7 (medians of 6 interleaved runs, ``perf stat``), for 10-27 MB
    more peak RSS. True when set; False off glibc or when the user set ``MALLOC_TOP_PAD_``."""
    return _mallopt(M_TOP_PAD, HEAP_TOP_PAD, "MALLOC_TOP_PAD_")


def _mallopt(param: int, value: int, user_variable: str) -> bool:
    """glibc's ``mallopt(param, value)``, unless the user set that tunable through
    ``user_variable``; False off glibc or when refused."""
    import os

    if user_variable in os.environ:
        return False
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return False
    except (ValueError, OSError, AttributeError):
        return False
    import ctypes

    try:
        return bool(ctypes.CDLL(None).mallopt(param, value))
    except (OSError, AttributeError):
        return False


def _quick_push() -> None:
    """``archive_command`` without the command line framework: exit 0 once a marker proves
    the file durable. When the push-ahead cannot make it so, the full command pushes it
    itself (``--batch 1``: synchronously) and reports any failure as usual."""
    from backup_tool.physical import walack

    parsed = walack.parse_push(sys.argv[1:])
    if parsed is None:
        return
    path, repo, batch = parsed

    def push_ahead() -> None:
        from pathlib import Path

        from backup_tool.physical import walprepare

        pg_wal = Path(path).absolute().parent
        early = walprepare.EarlyStart(pg_wal, PREPARED_EARLY)  # compressing while the rest loads

        from backup_tool.config.settings import resolve_settings
        from backup_tool.physical import walpush

        walpush.run_pusher(pg_wal, lambda: walpush.open_push_target(resolve_settings(repo, None, None)), batch,
                           early=early)

    if walack.acknowledge_or_push_ahead(path, repo, batch, push_ahead):
        sys.exit(0)
    sys.argv += ["--batch", "1"]


def _quick_fetch(fetch: FetchArgs, never: bool) -> None:
    """``restore_command`` without the command line framework: exit 0 once the file is in
    place, 1 when it is not archived. Any other outcome returns, and the full command runs
    again to report it exactly as usual (the destination is only ever renamed into place)."""
    if not never:
        from backup_tool.physical import wal

        try:
            wal.quick_fetch(fetch.name, fetch.dest, fetch.repo, fetch.prefetch)
            sys.exit(0)
        except wal.WalMissingError:
            pass
        except Exception:  # noqa: BLE001 - the full command reports it
            return
    print(f"backup-tool: {fetch.name} is not in the archive (end of archive)", file=sys.stderr)
    sys.exit(1)
