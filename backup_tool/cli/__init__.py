"""The ``backup-tool`` command line: each command parses options, calls one library
function and renders the result as text or JSON.

Commands live in one module per group (``backup``, ``restore``, ``catalog``...), each
registering itself on the shared Typer apps of :mod:`.common`; every module in this package
is imported by :mod:`.program`, so adding a command group means adding a module.
"""

from __future__ import annotations

import importlib

TYPE_CHECKING = False  # not typing's: importing typing costs every archive_command call
if TYPE_CHECKING:
    from typing import Any


def __getattr__(name: str) -> Any:
    """``app`` and ``main`` (see :mod:`.program`), loaded on first use: importing this package
    must not load Typer and every command, because :mod:`.entry` lives in it and answers
    PostgreSQL's per-segment ``wal push``/``wal fetch`` calls without them."""
    if name in ("app", "main"):
        return getattr(importlib.import_module("backup_tool.cli.program"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["app", "main"]
