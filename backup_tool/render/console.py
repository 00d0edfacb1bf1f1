"""The CLI's reporters: progress bars on a terminal, JSON log lines otherwise.

On a terminal (and without ``--json``), rich progress bars show bytes moved per task and
milestones print as short lines. Otherwise (cron, pipes, ``--json``) stderr stays quiet and
machine-readable: one JSON object per line for each warning, and for each milestone only
when ``BACKUP_TOOL_LOG=json`` asks stderr to carry logs. So a failing command's stderr is
exactly its one error line unless logs were asked for, and a successful one prints nothing
there but warnings. Both write to stderr, so stdout stays clean for ``--json`` documents.
"""

from __future__ import annotations

import json
import os
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

from backup_tool.core.report import LOG_ENV, Reporter, Task



class LogReporter:
    """JSON lines on stderr: {"ts", "level", "event", ...fields}; milestones only if ``info``."""

    def __init__(self, redact: Callable[[str], str], stream: Any = None, info: bool = True) -> None:
        self.redact = redact
        self.stream = stream or sys.stderr
        self.info = info
        self._lock = threading.Lock()

    def _write(self, level: str, message: str, fields: dict[str, Any]) -> None:
        line = json.dumps({"ts": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                           "level": level, "event": message, **fields}, default=str)
        with self._lock:
            print(self.redact(line), file=self.stream, flush=True)

    def event(self, message: str, **fields: Any) -> None:
        if self.info:
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


def make_reporter(redact: Callable[[str], str], json_output: bool = False) -> Reporter:
    """Progress on a terminal; otherwise warnings only, plus milestones with ``BACKUP_TOOL_LOG=json``."""
    if sys.stderr.isatty() and not json_output:
        return RichReporter(redact)
    return LogReporter(redact, info=os.environ.get(LOG_ENV, "").lower() == "json")
