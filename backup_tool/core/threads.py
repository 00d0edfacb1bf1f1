"""A call on a thread of its own whose result is waited for like an executor's.

Unlike an executor's worker, the thread is a daemon: a command that stops early (a usage
error, a refusal, a commit that failed at its manifest) exits at once, never waiting for a
call it started (a read made ahead, a listing) to end, through every retry of a store that
does not answer."""

from __future__ import annotations

import concurrent.futures as cf
import threading
from typing import Any, Callable, TypeVar

T = TypeVar("T")


def spawn(fn: Callable[..., T], *args: Any, name: str) -> cf.Future[T]:
    """``fn(*args)`` on a daemon thread named ``name``; its value or error in the future."""
    future: cf.Future[T] = cf.Future()

    def run() -> None:
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            future.set_exception(exc)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future
