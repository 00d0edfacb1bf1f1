"""Which ``restore tables`` and ``backup full|incremental`` command lines get their repository
reads made ahead (cli/ahead.py): exactly the ones its parsers fully understand; everything else
runs as before."""

from __future__ import annotations

import pytest

from backup_tool.cli.ahead import AheadRequest, BackupAhead, parse_backup, parse_request


@pytest.mark.parametrize("argv, expected", [
    (["restore", "tables", "--repo", "s3://b/p", "--tables", "public.t", "--target-dsn", "dbname=x"],
     AheadRequest(tables="public.t", repo="s3://b/p")),
    (["restore", "tables", "--tables=a.b,c.d", "--jobs=3", "--backup", "latest", "--database", "shop",
      "--dsn", "dbname=shop", "--policy", "nightly", "--with-roles", "--json", "--debug", "--replace",
      "--target-dsn=host=h password=secret"],
     AheadRequest(tables="a.b,c.d", backup="latest", database="shop", dsn="dbname=shop", jobs=3,
                  with_roles=True)),
    (["restore", "tables", "--tables", "t", "-j4", "--into-schema", "inspect"], AheadRequest(tables="t", jobs=4)),
    (["restore", "tables", "--tables", "t", "-j", "64"], AheadRequest(tables="t", jobs=64)),
    (["restore", "tables", "--tables", "old", "--repo", "s3://a/x", "--tables", "new", "--repo", "s3://b/y"],
     AheadRequest(tables="new", repo="s3://b/y")),
])
def test_a_plain_restore_tables_line_is_read_ahead(argv: list[str], expected: AheadRequest) -> None:
    assert parse_request(argv) == expected


@pytest.mark.parametrize("argv", [
    ["restore", "full", "--tables", "t"],
    ["restore", "tables", "--tables", "t", "--help"],
    ["restore", "tables", "--tables", "t", "-h"],
    ["restore", "tables", "--tables", "t", "--target-time", "2026-01-01"],
    ["restore", "tables", "--tables", "t", "--full-layout"],
    ["restore", "tables", "--tables", "t", "--unknown"],
    ["restore", "tables", "--tables", "t", "positional"],
    ["restore", "tables", "--tables", "t", "--repo"],
    ["restore", "tables", "--tables", ""],
    ["restore", "tables", "--repo", "s3://b/p"],
    ["restore", "tables", "--tables", "t", "--jobs", "0"],
    ["restore", "tables", "--tables", "t", "--jobs", "65"],
    ["restore", "tables", "--tables", "t", "-j", "two"],
    ["restore", "tables", "--tables", "t", "--replace=yes"],
])
def test_anything_unusual_runs_without_read_ahead(argv: list[str]) -> None:
    assert parse_request(argv) is None


@pytest.mark.parametrize("argv, expected", [
    (["backup", "incremental", "--repo", "s3://b/p", "--dsn", "dbname=x"], BackupAhead(True, "s3://b/p")),
    (["backup", "full", "--repo=s3://b/p", "-j2", "--lock-timeout", "30", "--policy", "nightly", "--json",
      "--debug", "--pg-bin", "/usr/lib/postgresql/15/bin"], BackupAhead(False, "s3://b/p")),
    (["backup", "incremental", "--jobs=4", "--repo", "s3://a/x", "--repo", "s3://b/y"], BackupAhead(True, "s3://b/y")),
    (["backup", "incremental"], BackupAhead(True, None)),
])
def test_a_plain_backup_line_is_read_ahead(argv: list[str], expected: BackupAhead) -> None:
    assert parse_backup(argv) == expected


@pytest.mark.parametrize("argv", [
    ["backup", "base", "--repo", "s3://b/p"],
    ["restore", "tables", "--tables", "t"],
    ["backup", "incremental", "--help"],
    ["backup", "full", "-h"],
    ["backup", "full", "--unknown"],
    ["backup", "full", "positional"],
    ["backup", "incremental", "--repo"],
    ["backup", "incremental", "--json=yes"],
    ["backup", "full", "--jobs", "0"],
    ["backup", "incremental", "-j65"],
])
def test_any_other_backup_line_runs_without_read_ahead(argv: list[str]) -> None:
    assert parse_backup(argv) is None
