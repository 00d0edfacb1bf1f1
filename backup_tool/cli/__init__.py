"""The ``backup-tool`` command line: each command parses options, calls one library
function and renders the result as text or JSON.

Commands live in one module per group (``backup``, ``restore``, ``catalog``...), each
registering itself on the shared Typer apps of :mod:`.common`; every module in this package
is imported here, so adding a command group means adding a module.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

from backup_tool.cli.common import app, report_error


def _command_modules(argv: list[str]) -> list[str]:
    """Every command module, except for ``wal push``/``wal fetch``: PostgreSQL starts the
    tool once per WAL segment, so those load only the ``wal`` group (help lists them all)."""
    names = sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name != "common")
    if argv[1:3] in (["wal", "push"], ["wal", "fetch"]) and not {"--help", "-h"} & set(argv):
        return ["wal"]
    return names


for _module in _command_modules(sys.argv):
    importlib.import_module(f"{__name__}.{_module}")


def main() -> None:
    """Run the CLI. Usage errors (unknown, missing or malformed options) are one line on
    stderr with exit 2, like every other error (and, with ``--json``, the error document on
    stdout); help still goes to stdout."""
    from typer.exceptions import TyperException

    try:
        code = app(prog_name="backup-tool", standalone_mode=False)
    except TyperException as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":
            print(exc.format_message())
        else:
            ctx = getattr(exc, "ctx", None)
            hint = f"see '{ctx.command_path} --help'" if ctx is not None else None
            message = " ".join(exc.format_message().split())
            report_error("--json" in sys.argv[1:], exc.exit_code, message, hint, str)
        code = exc.exit_code
    sys.exit(code if isinstance(code, int) else 0)


__all__ = ["app", "main"]
