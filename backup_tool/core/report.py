"""How operations tell the outside world what they are doing, without printing.

The library calls a :class:`Reporter`; the CLI chooses the implementation (progress bars on
a terminal, JSON log lines under cron). Reporters must be thread-safe: parallel workers
advance tasks concurrently.
"""

from __future__ import annotations

from typing import Any, Protocol

LOG_ENV = "BACKUP_TOOL_LOG"
"""``json``: stderr is a log of JSON lines (milestones, warnings, the error), e.g. for a cron log file."""


class Task(Protocol):
    def advance(self, amount: int) -> None: ...

    def finish(self) -> None: ...


class Reporter(Protocol):
    def event(self, message: str, **fields: Any) -> None:
        """A milestone worth a log line (backup started, table restored...)."""

    def warning(self, message: str, **fields: Any) -> None:
        """Something the operator should know that did not stop the operation."""

    def task(self, description: str, total: int | None = None) -> Task:
        """A unit of work with measurable progress (bytes or items)."""


class _NullTask:
    def advance(self, amount: int) -> None:
        pass

    def finish(self) -> None:
        pass


class NullReporter:
    """Reports nothing; the default for library callers that do not care."""

    def event(self, message: str, **fields: Any) -> None:
        pass

    def warning(self, message: str, **fields: Any) -> None:
        pass

    def task(self, description: str, total: int | None = None) -> Task:
        return _NullTask()
