"""The reporter for runs without a terminal (cron, pipes, ``--json``): warnings as JSON lines
on stderr, milestones too when ``BACKUP_TOOL_LOG=json`` asks for logs (see
:mod:`backup_tool.render.console` for the whole contract).

Kept apart from the progress display so that choosing it never imports rich.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from datetime import datetime, timezone
from typing import Any, Callable

from backup_tool.core.report import LOG_ENV, Task, Unit


def progress_wanted(json_output: bool) -> bool:
    """Whether this process shows progress bars: stderr is a terminal and stdout is not a
    ``--json`` document."""
    return sys.stderr.isatty() and not json_output


def log_reporter(redact: Callable[[str], str]) -> LogReporter:
    """Warnings only, plus milestones with ``BACKUP_TOOL_LOG=json``."""
    return LogReporter(redact, info=os.environ.get(LOG_ENV, "").lower() == "json")


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

    def task(self, description: str, total: int | None = None, unit: Unit = Unit.BYTES) -> Task:
        return _QuietTask()


class _QuietTask:
    def advance(self, amount: int) -> None:
        pass

    def finish(self) -> None:
        pass
