"""Which command modules a command line loads: a group's command (``restore tables``) loads
only the modules registering commands on that group, and those are all of them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support.paths import REPO_ROOT


def test_each_group_loads_exactly_the_modules_that_register_on_it() -> None:
    from backup_tool.cli import program
    from backup_tool.cli.program import app

    registered: dict[str, set[str]] = {}
    for group in app.registered_groups:
        assert group.name is not None and group.typer_instance is not None
        registered[group.name] = {c.callback.__module__ for c in group.typer_instance.registered_commands
                                  if c.callback is not None}
    assert registered == {name: {f"backup_tool.cli.{m}" for m in modules}
                          for name, modules in program.GROUP_MODULES.items()}


_LOADED = """
import json, runpy, sys
sys.argv = ["backup-tool", *sys.argv[1:]]
try:
    runpy.run_module("backup_tool", run_name="__main__")
except SystemExit:
    pass
print(json.dumps(sorted(sys.modules)), file=sys.stderr)
"""


def test_table_restore_help_loads_neither_other_groups_nor_the_s3_driver() -> None:
    done = subprocess.run([sys.executable, "-c", _LOADED, "restore", "tables", "--help"], cwd=REPO_ROOT,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert "--into-schema" in done.stdout, done.stderr[-2000:]
    loaded = set(json.loads(done.stderr.splitlines()[-1]))
    assert {"backup_tool.cli.restore", "backup_tool.cli.pitr"} <= loaded
    assert not loaded & {"backup_tool.cli.wal", "backup_tool.cli.backup", "backup_tool.cli.catalog",
                         "backup_tool.cli.schedule", "boto3", "botocore", "psycopg"}


def test_wal_commands_load_no_database_driver(tmp_path: Path) -> None:
    """``wal fetch`` runs once per segment during recovery and ``wal status`` talks only to the
    repository: neither imports psycopg (the archive's checks are built without the
    validation layer)."""
    repo = str(tmp_path / "repo")
    for argv in (["wal", "fetch", "000000010000000000000001", str(tmp_path / "x"), "--repo", repo],
                 ["wal", "status", "--repo", repo]):
        done = subprocess.run([sys.executable, "-c", _LOADED, *argv], cwd=REPO_ROOT, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
        loaded = set(json.loads(done.stderr.splitlines()[-1]))
        assert "backup_tool.physical.wal" in loaded, done.stderr[-2000:]
        assert not {m for m in loaded if m.split(".")[0] == "psycopg"}, argv


def test_version_is_answered_without_the_command_line_framework(capsys: pytest.CaptureFixture[str]) -> None:
    from backup_tool.cli.program import app

    app(["version"], prog_name="backup-tool", standalone_mode=False)
    through_typer = capsys.readouterr().out
    for argv in (["--version"], ["version"]):
        done = subprocess.run([sys.executable, "-c", _LOADED, *argv], cwd=REPO_ROOT, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
        assert done.stdout == through_typer, done.stderr[-2000:]
        loaded = set(json.loads(done.stderr.splitlines()[-1]))
        assert not {m for m in loaded if m.split(".")[0] in ("typer", "pydantic", "psycopg", "botocore")}, argv


def test_a_table_restore_command_line_is_parsed_without_pydantic() -> None:
    """Typer coerces every value of a ``restore tables`` command line (strings, an in-range
    number) without importing Pydantic; the command then runs as usual (here: refuses)."""
    done = subprocess.run([sys.executable, "-c", _LOADED, "restore", "tables", "--repo", "/nonexistent",
                           "--tables", 'public.a,"x,y".b', "--target-dsn", "dbname=nowhere", "--jobs", "3",
                           "--into-schema", "copy", "--replace"],
                          cwd=REPO_ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    lines = done.stderr.splitlines()
    assert lines[0] == "backup-tool: error: --into-schema and --replace exclude each other — choose one", done.stderr
    loaded = set(json.loads(lines[-1]))
    assert "typer" in loaded and not {m for m in loaded if m.split(".")[0] == "pydantic"}


@pytest.mark.parametrize(("value", "annotation", "low", "high", "expected"), [
    ("a,b", str, None, None, "a,b"),
    ("", str, None, None, ""),
    ("7", int, 1, 64, 7),
    ("007", int, None, None, 7),
    (0.0, float, 0, None, 0.0),
    (5, int, 1, 64, 5),
    ("0", int, 1, 64, NotImplemented),
    ("65", int, 1, 64, NotImplemented),
    ("-1", int, None, None, NotImplemented),
    ("1.5", int, None, None, NotImplemented),
    ("٣", int, None, None, NotImplemented),
    ("2.5", float, None, None, NotImplemented),
    (-1.0, float, 0, None, NotImplemented),
    (True, int, None, None, NotImplemented),
    (b"x", str, None, None, NotImplemented),
    ("yes", bool, None, None, NotImplemented),
])
def test_plain_values_are_coerced_as_typer_would(value: object, annotation: type, low: object, high: object,
                                                 expected: object) -> None:
    from backup_tool.cli.program import _plain_value

    got = _plain_value(value, annotation, low, high)
    assert got is NotImplemented if expected is NotImplemented else (got == expected and type(got) is annotation)


@pytest.mark.parametrize("argv", [["--jobs", "many"], ["--jobs", "0"], ["--jobs", "65"], ["--wait", "-1"]])
def test_values_only_typer_can_judge_keep_its_messages(argv: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "backup_tool", "restore", "tables", "--repo", "/nonexistent",
                           "--tables", "a.b", "--target-dsn", "dbname=nowhere", "--target-time", "2020-01-01", *argv],
                          cwd=REPO_ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"backup-tool: error: Invalid value for '{argv[0]}'"), done.stderr
    assert "Input should be" in done.stderr
