"""How operations tell the outside world what they are doing, without printing.

The library calls a :class:`Reporter`; the CLI chooses the implementation (progress bars on
a terminal, JSON log lines under cron). Reporters must be thread-safe: parallel workers
advance tasks concurrently.

A task is one phase of an operation, measured in one :class:`Unit`. Its ``total`` is what the
phase will have done when it ends (an estimate only where the library cannot know it, and
then advances never pass it); ``finish()`` says the phase ended, so a reporter may show it
complete. A phase that failed is never finished.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, Protocol

LOG_ENV = "BACKUP_TOOL_LOG"
"""``json``: stderr is a log of JSON lines (milestones, warnings, the error), e.g. for a cron log file."""


class Unit(str, Enum):
    """What a task's amounts count."""

    BYTES = "bytes"
    ROWS = "rows"
    ITEMS = "items"


class Task(Protocol):
    def advance(self, amount: int) -> None: ...

    def finish(self) -> None: ...


class Reporter(Protocol):
    def event(self, message: str, **fields: Any) -> None:
        """A milestone worth a log line (backup started, table restored...)."""

    def warning(self, message: str, **fields: Any) -> None:
        """Something the operator should know that did not stop the operation."""

    def task(self, description: str, total: int | None = None, unit: Unit = Unit.BYTES) -> Task:
        """A phase of work with measurable progress, counted in ``unit``."""


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

    def task(self, description: str, total: int | None = None, unit: Unit = Unit.BYTES) -> Task:
        return _NullTask()
