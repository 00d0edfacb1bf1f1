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
from dataclasses import dataclass, field
from typing import Any, Callable

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

_PLAIN = (str, int, float)


def _plain_value(value: Any, annotation: Any, low: Any, high: Any) -> Any:
    """``value`` as Typer's Pydantic coercion would return it, or :data:`NotImplemented` when
    only that coercion can say: a value already of the option's own type (str, int, float;
    never bool) within its bounds, and a string of ASCII digits for an int option, read as
    Pydantic reads it. Pure."""
    if annotation is int and type(value) is str and value.isascii() and value.isdigit():
        value = int(value)
    if type(value) is not annotation or annotation not in _PLAIN:
        return NotImplemented
    if (low is not None and value < low) or (high is not None and value > high):
        return NotImplemented
    return value


def _coerce_without_pydantic() -> None:
    """Let Typer coerce plain option values (strings, in-range numbers: every value of a
    ``restore tables`` command line) without importing Pydantic, which costs more start-up
    time than the rest of the command line machinery. Typer (0.2x) builds a Pydantic
    TypeAdapter for every parameter of the command before it looks at the value; here each
    parameter gets a coercion that answers :func:`_plain_value`'s cases itself and hands any
    other value (a file, an enum, a number out of range, a parser...) to the coercion Typer
    would have built, so results and error messages are Typer's own. A Typer without these
    internals is left as it is."""
    try:
        from typer import core as typer_core
        from typer._coercion import RuntimeParam
    except ImportError:
        return
    found = getattr(typer_core, "build_runtime_param", None)
    if found is None or getattr(found, "plain_values_first", False):
        return
    build: Callable[[Any], Any] = found

    @dataclass(frozen=True)
    class PlainFirst(RuntimeParam):
        descriptor: Any = field(default=None, compare=False, repr=False)
        built: list[Any] = field(default_factory=list, compare=False, repr=False)

        def _coerce_value(self, value: Any, param: Any, ctx: Any) -> Any:
            info = self.parameter_info
            if getattr(info, "parser", None) is None:
                plain = _plain_value(value, self.annotation, getattr(info, "min", None), getattr(info, "max", None))
                if plain is not NotImplemented:
                    return plain
            if not self.built:
                self.built.append(build(self.descriptor))
            return self.built[0]._coerce_value(value, param=param, ctx=ctx)

    def plain_first(descriptor: Any) -> Any:
        if getattr(descriptor, "file_annotation", None) is not None or descriptor.annotation not in _PLAIN + (bool,):
            return build(descriptor)
        return PlainFirst(parameter_info=descriptor.parameter_info, annotation=descriptor.annotation,
                          descriptor=descriptor)

    plain_first.plain_values_first = True  # type: ignore[attr-defined]
    typer_core.build_runtime_param = plain_first


_coerce_without_pydantic()


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
