"""Checks on what a command printed, shared by the test modules, and a bulk table that
takes more than one S3 multipart part."""

from __future__ import annotations

import subprocess
from typing import Any


def one_line(out: str | subprocess.CompletedProcess[str]) -> str:
    """The single non-JSON line on stderr (of a finished command, or its stderr text);
    fails if there are more, none, or a traceback."""
    text = out if isinstance(out, str) else out.stderr
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("{")]
    assert "Traceback" not in text, text
    assert len(lines) == 1, f"expected one line on stderr, got:\n{text}"
    return lines[0]


def only_line(out: str | subprocess.CompletedProcess[str]) -> str:
    """stderr is exactly one line (log lines included): a failing command run without a
    terminal and without BACKUP_TOOL_LOG prints its error and nothing before it."""
    text = out if isinstance(out, str) else out.stderr
    lines = text.splitlines()
    assert "Traceback" not in text, text
    assert len(lines) == 1 and lines[0].startswith("backup-tool: error: "), f"expected one error line:\n{text}"
    return lines[0]


def add_bulk(db: Any, rows: int = 22000) -> None:
    """~22 MiB of hex text that compresses to ~11 MiB: two S3 multipart parts."""
    db.execute("CREATE TABLE public.bulk (id int PRIMARY KEY, payload text NOT NULL)")
    db.execute("INSERT INTO public.bulk SELECT g, (SELECT string_agg(md5(random()::text || g || i), '') "
               f"FROM generate_series(1, 32) i) FROM generate_series(1, {rows}) g")
