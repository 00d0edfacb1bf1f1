"""What a failed client tool's error message keeps."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Iterator

import pytest
import zstandard

from backup_tool.errors import DatabaseError, IntegrityError
from backup_tool.repository.manifest import StoredObject
from backup_tool.repository.storage.local import LocalStorage
from backup_tool.streams.pipeline import READ_AHEAD, EarlyRead, Process, failure_line, read_stored


def test_parallel_pg_restore_names_the_cause_not_the_worker_death() -> None:
    stderr = (b"pg_restore: error: could not execute query: ERROR:  constraint \"fk\" does not exist\n"
              b"Command was: COMMENT ON CONSTRAINT fk ON public.child IS 'x';\n"
              b"pg_restore: error: a worker process died unexpectedly\n")
    assert failure_line(stderr) == ("pg_restore: error: could not execute query: ERROR:  "
                                    "constraint \"fk\" does not exist")


def test_a_lone_consequence_or_plain_output_is_still_reported() -> None:
    assert failure_line(b"pg_restore: error: a worker process died unexpectedly\n") == \
        "pg_restore: error: a worker process died unexpectedly"
    assert failure_line(b"first\nsecond\n") == "second"
    assert failure_line(b"") == "no error output"


def test_a_failing_child_raises_with_its_cause() -> None:
    script = "echo 'tool: error: the real cause' >&2; echo 'tool: error: a worker process died unexpectedly' >&2; exit 1"
    proc = Process(["sh", "-c", script], {}, "the tool")
    with pytest.raises(DatabaseError, match="the tool failed: tool: error: the real cause"):
        for _ in proc.chunks():
            pass
        proc.finish()


class _WatchedStorage(LocalStorage):
    """A real local repository that records when each object's read starts."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.started: dict[str, threading.Event] = {}

    def get_stored(self, key: str) -> Iterator[bytes]:
        self.started.setdefault(key, threading.Event()).set()
        yield from super().get_stored(key)


def _stored(storage: LocalStorage, key: str, raw: bytes) -> StoredObject:
    put = storage.put(key, [zstandard.ZstdCompressor().compress(raw)])
    return StoredObject(key, put.size, put.sha256, len(raw))


def _read_aheads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "read-ahead" and t.is_alive()]


def test_an_early_read_starts_before_it_is_read_and_gives_the_object(tmp_path: Path) -> None:
    storage = _WatchedStorage(tmp_path)
    raw = b"".join(b"%d\tline %d\n" % (i, i * 7) for i in range(300_000))
    obj = _stored(storage, "backups/b/data/1.copy.zst", raw)
    early = EarlyRead(storage, obj)
    assert storage.started.setdefault(obj.key, threading.Event()).wait(5)
    assert b"".join(early.chunks()) == raw == b"".join(read_stored(storage, obj.key, obj.sha256, obj.size))
    assert not _read_aheads()


def test_an_early_read_nobody_takes_stops_on_close(tmp_path: Path) -> None:
    storage = _WatchedStorage(tmp_path)
    obj = _stored(storage, "backups/b/data/2.copy.zst", os.urandom(READ_AHEAD * 3 << 20))
    early = EarlyRead(storage, obj)
    assert storage.started.setdefault(obj.key, threading.Event()).wait(5)
    early.close()
    assert not _read_aheads()


def test_a_damaged_object_read_early_still_fails_its_check(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    obj = _stored(storage, "backups/b/data/3.copy.zst", b"1\ta\n" * 1000)
    damaged = StoredObject(obj.key, obj.size, "0" * 64, obj.raw_size)
    with pytest.raises(IntegrityError, match="is corrupt"):
        b"".join(EarlyRead(storage, damaged).chunks())
