"""Another session of the database under test, doing what applications do while the tool runs."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Iterator

import psycopg


@contextmanager
def holding(dsn: str, statement: str, application: str, seconds: float) -> Iterator[None]:
    """Inside the block, another session (named ``application``) has run ``statement`` in an
    open transaction (a lock it takes stays held) and commits ``seconds`` after; the block's
    end waits for that commit."""
    held = threading.Event()

    def session() -> None:
        with psycopg.connect(dsn, autocommit=False, application_name=application) as conn:
            conn.execute(statement)
            held.set()
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
