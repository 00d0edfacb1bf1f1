"""Run a command on a pseudo-terminal and read back what its screen shows at the end.

`run_on_terminal` gives the command a real terminal (python's `pty`) of a fixed size, so
rich draws its live progress display exactly as for an operator; `Screen` replays the bytes
the command wrote (text, carriage returns, cursor moves and erasures: what rich's live
display uses) into the lines a terminal would be left showing. Colours are ignored.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import termios
import time
from dataclasses import dataclass, field
from typing import Mapping, Sequence

CSI = re.compile(r"\x1b\[([?0-9;]*)([A-Za-z])|\x1b\][^\x07]*\x07|\x1b[()][A-Z0-9]|\x1b[=>]")


@dataclass
class Screen:
    """A terminal of ``columns`` columns and unlimited height (scrollback included)."""

    columns: int = 100
    lines: list[list[str]] = field(default_factory=lambda: [[]])
    row: int = 0
    col: int = 0

    def _line(self) -> list[str]:
        while len(self.lines) <= self.row:
            self.lines.append([])
        return self.lines[self.row]

    def _put(self, ch: str) -> None:
        if self.col >= self.columns:
            self.row, self.col = self.row + 1, 0
        line = self._line()
        line.extend(" " * (self.col - len(line) + 1) if len(line) <= self.col else "")
        line[self.col] = ch
        self.col += 1

    def feed(self, text: str) -> None:
        pos = 0
        for m in CSI.finditer(text):
            self._plain(text[pos:m.start()])
            pos = m.end()
            if m.group(2):
                self._control(m.group(1), m.group(2))
        self._plain(text[pos:])

    def _plain(self, text: str) -> None:
        for ch in text:
            if ch == "\r":
                self.col = 0
            elif ch == "\n":
                self.row += 1
                self._line()
            elif ch == "\b":
                self.col = max(0, self.col - 1)
            elif ch >= " ":
                self._put(ch)

    def _control(self, params: str, final: str) -> None:
        if params.startswith("?"):
            return
        n = int(params.split(";")[0] or 0)
        line = self._line()
        if final == "A":
            self.row = max(0, self.row - max(n, 1))
        elif final == "B":
            self.row += max(n, 1)
        elif final == "C":
            self.col += max(n, 1)
        elif final == "D":
            self.col = max(0, self.col - max(n, 1))
        elif final == "G":
            self.col = max(n, 1) - 1
        elif final == "K":
            if n == 0:
                del line[self.col:]
            elif n == 1:
                line[:self.col] = [" "] * min(self.col, len(line))
            else:
                line.clear()
        elif final == "J" and n == 0:
            del line[self.col:]
            del self.lines[self.row + 1:]

    def text(self) -> list[str]:
        """The lines shown, trailing blanks removed."""
        shown = ["".join(line).rstrip() for line in self.lines]
        while shown and not shown[-1]:
            shown.pop()
        return shown


@dataclass(frozen=True)
class TerminalRun:
    returncode: int
    raw: str
    screen: list[str]


def run_on_terminal(argv: Sequence[str], env: Mapping[str, str], cwd: str | os.PathLike[str],
                    columns: int = 110, rows: int = 40, timeout: float = 300) -> TerminalRun:
    """Run ``argv`` with stdin, stdout and stderr on one new pseudo-terminal."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    full_env = {**env, "TERM": "xterm-256color", "COLUMNS": str(columns), "LINES": str(rows)}
    full_env.pop("NO_COLOR", None)
    proc = subprocess.Popen(list(argv), stdin=slave, stdout=slave, stderr=slave, env=full_env, cwd=cwd,
                            start_new_session=True)
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
            if time.monotonic() > deadline:
                proc.kill()
                raise TimeoutError(f"{argv!r} did not finish in {timeout}s")
    finally:
        os.close(master)
    code = proc.wait(timeout=30)
    raw = b"".join(chunks).decode("utf-8", "replace")
    screen = Screen(columns)
    screen.feed(raw)
    return TerminalRun(code, raw, screen.text())
