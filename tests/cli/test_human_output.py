"""Human output reads as prose, not Python: no "None", timestamps to the second with "Z",
``list`` columns under their header, and ``show`` of a base backup describes a cluster
(WAL start/stop LSN, timeline, system identifier, databases)."""

from __future__ import annotations

import re
from typing import Any, Callable

from support.cli import Cli
from support.clusters import DbHandle

from backup_tool.cli.common import render_entries, render_show
from backup_tool.cli.retention import render_retention

MICROSECONDS = re.compile(r"\d{2}:\d{2}:\d{2}\.\d")


def _columns_line_up(text: str) -> None:
    """Every header word starts where its column starts on every row."""
    header, *rows = text.splitlines()
    cell = re.compile(r"\S+(?: \S+)*")  # cells are separated by two spaces or more
    starts = [m.start() for m in cell.finditer(header)]
    for row in rows:
        cells = [m.start() for m in cell.finditer(row)]
        assert len(cells) == len(starts), (header, row)
        for i, (h, c) in enumerate(zip(starts, cells, strict=True)):
            if header.split()[i] == "SIZE":  # right-aligned: the ends line up
                continue
            assert h == c, (header, row)


def test_list_and_show_of_a_logical_backup(cli: Cli, local_repo: str, fresh_db: Callable[[str], DbHandle]) -> None:
    db = fresh_db("orders")
    db.execute("CREATE TABLE public.orders (id int PRIMARY KEY, note text)")
    db.execute("INSERT INTO public.orders SELECT g, 'n' || g FROM generate_series(1, 1234) g")
    db.execute('CREATE TABLE public."Empty Table" (id int)')
    entry = cli.json("backup", "full", "--repo", local_repo, "--dsn", db.dsn)
    assert entry["parent_id"] is None

    listed = cli("list", "--repo", local_repo)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["ID", "KIND", "DATABASE", "STARTED", "SIZE", "EXPIRES"]
    assert lines[1].split()[:3] == [entry["id"], "full", db.name]
    assert lines[1].split()[3] == entry["started_at"][:19] + "Z"
    assert lines[1].split()[-1] == entry["expires_at"][:19] + "Z"
    _columns_line_up(listed.stdout)

    shown = cli("show", "--repo", local_repo, entry["id"])
    assert shown.returncode == 0, shown.stderr
    text = shown.stdout
    assert "None" not in text and not MICROSECONDS.search(text)
    fields = dict(ln.split(":", 1) for ln in text.split("\ntables")[0].splitlines())
    assert {k: v.strip() for k, v in fields.items() if k in ("id", "kind", "database", "expires")} == {
        "id": entry["id"], "kind": "full", "database": db.name, "expires": entry["expires_at"][:19] + "Z"}
    assert "parent" not in fields
    table_lines = text.split("tables (2):\n")[1].splitlines()
    assert sorted(re.split(r"\s{2,}", ln.strip())[0] for ln in table_lines) == ["public.Empty Table", "public.orders"]
    assert any(re.fullmatch(r"\s+public\.orders\s+1234 rows\s+\S+ \S+", ln) for ln in table_lines), table_lines


BASE = {
    "id": "20261126T011500Z-base-1a2b", "kind": "base", "parent_id": None,
    "started_at": "2026-11-26T01:15:00.123456Z", "finished_at": "2026-11-26T01:15:04.654321Z",
    "database": "app", "size_bytes": 48_000_000, "expires_at": "2026-12-03T01:15:00.123456Z",
    "server_version": "15.8", "tables": 0, "rows": 0, "raw_bytes": 0, "policy": "default",
    "encryption_key_id": None, "start_lsn": "0/3000028", "stop_lsn": "0/3000100", "timeline": 1,
    "checkpoint": "fast", "system_identifier": "7441234567890123456", "snapshot_lsn": None,
    "schema_fingerprint": "", "options": {}, "tables_detail": None, "objects": [],
    "inventory": {}, "databases": ["app", "billing", "postgres"],
}


def test_show_of_a_base_backup_describes_the_cluster() -> None:
    data = {**BASE, "tables": []}
    text = render_show(data)
    assert text.splitlines() == [
        "id:             20261126T011500Z-base-1a2b",
        "kind:           base",
        "cluster:        system identifier 7441234567890123456",
        "databases:      app, billing, postgres",
        "server version: 15.8",
        "started:        2026-11-26T01:15:00Z",
        "finished:       2026-11-26T01:15:04Z",
        "expires:        2026-12-03T01:15:00Z",
        "size:           45.8 MiB",
        "WAL start:      0/3000028 (timeline 1)",
        "WAL stop:       0/3000100",
        "checkpoint:     fast",
        "policy:         default",
    ]


def test_list_aligns_long_ids_and_names_a_base_backup_a_cluster() -> None:
    entries: list[dict[str, Any]] = [
        {**BASE, "tables": []},
        {**BASE, "id": "20261126T021500Z-full-9f9f-with-a-longer-suffix", "kind": "incremental",
         "database": "a_database_name_longer_than_sixteen", "size_bytes": 512},
    ]
    text = render_entries(entries)
    assert text.splitlines()[1].split()[2] == "(cluster)"
    assert not MICROSECONDS.search(text)
    _columns_line_up(text)


def test_retention_lines_show_seconds() -> None:
    data = {"dry_run": True, "decisions": [
        {"id": "20261126T011500Z-full-1a2b", "kind": "full", "started_at": "2026-11-26T01:15:00.123456Z",
         "action": "keep", "reasons": ["retained until 2026-12-26T01:15:00.123456Z"]}],
        "wal": None, "garbage": [], "notes": [], "failed": [], "deleted": [], "deleted_bytes": 0,
        "kept": ["20261126T011500Z-full-1a2b"], "log": None, "policy": "default",
        "now": "2026-11-27T00:00:00.500000Z"}
    text = render_retention(data)
    assert "keep    20261126T011500Z-full-1a2b full        2026-11-26T01:15:00Z  retained until 2026-12-26T01:15:00Z" \
        in text.splitlines()
    assert text.endswith("as of 2026-11-27T00:00:00Z)")
