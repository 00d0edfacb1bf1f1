"""The CLI's reporters: progress bars on a terminal, JSON log lines otherwise.

Under cron (stderr not a terminal) output stays quiet and machine-readable: one JSON
object per line for each milestone and warning, no progress chatter. On a terminal, rich
progress bars show bytes moved per task. Both write to stderr, so stdout stays clean for
``--json`` documents.
"""

from __future__ import annotations

import json
import sys
import threading
from datetime import datetime, timezone
from typing import Any, Callable

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from backup_tool.report import Reporter, Task


class LogReporter:
    """JSON lines on stderr: {"ts", "level", "event", ...fields}."""

    def __init__(self, redact: Callable[[str], str], stream: Any = None) -> None:
        self.redact = redact
        self.stream = stream or sys.stderr
        self._lock = threading.Lock()

    def _write(self, level: str, message: str, fields: dict[str, Any]) -> None:
        line = json.dumps({"ts": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                           "level": level, "event": message, **fields}, default=str)
        with self._lock:
            print(self.redact(line), file=self.stream, flush=True)

    def event(self, message: str, **fields: Any) -> None:
        self._write("info", message, fields)

    def warning(self, message: str, **fields: Any) -> None:
        self._write("warning", message, fields)

    def task(self, description: str, total: int | None = None) -> Task:
        return _QuietTask()


class _QuietTask:
    def advance(self, amount: int) -> None:
        pass

    def finish(self) -> None:
        pass


class _RichTask:
    def __init__(self, progress: Progress, task_id: Any) -> None:
        self.progress = progress
        self.task_id = task_id

    def advance(self, amount: int) -> None:
        self.progress.advance(self.task_id, amount)

    def finish(self) -> None:
        self.progress.update(self.task_id, visible=False)


class RichReporter:
    """Progress bars and short status lines on a terminal (stderr)."""

    def __init__(self, redact: Callable[[str], str]) -> None:
        self.redact = redact
        self.console = Console(stderr=True)
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                 TransferSpeedColumn(), TimeRemainingColumn(),
                                 console=self.console, transient=True)
        self.progress.start()

    def close(self) -> None:
        self.progress.stop()

    def event(self, message: str, **fields: Any) -> None:
        extra = " ".join(f"{k}={v}" for k, v in fields.items())
        self.console.print(f"[dim]·[/dim] {escape(self.redact(message))} [dim]{escape(self.redact(extra))}[/dim]",
                           highlight=False)

    def warning(self, message: str, **fields: Any) -> None:
        extra = " ".join(f"{k}={v}" for k, v in fields.items())
        self.console.print(f"[yellow]warning:[/yellow] {escape(self.redact(message + ' ' + extra))}",
                           highlight=False)

    def task(self, description: str, total: int | None = None) -> Task:
        return _RichTask(self.progress, self.progress.add_task(escape(description), total=total))


def make_reporter(redact: Callable[[str], str]) -> Reporter:
    return RichReporter(redact) if sys.stderr.isatty() else LogReporter(redact)
