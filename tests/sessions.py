"""Another session of the database under test, doing what applications do while the tool runs."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Iterator

import psycopg

BLOCK_PATIENCE = 60.0
"""How long the other session waits for some session to block on it before committing anyway."""


@contextmanager
def holding(dsn: str, statement: str, application: str, seconds: float) -> Iterator[None]:
    """Inside the block, another session (named ``application``) has run ``statement`` in an
    open transaction (a lock it takes stays held); it commits ``seconds`` after it sees a
    session blocked by it, however long the tool took to get there on a loaded machine (or
    after :data:`BLOCK_PATIENCE` when none ever blocks). The block's end waits for that
    commit."""
    held = threading.Event()

    def session() -> None:
        with psycopg.connect(dsn, autocommit=False, application_name=application) as conn, \
                psycopg.connect(dsn, autocommit=True) as watcher:
            conn.execute(statement)
            pid = conn.info.backend_pid
            held.set()
            deadline = time.monotonic() + BLOCK_PATIENCE
            while time.monotonic() < deadline:
                row = watcher.execute("SELECT count(*) FROM pg_stat_activity WHERE %s = ANY (pg_blocking_pids(pid))",
                                      (pid,)).fetchone()
                if row and row[0]:
                    break
                time.sleep(0.05)
            time.sleep(seconds)
            conn.commit()

    thread = threading.Thread(target=session)
    thread.start()
    try:
        if not held.wait(10):
            raise TimeoutError(f"the other session did not run {statement!r}")
        yield
    finally:
        thread.join()
