"""The Typer program: every command module of :mod:`backup_tool.cli` registered on the
shared apps of :mod:`.common`, and :func:`main`, which runs it.

Imported only once a command line has to be parsed (``backup_tool.cli`` resolves ``app`` and
``main`` from here on first use), so that the process entry point (:mod:`.entry`) stays free
of Typer for the calls it answers itself.
"""


from __future__ import annotations

import importlib
import pkgutil
import sys

import backup_tool.cli as _PACKAGE
from backup_tool.cli.common import app, report_error

_NOT_COMMANDS = frozenset({"common", "entry", "program"})

GROUP_MODULES: dict[str, tuple[str, ...]] = {
    "backup": ("backup", "pitr"),
    "restore": ("restore", "pitr"),
    "wal": ("wal",),
    "retention": ("retention",),
    "schema": ("schema",),
}
"""The command modules that register commands on each group: a command line naming a group
loads only those (tests/cli/test_program.py checks this against what every module registers)."""


def _command_modules(argv: list[str]) -> list[str]:
    """The command modules ``argv`` can reach: a group's own (``restore tables`` needs neither
    ``backup`` nor ``wal``; PostgreSQL starts ``wal push``/``wal fetch`` once per segment), or
    every module for a top-level command or ``--help``."""
    if len(argv) > 1 and argv[1] in GROUP_MODULES:
        return sorted(GROUP_MODULES[argv[1]])
    return sorted(m.name for m in pkgutil.iter_modules(_PACKAGE.__path__) if m.name not in _NOT_COMMANDS)


for _module in _command_modules(sys.argv):
    importlib.import_module(f"{_PACKAGE.__name__}.{_module}")


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
