"""The ``backup-tool`` command line: each command parses options, calls one library
function and renders the result as text or JSON.

Commands live in one module per group (``backup``, ``restore``, ``catalog``...), each
registering itself on the shared Typer apps of :mod:`.common`; every module in this package
is imported here, so adding a command group means adding a module.
"""

from __future__ import annotations

import importlib
import pkgutil

from backup_tool.cli.common import app

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name != "common"):
    importlib.import_module(f"{__name__}.{_module}")


def main() -> None:
    app(prog_name="backup-tool")


__all__ = ["app", "main"]
