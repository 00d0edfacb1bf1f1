"""The CLI's reporters: progress bars on a terminal, JSON log lines otherwise.

On a terminal (and without ``--json``), rich progress bars show each phase's progress in its
own unit (bytes in KiB/MiB/GiB, as the summaries print them, or counts) and milestones print
as short lines; a phase that ends leaves one line saying how far it got (100 % when the
library's accounting is right). Otherwise (cron, pipes, ``--json``) stderr stays quiet and
machine-readable: one JSON object per line for each warning, and for each milestone only
when ``BACKUP_TOOL_LOG=json`` asks stderr to carry logs. So a failing command's stderr is
exactly its one error line unless logs were asked for, and a successful one prints nothing
there but warnings. Both write to stderr, so stdout stays clean for ``--json`` documents.

The JSON-lines reporter lives in :mod:`backup_tool.render.log`, which does not load rich: a
command run by cron or a script (no terminal) does not pay for importing it.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.progress import Task as ProgressTask
from rich.text import Text

from backup_tool.core.report import Reporter, Task, Unit
from backup_tool.core.units import human_size
from backup_tool.render.log import LogReporter, log_reporter, progress_wanted


def _amounts(done: float, total: float | None, unit: Unit) -> str:
    """``1.2 MiB / 3.4 MiB`` (the summaries' size formatter), ``120/4000 rows``, or the amount
    alone without a total."""
    if unit == Unit.BYTES:
        return human_size(done) if total is None else f"{human_size(done)} / {human_size(total)}"
    return f"{int(done)}{'' if total is None else f'/{int(total)}'} {unit.value}"


class _AmountColumn(ProgressColumn):
    """``1.2 MiB / 3.4 MiB`` or ``120/4000 rows``: the task's own unit, one size formatter."""

    def render(self, task: ProgressTask) -> Text:
        return Text(_amounts(task.completed, task.total, task.fields.get("unit", Unit.BYTES)), style="green")


class _RichTask:
    """A phase on the live display; advances never pass its total. ``finish`` replaces its bar
    with a permanent line (percent and amount reached, time taken) above the bars still running."""

    def __init__(self, owner: RichReporter, task_id: TaskID, description: str, total: int | None,
                 unit: Unit) -> None:
        self.owner = owner
        self.task_id = task_id
        self.description = description
        self.total = total
        self.unit = unit
        self.done = 0
        self.started = time.monotonic()
        self.lock = threading.Lock()
        self.finished = False

    def advance(self, amount: int) -> None:
        with self.lock:
            if self.finished:
                return
            step = amount if self.total is None else max(0, min(amount, self.total - self.done))
            self.done += step
        if step:
            self.owner.progress.advance(self.task_id, step)

    def finish(self) -> None:
        with self.lock:
            if self.finished:
                return
            self.finished = True
            done = self.done
        self.owner.complete(self, done)


class RichReporter:
    """Progress bars and short status lines on a terminal (stderr).

    Bars are transient: a phase that ends leaves one line saying it is complete; whatever
    is still drawn disappears when the display stops (:meth:`close`), which the CLI does
    before it prints the result, so nothing is redrawn below it.
    """

    def __init__(self, redact: Callable[[str], str]) -> None:
        self.redact = redact
        self.console = Console(stderr=True)
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                                 _AmountColumn(), TimeRemainingColumn(),
                                 console=self.console, transient=True)
        self.progress.start()
        self.closed = False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.progress.stop()

    def event(self, message: str, **fields: Any) -> None:
        extra = " ".join(f"{k}={v}" for k, v in fields.items())
        self.console.print(f"[dim]·[/dim] {escape(self.redact(message))} [dim]{escape(self.redact(extra))}[/dim]",
                           highlight=False)

    def warning(self, message: str, **fields: Any) -> None:
        extra = " ".join(f"{k}={v}" for k, v in fields.items())
        self.console.print(f"[yellow]warning:[/yellow] {escape(self.redact(message + ' ' + extra))}",
                           highlight=False)

    def task(self, description: str, total: int | None = None, unit: Unit = Unit.BYTES) -> Task:
        text = escape(self.redact(description))
        return _RichTask(self, self.progress.add_task(text, total=total, unit=unit), text, total, unit)

    def complete(self, task: _RichTask, done: int) -> None:
        """Replace ``task``'s bar with its completion line: what was done of the total, as
        reported (a phase whose advances fell short shows less than 100 %)."""
        self.progress.remove_task(task.task_id)
        self.progress.refresh()
        percent = f"{100 * done // task.total} %  " if task.total else ""
        shown = percent + _amounts(done, task.total if task.total else None, task.unit)
        self.console.print(f"[green]✓[/green] {task.description}  {shown}  "
                           f"[dim]{time.monotonic() - task.started:.1f}s[/dim]", highlight=False)


def make_reporter(redact: Callable[[str], str], json_output: bool = False) -> Reporter:
    """Progress on a terminal; otherwise warnings only, plus milestones with ``BACKUP_TOOL_LOG=json``."""
    if progress_wanted(json_output):
        return RichReporter(redact)
    return log_reporter(redact)


__all__ = ["LogReporter", "RichReporter", "make_reporter"]
