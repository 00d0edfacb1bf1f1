"""The data phase of a logical backup on a real server and a real (local) repository: at most
``jobs`` COPY sessions at once, and the next table's COPY runs while the previous object's
upload is still being answered."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import psycopg
import pytest

from backup_tool.config.policy import BackupSettings, Policy
from backup_tool.config.settings import Settings
from backup_tool.logical import backup
from backup_tool.repository.storage.base import PutResult
from backup_tool.repository.storage.local import LocalStorage

pytestmark = pytest.mark.slow

SLOW_ANSWER = 0.3


class SlowlyAnsweringStorage(LocalStorage):
    """A local repository whose every data object's put returns ``SLOW_ANSWER`` seconds after
    its stream ended (as an S3 PUT is answered after its body is sent); records, per data
    object, when its put began (its COPY had started), when its stream ended and when the put
    returned."""

    def __init__(self, root: str | Path, events: list[tuple[str, str]]) -> None:
        super().__init__(root)
        self.events = events
        self._lock = threading.Lock()

    def _note(self, what: str, key: str) -> None:
        with self._lock:
            self.events.append((what, key))

    def put(self, key: str, chunks: Iterable[bytes]) -> PutResult:
        if "/data/" not in key:
            return super().put(key, chunks)
        self._note("put", key)

        def watched() -> Iterator[bytes]:
            yield from chunks
            self._note("end", key)

        result = super().put(key, watched())
        time.sleep(SLOW_ANSWER)
        self._note("stored", key)
        return result


def test_one_session_copies_the_next_table_while_the_last_upload_is_answered(
        fresh_db: Callable[..., Any], local_repo: str, monkeypatch: pytest.MonkeyPatch) -> None:
    db = fresh_db("sessions")
    for n in range(4):
        db.execute(f"CREATE TABLE public.t{n} (id int PRIMARY KEY, v text);"
                   f"INSERT INTO public.t{n} SELECT g, repeat(md5(g::text), {n + 1}) FROM generate_series(1, 3000) g")
    events: list[tuple[str, str]] = []
    monkeypatch.setattr(backup, "open_storage", lambda url: SlowlyAnsweringStorage(url, events))
    busiest: list[int] = []
    done = threading.Event()

    def watch() -> None:
        """How many of the backup's sessions run a COPY or a checksum query, every few ms."""
        with psycopg.connect(db.dsn, autocommit=True) as conn:
            while not done.is_set():
                row = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND state = 'active' AND (query LIKE 'COPY %%' OR query LIKE 'SELECT n, %%')").fetchone()
                assert row is not None
                busiest.append(int(row[0]))
                time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        manifest = backup.backup_full(Settings(local_repo, db.dsn, Policy(backup=BackupSettings(jobs=1))))
    finally:
        done.set()
        watcher.join()

    assert sorted((t.name, t.rows) for t in manifest.tables) == [(f"t{n}", 3000) for n in range(4)]
    assert max(busiest, default=0) <= 1, "with jobs 1 one session works at a time"  # sampling may miss a short COPY
    overlapped = 0
    for i, (what, key) in enumerate(events):
        if what == "end":
            answered = events.index(("stored", key))
            overlapped += any(w == "put" for w, _ in events[i:answered])
    assert overlapped >= 2, f"no COPY began while an upload was answered: {events}"
