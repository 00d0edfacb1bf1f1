"""A complete, plausible manifest for tests of the model and of what reads it."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from backup_tool.repository.manifest import Manifest, StoredObject, TableEntry

T0 = datetime(2026, 11, 25, 2, 0, tzinfo=timezone.utc)


def make_manifest(backup_id: str = "20261125T020000Z-Fabcd", tables: tuple[TableEntry, ...] | None = None,
                  parent_id: str | None = None, kind: str = "full") -> Manifest:
    prefix = f"backups/{backup_id}/"
    if tables is None:
        tables = (
            TableEntry("public", "users", "r", None, ("id", "name"), 3, "00ff" * 4,
                       StoredObject(prefix + "data/1.copy.zst", 10, "a" * 64, 30)),
            TableEntry("public", "logs", "p", None, ("id",), 0, "0" * 16, None),
        )
    return Manifest(
        id=backup_id, kind=kind, parent_id=parent_id, database="app", server_version="15.20",
        server_version_num=150020, encoding="UTF8", system_identifier="7300000000000000001",
        started_at=T0, finished_at=T0 + timedelta(seconds=5), expires_at=T0 + timedelta(days=30),
        policy={"name": "default"}, snapshot_lsn="0/1000000",
        schema=StoredObject(prefix + "schema.pgdump.zst", 5, "b" * 64, 9),
        globals=StoredObject(prefix + "globals.sql.zst", 4, "c" * 64, 8),
        schema_fingerprint="d" * 64, tables=tables, sequences=({"schema": "public", "name": "s"},),
        inventory={"rls": [], "roles": ["anon"]},
    )
