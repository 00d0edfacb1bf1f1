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
