"""Pipes between the tool and the programs it runs (psql, the reading process)."""

from __future__ import annotations

import fcntl

WIDE_PIPE_BYTES = 1 << 20
"""Capacity asked for a pipe that should not fill (Linux's default is 64 KiB)."""


def widen_pipe(fd: int, size: int = WIDE_PIPE_BYTES) -> None:
    """Ask that the pipe behind ``fd`` hold ``size`` bytes. Best effort: where the system
    refuses, or has no such setting (not Linux), the pipe keeps its capacity."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, size)
    except (OSError, AttributeError):
        pass
