"""One call run on a daemon thread while the caller goes on (a WAL scan beside a dump, a
definitions dump beside a copy).

Guaranteed: :meth:`Background.result` returns the call's value or re-raises its error in the
caller's thread, so an overlapped step fails the command exactly as if it had run inline.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T")


class Background(Generic[T]):
    """``fn(*args)`` running on a daemon thread."""

    def __init__(self, fn: Callable[..., T], *args: Any, name: str | None = None) -> None:
        self._result: T | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn, *args), daemon=True, name=name)
        self._thread.start()

    def _run(self, fn: Callable[..., T], *args: Any) -> None:
        try:
            self._result = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller by result()
            self._error = exc

    def join(self) -> None:
        """Wait for the call to end, whatever its outcome."""
        self._thread.join()

    def result(self) -> T:
        """The call's value, once it has ended; its error, re-raised here."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._result  # type: ignore[return-value]
