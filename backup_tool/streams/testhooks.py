"""Test-only pause points, so the crash and signal tests can stop a command at a named
moment and then kill it (``kill -9``), signal it, or let it go on.

Never set in production. With ``BACKUP_TOOL_TEST_PAUSE_AT`` unset (the normal case)
:func:`pause_point` returns at once and :func:`paused_stream` returns its input unchanged.

With ``BACKUP_TOOL_TEST_PAUSE_AT=<point>`` and ``BACKUP_TOOL_TEST_PAUSE_FILE=<path>``, the
first time the command reaches ``<point>`` it creates ``<path>`` (holding its pid) and waits
while that file exists, at most ``MAX_PAUSE`` seconds; deleting the file resumes it. The
wait honours cancellation (Ctrl-C / SIGTERM unwind as usual). Stream points pause once the
stream has carried ``BACKUP_TOOL_TEST_PAUSE_AFTER_BYTES`` bytes (default 1: the first chunk).

Points: ``backup:upload`` (inside a table's object stream), ``backup:between-objects``
(after the first table object is stored), ``backup:before-manifest``; ``base:upload``,
``base:before-manifest``, ``base:direct-copy`` (a direct base backup in backup mode, its files
listed, none read yet); ``wal:upload`` (inside a segment's stream), ``wal:before-ack``
(segment durable, command not yet successful); ``restore:loading`` (after the first table
is loaded); ``restore:loaded`` (a table's rows committed, its checksum and indexes not yet taken);
``tables:loaded`` (``restore tables``: one of the tables loaded by sessions of their own committed);
``ahead:planned`` (in ``restore tables``' forked reading process: the backup resolved, its
objects named, none fetched yet; the pid in the file is that process's).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Iterable, Iterator

from backup_tool.streams import pipeline

PAUSE_AT = "BACKUP_TOOL_TEST_PAUSE_AT"
PAUSE_FILE = "BACKUP_TOOL_TEST_PAUSE_FILE"
PAUSE_AFTER_BYTES = "BACKUP_TOOL_TEST_PAUSE_AFTER_BYTES"
MAX_PAUSE = 300.0

_done: set[str] = set()
_lock = threading.Lock()


def _armed(point: str) -> bool:
    if os.environ.get(PAUSE_AT) != point:
        return False
    with _lock:
        if point in _done:
            return False
        _done.add(point)
        return True


def _wait() -> None:
    flag = Path(os.environ.get(PAUSE_FILE) or f"/tmp/backup-tool-pause-{os.getpid()}")
    flag.write_text(str(os.getpid()))
    deadline = time.monotonic() + MAX_PAUSE
    while flag.exists() and time.monotonic() < deadline:
        pipeline.check_cancelled()
        time.sleep(0.05)
    pipeline.check_cancelled()


def pause_point(point: str) -> None:
    """Wait here if the tests asked to (see the module docstring)."""
    if os.environ.get(PAUSE_AT) and _armed(point):
        _wait()


def paused_stream(point: str, chunks: Iterable[bytes]) -> Iterable[bytes]:
    """``chunks`` unchanged, pausing once inside it if the tests asked to."""
    if os.environ.get(PAUSE_AT) != point:
        return chunks
    return _paused(point, chunks, int(os.environ.get(PAUSE_AFTER_BYTES) or 1))


def _paused(point: str, chunks: Iterable[bytes], after: int) -> Iterator[bytes]:
    seen = 0
    for chunk in chunks:
        yield chunk
        seen += len(chunk)
        if seen >= after and point not in _done:
            pause_point(point)
